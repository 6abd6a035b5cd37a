"""The scan report in a real headless chromium: every picture loads, the thin flakes lead, scale bars
are drawn. Screenshots go to test-artifacts/report/.

With FLAKE_REPORT_DIR=reports/demo (after `make demo`) the demo's own report is shown instead of
the small one built here; with FLAKE_WEB_DOC_SCREENSHOTS=1 too, the screenshots become the
pictures of docs/system.md (docs/img/report_*.jpg).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from flake_core.geometry import Affine2D
from flake_scanner.demo.report import ReportFlake, ScanFrameFile, write_report
from flake_scanner.scan.tiler import MosaicBuilder

pytestmark = pytest.mark.slow

CHROMIUM = Path('/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / 'test-artifacts' / 'report'
DOC_IMAGES = REPO / 'docs' / 'img'


def small_report(folder: Path) -> Path:
    """A report of four simulated 10x frames with a monolayer, a few-layer and a thick flake."""
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    wafer = VirtualWafer.generate(WaferConfig(seed=3, flake_density_per_mm2=0.0, residue_line_density_per_mm2=0.0,
                                              residue_network_density_per_mm2=0.0, dust_density_per_mm2=0.0,
                                              bulk_density_per_mm2=0.0, mount_offset_m=(0.0, 0.0),
                                              mount_rotation_rad=0.0))
    shapes = [('graphene', 1, (1.10e-3, 1.10e-3), 12e-6), ('hbn', 25, (1.25e-3, 1.15e-3), 18e-6),
              ('mos2', 30, (1.15e-3, 1.30e-3), 25e-6)]
    for material, layers, (cx, cy), half in shapes:
        wafer.add_object('flake', material, np.array([[cx - half, cy - half], [cx + half, cy - half * 0.6],
                                                      [cx + half * 0.8, cy + half], [cx - half, cy + half * 0.7]]),
                         layers=layers)
    camera = CameraModel(wafer, CameraSettings(width=400, height=400, objective='10x', exposure_s=0.005, seed=3))
    frames_dir = folder / 'frames'
    frames_dir.mkdir(parents=True)
    builder = MosaicBuilder(1e-6, blend_px=24)
    frames = {}
    field = 400 * camera.pixel_size * 0.85
    for index, (x, y) in enumerate([(1.08e-3, 1.08e-3), (1.08e-3 + field, 1.08e-3), (1.08e-3, 1.08e-3 + field),
                                    (1.08e-3 + field, 1.08e-3 + field)]):
        pixels = camera.render(x, y)
        to_wafer = camera.pixel_to_wafer(x, y)
        cv2.imwrite(str(frames_dir / f'{index:05d}.jpg'), pixels)
        frames[index] = ScanFrameFile(frames_dir / f'{index:05d}.jpg', to_wafer)
        builder.add(pixels, to_wafer)
    mosaic = builder.render()
    cv2.imwrite(str(folder / 'mosaic_in.png'), mosaic.canvas)
    (folder / 'mosaic_in.json').write_text(json.dumps({'wafer_to_mosaic': mosaic.wafer_to_mosaic().as_list(),
                                                       'metres_per_pixel': mosaic.metres_per_pixel}))
    flakes = []
    for number, (material, layers, (cx, cy), half) in enumerate(shapes):
        outline = ((cx - half, cy - half), (cx + half, cy - half * 0.6), (cx + half * 0.8, cy + half),
                   (cx - half, cy + half * 0.7))
        to_pixels = frames[0].pixel_to_wafer.inverse()
        u, v = to_pixels.apply(cx, cy)
        side = int(2 * half / camera.pixel_size)
        layer_class = 'mono' if layers == 1 else 'few' if layers <= 10 else 'thick'
        thickness = layers * (0.335 if material == 'graphene' else 0.33 if material == 'hbn' else 0.65)
        flakes.append(ReportFlake(f'F000000{number + 1}', material, layer_class, float(layers), thickness,
                                  0.0 if layers == 1 else 0.6, (2 * half) ** 2 * 0.85, 0.95, (cx, cy), 0,
                                  (int(u) - side // 2, int(v) - side // 2, side, side), contour=outline))
    return write_report(folder / 'report', flakes, None, folder / 'mosaic_in.png', None,
                        {'scan wall time (the revisits apart)': '12.0 s'}, title='Flake scan (test)',
                        frames=frames, created=1.7e9)


@pytest.fixture(scope='module')
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f'{CHROMIUM} is missing: run tools/install_chromium.sh (as root) to install Debian chromium')
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def shot(page, name: str, full_page: bool = False, clip=None) -> None:
    path = ARTIFACTS / f'{name}.png'
    page.screenshot(path=str(path), full_page=full_page, clip=clip)
    if os.environ.get('FLAKE_WEB_DOC_SCREENSHOTS') == '1' and os.environ.get('FLAKE_REPORT_DIR'):
        cv2.imwrite(str(DOC_IMAGES / f'report_{name}.jpg'), cv2.imread(str(path)), [cv2.IMWRITE_JPEG_QUALITY, 82])


def scroll_to(page, heading: str) -> None:
    """The section under ``heading`` at the top of the window."""
    page.locator('h2', has_text=heading).first.evaluate("e => e.scrollIntoView({block: 'start'})")


def test_the_report_opens_with_the_thin_flakes_and_every_picture_has_its_scale_bar(browser, tmp_path):
    given = os.environ.get('FLAKE_REPORT_DIR')
    index = (Path(given) / 'index.html').resolve() if given else small_report(tmp_path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={'width': 1400, 'height': 1000})
    page = context.new_page()
    page.goto(index.as_uri())
    page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    headings = page.locator('h2').all_inner_texts()
    assert headings[0] == 'Thin flakes found' and 'Mosaic' in headings
    shot(page, 'thin_flakes')
    scroll_to(page, 'Mosaic')
    shot(page, 'mosaic')
    plot = page.locator('h2', has_text='Thickness and area')
    if plot.count():
        scroll_to(page, 'Thickness and area')
        shot(page, 'distributions')
    scroll_to(page, 'Gallery')
    shot(page, 'gallery')
    context.close()
    # Every flake picture the report drew carries a white scale bar at its bottom.
    pictures = sorted((index.parent / 'thumbnails').glob('*.png')) + [index.parent / 'mosaic.png']
    assert pictures
    for path in pictures:
        picture = cv2.imread(str(path))
        white = np.all(picture == 255, axis=-1)
        assert any(white[row].sum() >= 10 for row in range(picture.shape[0] // 2, picture.shape[0])), path.name


def test_the_small_report_maps_its_flakes_onto_the_mosaic(tmp_path):
    """The outlines sit where the flakes are (the report draws from the mosaic's own map)."""
    page = small_report(tmp_path)
    annotated = cv2.imread(str(page.parent / 'mosaic.png'))
    meta = json.loads((tmp_path / 'mosaic_in.json').read_text())
    u, v = Affine2D.from_list(meta['wafer_to_mosaic']).apply(1.10e-3 - 12e-6, 1.10e-3 - 12e-6)
    from flake_core import materials
    colour = np.array(materials.colour_bgr('graphene'))
    around = annotated[int(v) - 3:int(v) + 4, int(u) - 3:int(u) + 4].astype(int)
    assert np.any(np.abs(around - colour).sum(axis=-1) < 60), 'graphene outline at its corner'
