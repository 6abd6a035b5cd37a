"""A small seeded registry for the web app tests: flakes, a scan mosaic, camera frames and revisit images."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
import random
import socket
import threading

import cv2
import numpy as np

from flake_core.geometry import Affine2D, pixel_to_wafer
from flake_registry.store import FlakeStore, Sighting

MATERIALS = ('graphene', 'hbn', 'mos2', 'wte2')
SCAN_ID = 'scan-web-1'
CHIP_ID = 'chip-web'
# The mosaic covers 0..2 mm x 0..2 mm of the wafer at 10 um per pixel, +y up.
MOSAIC_METRES_PER_PIXEL = 10e-6
WAFER_TO_MOSAIC = Affine2D(1 / MOSAIC_METRES_PER_PIXEL, 0, 0, 0, -1 / MOSAIC_METRES_PER_PIXEL, 200)
# Camera frames: square tiles of 200 um at 0.5 um per pixel (a 10x objective), row-major from the origin.
TILE_SIDE = 200e-6
FRAME_METRES_PER_PIXEL = 0.5e-6
FRAME_PIXELS = int(round(TILE_SIDE / FRAME_METRES_PER_PIXEL))
TILES_PER_ROW = 100
REVISIT_METRES_PER_PIXEL = 0.1e-6   # a 50x objective
REVISIT_SIZE = (480, 360)
SUBSTRATE_BGR = (120, 70, 90)       # violet of SiO2 on Si, as the simulator draws it
# How far a flake's colour moves from the substrate towards its material's tint, by layer class.
TINT_BY_CLASS = {0: 0.5, 1: 0.3, 2: 0.5, 3: 0.75, 4: 1.0}
FAST_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 0]  # test pictures: written fast, read once
MATERIAL_TINTS = {'graphene': (150, 90, 110), 'hbn': (200, 160, 120), 'mos2': (90, 60, 150), 'wte2': (80, 130, 90),
                  'unknown': (60, 150, 180)}


def outline(x: float, y: float, radius: float, sides: int, rng: random.Random) -> list[tuple[float, float]]:
    start = rng.uniform(0, math.pi)
    return [(x + radius * math.cos(start + 2 * math.pi * k / sides) * rng.uniform(0.8, 1.0),
             y + radius * math.sin(start + 2 * math.pi * k / sides) * rng.uniform(0.8, 1.0)) for k in range(sides)]


def tile_of(x: float, y: float) -> int:
    return int(y // TILE_SIDE) * TILES_PER_ROW + int(x // TILE_SIDE)


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
                            tile_index=tile_of(x, y), layer_class=layer_class, layers=layers, layers_std=0.1 * layers,
                            thickness_nm=layers * 0.34, thickness_nm_std=0.05 * layers, score=rng.uniform(0.3, 1.0),
                            detector='contrast', model_version='test', contour=contour,
                            area=math.pi * radius * radius * 0.8, homogeneity=rng.uniform(0.5, 1.0),
                            stamp=1.7e9 + i))
    return out


def make_registry(folder: Path, count: int = 60, seed: int = 7,
                  pictures: bool = True) -> tuple[Path, Path, FlakeStore]:
    """(db path, data dir, store) with ``count`` flakes, a mosaic of the scan and (``pictures``) its frames."""
    data_dir = folder / 'data'
    data_dir.mkdir(parents=True, exist_ok=True)
    db_path = data_dir / 'registry.sqlite'
    store = FlakeStore(db_path, synchronous='NORMAL')
    sightings = detections(count, seed)
    for start in range(0, count, 500):
        store.ingest(sightings[start:start + 500])
    write_mosaic(data_dir, store)
    if pictures:
        write_frames(data_dir, store)
    return db_path, data_dir, store


def flake_colour(material: str, layer_class: int) -> tuple[int, int, int]:
    share = TINT_BY_CLASS.get(layer_class, 0.5)
    tint = MATERIAL_TINTS.get(material, MATERIAL_TINTS['unknown'])
    return tuple(int(round(s + (t - s) * share)) for s, t in zip(SUBSTRATE_BGR, tint, strict=True))


def render(flakes, to_pixels: Affine2D, width: int, height: int, seed: int) -> np.ndarray:
    """A micrograph-like picture: noisy substrate, each flake filled in its tint with a soft edge."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-5, 6, (height, width, 1), dtype=np.int16)
    canvas = (np.array(SUBSTRATE_BGR, np.int16) + noise).astype(np.uint8)
    for flake in flakes:
        points = to_pixels.apply_points(np.asarray(flake.contour, dtype=np.float64))
        cv2.fillPoly(canvas, [np.round(points * 8).astype(np.int32)], flake_colour(flake.material, flake.layer_class),
                     cv2.LINE_AA, shift=3)
    return cv2.GaussianBlur(canvas, (3, 3), 0.7)


