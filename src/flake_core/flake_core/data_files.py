"""Where the running system keeps its files, relative to its data folder ($FLAKE_DATA_DIR).

The tiler writes each scan's mosaic and full-resolution frames there, the registry records
the frames with these relative paths, and the web app serves them from the same folder: one
layout, named here.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
import re

_UNSAFE = re.compile(r'[^A-Za-z0-9_.-]+')


def data_dir(configured: str = '') -> Path:
    """The data folder: ``configured``, else $FLAKE_DATA_DIR, else ./data."""
    return Path(configured or os.environ.get('FLAKE_DATA_DIR', 'data'))


def scan_folder(scan_id: str) -> PurePosixPath:
    """``scans/<scan id>``: a scan's mosaic and frames (characters outside [A-Za-z0-9_.-] become _)."""
    name = _UNSAFE.sub('_', scan_id).strip('.') or '_'
    return PurePosixPath('scans') / name


def frame_file(scan_id: str, tile_index: int) -> PurePosixPath:
    """``scans/<scan id>/frames/<tile index, 5 digits>.jpg``: one full-resolution frame of a scan."""
    return scan_folder(scan_id) / 'frames' / f'{int(tile_index):05d}.jpg'
