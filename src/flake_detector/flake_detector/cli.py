"""``flake-detect``: run a detector backend on image files; write overlays and JSON.

    flake-detect --backend contrast --param materials=graphene --out out/ a.png b.png
    flake-detect --backend cascade --param target=graphene-thin --coco data/sim/annotations.json --out out/

With ``--coco`` the images of a COCO file are processed and ``predictions.json``
(COCO results with material and layers, plus the cascade funnel) is written for
``flake-eval``. Always written: ``detections.json`` (every detection with its
thickness estimate) and ``overlays/<name>.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import time

import cv2
import numpy as np

from flake_core.materials import LAYER_CLASS_NAMES
from flake_detector.detection import available_detectors, make_detector
from flake_detector.evaluation import detections_to_predictions

# Overlay colour (BGR) per layer class.
CLASS_COLOURS = {0: (200, 200, 200), 1: (0, 255, 255), 2: (0, 200, 0), 3: (255, 128, 0), 4: (0, 0, 255)}


def parse_param(text: str):
    """``name=value`` with value read as JSON when it parses (numbers, lists, booleans)."""
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'expected name=value, got {text!r}')
    name, value = text.split('=', 1)
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def draw_overlay(image: np.ndarray, detections, label: bool = True) -> np.ndarray:
    """Outline each detection in its layer-class colour with 'material NL' text."""
    out = image.copy()
    if out.ndim == 2:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(max(out.shape[:2]) / 600))
    for det in detections:
        colour = CLASS_COLOURS.get(det.layer_class, (255, 255, 255))
        contours, _ = cv2.findContours(det.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for contour in contours:
            cv2.drawContours(out, [contour + np.array(det.bbox[:2])], -1, colour, thickness)
        if label:
            layers = f'{det.layers:.0f}L' if np.isfinite(det.layers) else LAYER_CLASS_NAMES[det.layer_class]
            text = f'{det.material} {layers} {det.score:.2f}'
            cv2.putText(out, text, (det.bbox[0], max(10, det.bbox[1] - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.35 * thickness, colour, thickness, cv2.LINE_AA)
    return out


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
    parser.add_argument('--param', action='append', type=parse_param, default=[],
                        help='backend parameter name=value (repeatable)')
    parser.add_argument('--out', type=Path, required=True, help='output directory')
    parser.add_argument('--no-overlays', action='store_true', help='skip the overlay images')
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.coco is None and not args.images:
        parser.error('give image files or --coco')
    if args.coco is not None and not args.coco.is_file():
        parser.error(f'no such file: {args.coco}')
    try:
        detector = make_detector(args.backend, **dict(args.param))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    overlays = args.out / 'overlays'
    if not args.no_overlays:
        overlays.mkdir(exist_ok=True)
    inputs = _inputs(args)
    records, predictions, funnel_totals = [], [], {}
    started = time.perf_counter()
    for index, (image_id, path, _) in enumerate(inputs, start=1):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f'flake-detect: error: cannot read image {path}')
        t0 = time.perf_counter()
        result = detector.detect(image)
        elapsed = time.perf_counter() - t0
        for stage in result.funnel:
            funnel_totals[stage.stage] = funnel_totals.get(stage.stage, 0) + stage.remaining
        records.append({'image': str(path), 'image_id': image_id, 'seconds': elapsed,
                        'candidates': result.candidates,
                        'detections': [d.to_json() for d in result.detections]})
        predictions += detections_to_predictions(image_id, result.detections, image.shape[0], image.shape[1])
        if not args.no_overlays:
            cv2.imwrite(str(overlays / (path.stem + '.png')), draw_overlay(image, result.detections))
        print(f'[flake-detect] {index}/{len(inputs)} {path.name}: {len(result.detections)} detections, '
              f'{result.candidates} candidates, {elapsed * 1e3:.0f} ms', file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    funnel = [{'stage': name, 'remaining': count} for name, count in funnel_totals.items()]
    meta = {'backend': args.backend, 'params': dict(args.param), 'model_version': detector.model_version,
            'images': len(inputs), 'seconds': total}
    (args.out / 'detections.json').write_text(json.dumps({**meta, 'frames': records}, indent=1))
    (args.out / 'predictions.json').write_text(json.dumps({**meta, 'funnel': funnel, 'predictions': predictions}))
    print(f'wrote {args.out / "detections.json"} and {args.out / "predictions.json"} '
          f'({len(predictions)} detections in {len(inputs)} images, {total:.1f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
