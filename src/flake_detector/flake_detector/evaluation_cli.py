"""``flake-eval``: score a predictions file against a COCO ground truth.

    flake-eval --gt data/sim/annotations.json --pred out/predictions.json \
        --materials graphene --min-layers 1 --max-layers 3 --out out/metrics

writes ``metrics.json`` (its ``units`` entry names what the numbers are in) and
``metrics.md`` (COCO AP/AP50/AP75 for boxes and masks per material, per-image precision
and recall as Masubuchi et al. (2020) defines them, layer-class confusion, and the cascade
funnel when the predictions file carries one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys

from flake_core.materials import parse_materials
from flake_detector.evaluation import evaluate, markdown_report

# What the numbers of metrics.json are in: COCO scores images in pixels.
METRICS_UNITS = {'area': 'px', 'bbox': 'px', 'min_area': 'px', 'AP': '0..1', 'precision': '0..1', 'recall': '0..1',
                 'layers': 'layers'}


def load_predictions(path: Path) -> tuple[list[dict], list[dict] | None]:
    """A COCO results list, or ``{"predictions": [...], "funnel": [...]}`` as flake-detect writes."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return data, None
    if isinstance(data, dict) and isinstance(data.get('predictions'), list):
        return data['predictions'], data.get('funnel')
    raise ValueError(f'{path}: expected a list of COCO results or an object with "predictions"')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-eval', description=__doc__.split('\n\n')[0])
    parser.add_argument('--gt', type=Path, required=True, help='COCO ground truth (annotations.json)')
    parser.add_argument('--pred', type=Path, required=True, help='predictions JSON (COCO results)')
    parser.add_argument('--out', type=Path, required=True, help='output stem: writes OUT.json and OUT.md')
    parser.add_argument('--materials', default='',
                        help='comma-separated materials, e.g. graphene,hbn (default: all in the GT)')
    parser.add_argument('--min-layers', type=float, default=None, help='evaluate flakes with >= this many layers')
    parser.add_argument('--max-layers', type=float, default=None, help='evaluate flakes with <= this many layers')
    parser.add_argument('--min-area', type=float, default=0.0,
                        help='leave out flakes (and detections) smaller than this [px]')
    parser.add_argument('--score-threshold', type=float, default=0.5,
                        help='score above which a detection counts for per-image P/R and confusion')
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for path in (args.gt, args.pred):
        if not path.is_file():
            parser.error(f'no such file: {path}')
    try:
        gt = json.loads(args.gt.read_text())
        if not isinstance(gt, dict) or 'images' not in gt or 'annotations' not in gt:
            raise ValueError(f'{args.gt}: not a COCO instances file (needs "images" and "annotations")')
        predictions, funnel = load_predictions(args.pred)
    except (ValueError, json.JSONDecodeError) as exc:
        parser.error(str(exc))
    known = {image['id'] for image in gt['images']}
    unknown = {p.get('image_id') for p in predictions} - known
    if unknown:
        parser.error(f'predictions name image ids missing from the ground truth: {sorted(unknown)[:5]}')
    try:
        materials = list(parse_materials(args.materials)) if args.materials.strip() else None
    except ValueError as exc:
        parser.error(f'--materials: {exc}')
    metrics = evaluate(gt, predictions, materials, args.min_layers, args.max_layers, args.score_threshold,
                       funnel, args.min_area)
    metrics['units'] = METRICS_UNITS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out.with_suffix('.json'), args.out.with_suffix('.md')
    json_path.write_text(json.dumps(metrics, indent=1))
    report = markdown_report(metrics)
    md_path.write_text(report)
    print(report)
    print(f'wrote {json_path} and {md_path}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
