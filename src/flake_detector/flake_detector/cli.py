"""``flake-detect``: run a detector backend on image files; write overlays and JSON.

    flake-detect --backend contrast --materials graphene,hbn --pixel-size 0.55um --out out/ a.png b.png
    flake-detect --backend cascade --param target=graphene-thin --coco data/sim/annotations.json --out out/
    flake-detect --self-calibrate --materials nbse2 --out out/ my_scope/*.jpg    # a microscope never calibrated

With ``--coco`` the images of a COCO file are processed and ``predictions.json``
(COCO results with material and layers, plus the cascade funnel) is written for
``flake-eval``. Always written: ``detections.json`` (every detection with its
thickness estimate; units named in its ``units`` entry, areas in um^2 when the pixel
size is known) and ``overlays/<name>.png`` (outlines in the material's colour, a legend
and, when the pixel size is known, a scale bar).

``--self-calibrate`` first fits the microscope's calibration from the same images, without
labels, as ``flake-calibrate`` does (oxide, camera gamma and colour bands, white balance),
writes it to ``calibration.json`` in the output folder and detects with it: one command for
images of a microscope the system has never seen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import time

import cv2
import numpy as np

from flake_core import drawing, materials
from flake_core.materials import LAYER_CLASS_NAMES, parse_materials
from flake_core.units import LENGTH, UM, UM2, UnitError, parse_quantity
from flake_detector.detection import available_detectors, make_detector
from flake_detector.evaluation import detections_to_predictions

# What the numbers of detections.json are in.
DETECTION_UNITS = {'bbox': 'px (x, y, width, height)', 'area_px': 'px', 'area_um2': 'um^2', 'isolation_px': 'px',
                   'thickness_nm': 'nm', 'thickness_nm_std': 'nm', 'layers': 'layers', 'contrast': 'relative',
                   'seconds': 's', 'pixel_size_um': 'um'}


def parse_param(text: str):
    """``name=value`` with value read as JSON when it parses (numbers, lists, booleans)."""
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'expected name=value, got {text!r}')
    name, value = text.split('=', 1)
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def materials_option(text: str) -> str:
    """``--materials graphene,hbn`` (every command line and parameter reads materials this way)."""
    try:
        return ','.join(parse_materials(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def pixel_size_option(text: str) -> float:
    """``--pixel-size 0.55um`` (a bare number is in um) -> metres."""
    try:
        value = parse_quantity(text, LENGTH, '--pixel-size')
    except UnitError as error:
        raise argparse.ArgumentTypeError(error.message) from None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f'--pixel-size must be a positive length, got {text!r}')
    return value * UM


def draw_overlay(image: np.ndarray, detections, pixel_size: float | None = None, truth_masks=()) -> np.ndarray:
    """Each detection outlined in its material's colour (mono widest) with 'material NL score', a
    legend and a scale bar when ``pixel_size`` [m/px] is known; ``truth_masks`` (full-frame bool
    masks) are outlined thin and white for comparison."""
    out = image.copy()
    if out.ndim == 2:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
    base = max(1, round(max(out.shape[:2]) / 800))
    for mask in truth_masks:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), base, cv2.LINE_AA)
    present: dict[str, None] = {}
    for det in detections:
        present[det.material] = None
        colour = materials.colour_bgr(det.material)
        width = base * drawing.LAYER_MARKER_WIDTH.get(LAYER_CLASS_NAMES.get(det.layer_class, 'unknown'), 1)
        contours, _ = cv2.findContours(det.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for contour in contours:
            cv2.drawContours(out, [contour + np.array(det.bbox[:2])], -1, colour, width, cv2.LINE_AA)
        layers = f'{det.layers:.0f}L' if np.isfinite(det.layers) else LAYER_CLASS_NAMES[det.layer_class]
        cv2.putText(out, f'{det.material} {layers} {det.score:.2f}', (det.bbox[0], max(10, det.bbox[1] - 3)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.35 * base, colour, base, cv2.LINE_AA)
    legend = [(materials.colour(name), materials.label(name)) for name in present]
    legend.append(('#ffffff', drawing.LAYER_WIDTH_LEGEND + (', ground truth thin white' if truth_masks else '')))
    return drawing.annotate(out, pixel_size, legend)


def _inputs(args) -> list[tuple[int, Path, dict | None]]:
    if args.coco is not None:
        coco = json.loads(args.coco.read_text())
        root = args.coco.parent
        return [(int(img['id']), root / img['file_name'], img) for img in coco['images']]
    return [(k, Path(p), None) for k, p in enumerate(args.images, start=1)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-detect', description=__doc__.split('\n\n')[0])
    parser.add_argument('images', nargs='*', type=Path, help='image files (bgr as OpenCV reads them)')
    parser.add_argument('--coco', type=Path, default=None, help='process the images of this COCO file')
    parser.add_argument('--backend', default='contrast', help=f'one of {available_detectors()}')
    parser.add_argument('--materials', type=materials_option, default=None,
                        help='contrast backend: comma-separated materials to match, e.g. graphene,hbn')
    parser.add_argument('--pixel-size', type=pixel_size_option, default=None,
                        help='pixel size at the sample, e.g. 0.55um (a bare number is in um): scale bars and '
                             'areas in um^2 (COCO images that carry pixel_size_m need none)')
    parser.add_argument('--param', action='append', type=parse_param, default=[],
                        help='other backend parameter name=value (repeatable)')
    parser.add_argument('--out', type=Path, required=True, help='output directory')
    parser.add_argument('--no-overlays', action='store_true', help='skip the overlay images')
    parser.add_argument('--self-calibrate', action='store_true',
                        help='fit the calibration from these images first (no labels; as flake-calibrate) and '
                             'detect with it; written to OUT/calibration.json')
    return parser


def self_calibrate(inputs, materials: str, out: Path, min_area_px: int = 200) -> Path:
    """Fit a calibration from the images to be detected (``flake_detector.calibrate``); its path."""
    from flake_detector.calibrate import ImageFiles, calibrate

    def progress(done, total, name):
        print(f'[flake-detect] calibrating {done}/{total} {name}', file=sys.stderr, flush=True)

    try:
        result = calibrate(ImageFiles(path for _, path, _ in inputs), materials, progress=progress,
                           name=f'self-calibrated-{out.name}', min_area_px=min_area_px)
    except ValueError as error:
        raise SystemExit(f'flake-detect: error: cannot self-calibrate from these images ({error}); '
                         'give a calibration with --param calibration=FILE or leave out --self-calibrate') from None
    path = out / 'calibration.json'
    result.calibration.save(path)
    print(result.summary(), file=sys.stderr, flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.coco is None and not args.images:
        parser.error('give image files or --coco')
    if args.coco is not None and not args.coco.is_file():
        parser.error(f'no such file: {args.coco}')
    params = dict(args.param)
    if args.materials is not None:
        if args.backend != 'contrast':
            parser.error(f'--materials is a parameter of the contrast backend, not of {args.backend!r}')
        params['materials'] = args.materials
    if args.self_calibrate:
        if 'calibration' in params:
            parser.error('--self-calibrate fits the calibration; give either it or --param calibration=...')
        args.out.mkdir(parents=True, exist_ok=True)
        # Regions as small as the smallest flake reported take part in the fit (flake-calibrate's default: 200 px).
        params['calibration'] = str(self_calibrate(_inputs(args), params.get('materials') or 'graphene', args.out,
                                                   int(params.get('min_area_px', 200))))
    try:
        detector = make_detector(args.backend, **params)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    overlays = args.out / 'overlays'
    if not args.no_overlays:
        overlays.mkdir(exist_ok=True)
    inputs = _inputs(args)
    records, predictions, funnel_totals = [], [], {}
    started = time.perf_counter()
    for index, (image_id, path, coco_image) in enumerate(inputs, start=1):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f'flake-detect: error: cannot read image {path}')
        pixel_size = args.pixel_size or (coco_image or {}).get('pixel_size_m') or None
        t0 = time.perf_counter()
        result = detector.detect(image)
        elapsed = time.perf_counter() - t0
        for stage in result.funnel:
            funnel_totals[stage.stage] = funnel_totals.get(stage.stage, 0) + stage.remaining
        found = []
        for det in result.detections:
            record = det.to_json()
            if pixel_size:
                record['area_um2'] = det.area_px * pixel_size * pixel_size / UM2
            found.append(record)
        records.append({'image': str(path), 'image_id': image_id, 'seconds': elapsed,
                        'pixel_size_um': pixel_size / UM if pixel_size else None,
                        'candidates': result.candidates, 'detections': found})
        predictions += detections_to_predictions(image_id, result.detections, image.shape[0], image.shape[1])
        if not args.no_overlays:
            cv2.imwrite(str(overlays / (path.stem + '.png')), draw_overlay(image, result.detections, pixel_size))
        print(f'[flake-detect] {index}/{len(inputs)} {path.name}: {len(result.detections)} detections, '
              f'{result.candidates} candidates, {elapsed * 1e3:.0f} ms', file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    funnel = [{'stage': name, 'remaining': count} for name, count in funnel_totals.items()]
    meta = {'backend': args.backend, 'params': params, 'model_version': detector.model_version,
            'images': len(inputs), 'seconds': total, 'units': DETECTION_UNITS}
    (args.out / 'detections.json').write_text(json.dumps({**meta, 'frames': records}, indent=1))
    (args.out / 'predictions.json').write_text(json.dumps({**meta, 'funnel': funnel, 'predictions': predictions}))
    print(f'wrote {args.out / "detections.json"} and {args.out / "predictions.json"} '
          f'({len(predictions)} detections in {len(inputs)} images, {total:.1f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