def write_mosaic(data_dir: Path, store: FlakeStore, scan_id: str = SCAN_ID) -> Path:
    """The scan mosaic at 10 um per pixel with mosaic.json (wafer -> mosaic map), as the tiler writes it."""
    canvas = render(list(store.iter_flakes(scan_id=scan_id)), WAFER_TO_MOSAIC, 200, 200, seed=3)
    folder = data_dir / 'scans' / scan_id
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / 'mosaic.png'), canvas, FAST_PNG)
    (folder / 'mosaic.json').write_text(json.dumps({
        'scan_id': scan_id, 'metres_per_pixel': MOSAIC_METRES_PER_PIXEL,
        'wafer_to_mosaic': WAFER_TO_MOSAIC.as_list(), 'bounds_wafer': [0.0, 0.0, 2e-3, 2e-3]}))
    return folder


def write_frames(data_dir: Path, store: FlakeStore, scan_id: str = SCAN_ID, revisits: int = 3) -> None:
    """Each tile's camera frame (recorded in the registry's frames table) and 50x revisits of the first monolayers."""
    flakes = list(store.iter_flakes(scan_id=scan_id))
    folder = data_dir / 'scans' / scan_id / 'frames'
    folder.mkdir(parents=True, exist_ok=True)
    for tile in sorted({f.tile_index for f in flakes}):
        x0, y0 = (tile % TILES_PER_ROW) * TILE_SIDE, (tile // TILES_PER_ROW) * TILE_SIDE
        to_wafer = Affine2D(FRAME_METRES_PER_PIXEL, 0, x0, 0, -FRAME_METRES_PER_PIXEL, y0 + TILE_SIDE)
        pixels = render(flakes, to_wafer.inverse(), FRAME_PIXELS, FRAME_PIXELS, seed=tile)
        relative = f'scans/{scan_id}/frames/{tile:05d}.png'
        cv2.imwrite(str(data_dir / relative), pixels, FAST_PNG)
        store.record_frame(scan_id, tile, to_wafer.as_list(), FRAME_PIXELS, FRAME_PIXELS,
                           pixel_size=FRAME_METRES_PER_PIXEL, stamp=1.7e9 + tile, path=relative)
    revisit_dir = data_dir / 'revisits'
    revisit_dir.mkdir(exist_ok=True)
    for flake in [f for f in flakes if f.layer_class == 1][:revisits]:
        width, height = REVISIT_SIZE
        to_wafer = pixel_to_wafer(flake.x, flake.y, REVISIT_METRES_PER_PIXEL, width, height, Affine2D(1, 0, 0, 0, 1, 0))
        path = revisit_dir / f'{flake.id}_50x.png'
        cv2.imwrite(str(path), render(flakes, to_wafer.inverse(), width, height, seed=7), FAST_PNG)
        store.add_image(flake.id, 'revisit', path.relative_to(data_dir).as_posix(), objective='50x',
                        pixel_size=REVISIT_METRES_PER_PIXEL)


def add_unknown_candidates(store: FlakeStore, count: int = 2, scan_id: str = SCAN_ID) -> list[str]:
    """Flakes whose colour fits no calibration (material 'unknown'), away from the grid; their ids."""
    rng = random.Random(11)
    sightings = []
    for k in range(count):
        x, y = 380e-6 + 30e-6 * k, 90e-6
        sightings.append(Sighting(chip_id=CHIP_ID, scan_id=scan_id, x=x, y=y, material='unknown',
                                  tile_index=tile_of(x, y), score=0.5, detector='contrast', model_version='test',
                                  contour=outline(x, y, 9e-6, 6, rng), area=math.pi * 81e-12 * 0.8,
                                  homogeneity=0.8, stamp=1.7e9 + 100 + k))
    return [outcome.flake_id for outcome in store.ingest(sightings)]


TEST_HOST = 'testserver'
TEST_ORIGIN = f'http://{TEST_HOST}'


def web_app(db_path: Path, data_dir: Path, store: FlakeStore, **options):
    """The app as the tests reach it: through the test client's host name."""
    from flake_registry.web.app import create_app

    options.setdefault('allowed_hosts', ('127.0.0.1', TEST_HOST))
    return create_app(db_path, data_dir, store=store, **options)


def web_client(app, **options):
    """A test client whose requests carry this app's Origin, as a browser's do."""
    from fastapi.testclient import TestClient

    headers = {'Origin': TEST_ORIGIN, **options.pop('headers', {})}
    return TestClient(app, headers=headers, **options)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(app):
    """``app`` served by uvicorn on a free 127.0.0.1 port in a thread; yields its base URL once it listens."""
    import uvicorn

    class Server(uvicorn.Server):
        ready = threading.Event()

        async def startup(self, sockets=None):
            await super().startup(sockets)
            self.ready.set()

    port = free_port()
    server = Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning', lifespan='off'))
    server.ready = threading.Event()
    thread = threading.Thread(target=server.run, name='uvicorn', daemon=True)
    thread.start()
    assert server.ready.wait(timeout=60) and server.started, 'uvicorn did not start'
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        server.should_exit = True
        thread.join(timeout=10)
