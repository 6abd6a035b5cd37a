"""The web app's pictures: the drawing itself is ``flake_core.drawing`` (scale bars, legends,
outlines, cut-outs, annotated mosaics: one way for the scan report, the command-line overlays
and the app); here are what only the app needs: reading pictures safely, a cache of decoded
mosaics, and a colour per layer of a stack.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
import threading

import cv2
import numpy as np

from flake_core import materials
from flake_core.drawing import (  # noqa: F401 - the app's pictures are drawn through these
    annotate,
    annotated_mosaic,
    draw_outline,
    encode_png,
    flake_caption,
    flake_window,
    nice_length,
    outline_picture,
    shade,
    window,
)

# A larger file than this is not decoded by the app (a scan mosaic of a whole chip is ~100 MB).
MAX_IMAGE_BYTES = 256 * 1024 * 1024
MAX_IMAGE_PIXELS = 400_000_000


# The n-th layer of one material in a stack: its material colour, then darker, lighter, ...
LAYER_SHADES = (0.0, -0.45, 0.45, -0.7, 0.7)
LAYER_DASHES = ('', '6 3', '2 2', '8 2 2 2', '1 3')


def layer_styles(material_names: Sequence[str]) -> list[dict[str, str]]:
    """One distinct colour (a shade of the material's colour) and dash pattern per stack layer."""
    seen: dict[str, int] = {}
    styles = []
    for name in material_names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        styles.append({'colour': shade(materials.colour(name), LAYER_SHADES[count % len(LAYER_SHADES)]),
                       'dash': LAYER_DASHES[count % len(LAYER_DASHES)]})
    return styles


def read_image(path: Path) -> np.ndarray | None:
    """A colour picture, or None when it is missing, unreadable or too large to decode safely."""
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            return None
        if path.suffix.lower() == '.png':
            width, height = png_size(path)
            if width * height > MAX_IMAGE_PIXELS:
                return None
    except (OSError, ValueError):
        return None
    return cv2.imread(str(path), cv2.IMREAD_COLOR)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG header without decoding the picture."""
    with open(path, 'rb') as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != b'\x89PNG\r\n\x1a\n':
        raise ValueError(f'{path.name} is not a PNG file')
    return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')


class MosaicCache:
    """Decoded scan mosaics, newest few kept: thumbnails cut many crops from one mosaic."""

    def __init__(self, size: int = 2):
        self._size = size
        self._items: OrderedDict[tuple[str, float], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> np.ndarray | None:
        try:
            key = (str(path), path.stat().st_mtime)
        except OSError:
            return None
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        pixels = read_image(path)
        if pixels is None:
            return None
        with self._lock:
            self._items[key] = pixels
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return pixels
