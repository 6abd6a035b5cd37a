"""A small seeded registry and scan mosaic for the web app tests."""

from __future__ import annotations

import json
import math
from pathlib import Path
import random

import cv2
import numpy as np

from flake_core.geometry import Affine2D
from flake_registry.store import FlakeStore, Sighting

MATERIALS = ('graphene', 'hbn', 'mos2', 'wte2')
SCAN_ID = 'scan-web-1'
CHIP_ID = 'chip-web'
# The mosaic covers 0..2 mm x 0..2 mm of the wafer at 10 um per pixel, +y up.
MOSAIC_METRES_PER_PIXEL = 10e-6
WAFER_TO_MOSAIC = Affine2D(1 / MOSAIC_METRES_PER_PIXEL, 0, 0, 0, -1 / MOSAIC_METRES_PER_PIXEL, 200)


def outline(x: float, y: float, radius: float, sides: int, rng: random.Random) -> list[tuple[float, float]]:
    start = rng.uniform(0, math.pi)
    return [(x + radius * math.cos(start + 2 * math.pi * k / sides) * rng.uniform(0.8, 1.0),
             y + radius * math.sin(start + 2 * math.pi * k / sides) * rng.uniform(0.8, 1.0)) for k in range(sides)]


def detections(count: int, seed: int = 7, scan_id: str = SCAN_ID, chip_id: str = CHIP_ID,
               spacing: float = 40e-6) -> list[Sighting]:
    """Flakes on a grid (never merged), materials and layer classes cycling, seeded sizes and scores."""
    rng = random.Random(seed)
    per_row = max(1, int(math.ceil(math.sqrt(count))))
    out = []
    for i in range(count):
        x = 50e-6 + (i % per_row) * spacing
        y = 50e-6 + (i // per_row) * spacing
        radius = rng.uniform(4e-6, 15e-6)
        contour = outline(x, y, radius, rng.randint(5, 8), rng)
        layer_class = 1 + i % 4
        layers = {1: 1.0, 2: 4.0, 3: 20.0, 4: 60.0}[layer_class]
        out.append(Sighting(chip_id=chip_id, scan_id=scan_id, x=x, y=y, material=MATERIALS[i % 4],
                             tile_index=i % 10, layer_class=layer_class, layers=layers, layers_std=0.1 * layers,
                             thickness_nm=layers * 0.34, thickness_nm_std=0.05 * layers, score=rng.uniform(0.3, 1.0),
                             detector='contrast', model_version='test', contour=contour,
                             area=math.pi * radius * radius * 0.8, homogeneity=rng.uniform(0.5, 1.0),
                             stamp=1.7e9 + i))
    return out


def make_registry(folder: Path, count: int = 60, seed: int = 7) -> tuple[Path, Path, FlakeStore]:
    """(db path, data dir, store) with ``count`` flakes and a mosaic of the scan."""
    data_dir = folder / 'data'
    data_dir.mkdir(parents=True, exist_ok=True)
    db_path = data_dir / 'registry.sqlite'
    store = FlakeStore(db_path, synchronous='NORMAL')
    for start in range(0, count, 500):
        store.ingest(detections(count, seed)[start:start + 500])
    write_mosaic(data_dir, store)
    return db_path, data_dir, store


def write_mosaic(data_dir: Path, store: FlakeStore, scan_id: str = SCAN_ID) -> Path:
    """A dark-violet substrate with each flake filled in a material tint, as the tiler writes it."""
    canvas = np.full((200, 200, 3), (120, 70, 90), np.uint8)
    rng = np.random.default_rng(3)
    canvas = np.clip(canvas + rng.normal(0, 4, canvas.shape), 0, 255).astype(np.uint8)
    tints = {'graphene': (150, 90, 110), 'hbn': (170, 150, 120), 'mos2': (90, 60, 140), 'wte2': (80, 110, 90)}
    for flake in store.iter_flakes(scan_id=scan_id):
        points = WAFER_TO_MOSAIC.apply_points(np.array(flake.contour))
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], tints[flake.material])
    folder = data_dir / 'scans' / scan_id
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / 'mosaic.png'), canvas)
    (folder / 'mosaic.json').write_text(json.dumps({
        'scan_id': scan_id, 'metres_per_pixel': MOSAIC_METRES_PER_PIXEL,
        'wafer_to_mosaic': WAFER_TO_MOSAIC.as_list(), 'bounds_wafer': [0.0, 0.0, 2e-3, 2e-3]}))
    return folder
