"""``flake-defects``: simulate STEM images, train the networks, analyse images.

    flake-defects simulate OUT.png [--size 2048] [--seed 0] [--dose 5 20] [--truth OUT.json]
    flake-defects train-cells --target hex|unit --out PATH [--steps N] [--seed S]
    flake-defects train-classifier --channels 2|1 --input-size 224 --out PATH [--steps N]
    flake-defects analyze IMAGE --report DIR [--pixel-size M] [--detector PT] [--classifier PT]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
from pathlib import Path
import shlex
import sys

import numpy as np

from . import CLASS_NAMES


def _command_line(argv) -> str:
    return 'flake-defects ' + ' '.join(shlex.quote(a) for a in argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-defects', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)

    sim = sub.add_parser('simulate', help='render a HAADF-STEM image of 2H-MoTe2 with ground truth')
    sim.add_argument('out', type=Path, help='16-bit PNG (or .npy) to write')
    sim.add_argument('--size', type=int, default=2048, help='image side [px] (512 to 2048 typical)')
    sim.add_argument('--seed', type=int, default=0)
    sim.add_argument('--dose', type=float, nargs=2, default=(5.0, 20.0), metavar=('LOW', 'HIGH'),
                     help='Poisson lambda range: counts at a Te2 column peak')
    sim.add_argument('--defects', type=float, nargs=5, default=None,
                     metavar=('V_TE1', 'V_TE2', 'V_MO', 'V_TE1_V_MO', 'V_TE2_V_MO'),
                     help='probability of each defect class per unit cell')
    sim.add_argument('--truth', type=Path, default=None, help='ground-truth JSON (default: OUT.json)')

    cells = sub.add_parser('train-cells', help='train CNN-1 (hexagonal cells) or the direct unit-cell detector')
    cells.add_argument('--target', choices=('hex', 'unit'), default='hex')
    cells.add_argument('--out', type=Path, required=True)
    cells.add_argument('--steps', type=int, default=300)
    cells.add_argument('--batch', type=int, default=2)
    cells.add_argument('--crop', type=int, default=192, help='training crop at the detector scale [px]')
    cells.add_argument('--images', type=int, default=24, help='simulated training images')
    cells.add_argument('--lr', type=float, default=1e-4)
    cells.add_argument('--seed', type=int, default=0)
    cells.add_argument('--threads', type=int, default=1)
    cells.add_argument('--no-pretrained', action='store_true', help='random init instead of ImageNet weights')

    cls = sub.add_parser('train-classifier', help='train CNN-2 (ResNet-18 defect classifier)')
    cls.add_argument('--channels', type=int, choices=(1, 2), default=2)
    cls.add_argument('--input-size', type=int, default=224, help='side of each input channel [px]')
    cls.add_argument('--out', type=Path, required=True)
    cls.add_argument('--steps', type=int, default=400)
    cls.add_argument('--batch', type=int, default=32)
    cls.add_argument('--images', type=int, default=40, help='balanced simulated training images')
    cls.add_argument('--lr', type=float, default=1e-3)
    cls.add_argument('--seed', type=int, default=0)
    cls.add_argument('--threads', type=int, default=1)

    analyze = sub.add_parser('analyze', help='count and map point defects in a HAADF-STEM image')
    analyze.add_argument('image', type=Path, help='PNG/TIFF (8 or 16 bit) or .npy')
    analyze.add_argument('--report', type=Path, required=True, help='directory for overlay PNG, CSV, JSON')
    analyze.add_argument('--pixel-size', type=float, default=0.0,
                         help='[m/px]; 0 uses seed 003 scale (lattice constant = 120 px)')
    analyze.add_argument('--detector', type=Path, default=None)
    analyze.add_argument('--classifier', type=Path, default=None)
    analyze.add_argument('--threads', type=int, default=1)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == 'simulate':
            return _simulate(args)
        if args.command == 'train-cells':
            return _train_cells(args, argv)
        if args.command == 'train-classifier':
            return _train_classifier(args, argv)
        return _analyze(args)
    except (ValueError, FileNotFoundError) as error:
        print(f'flake-defects {args.command}: error: {error}', file=sys.stderr)
        return 2


def _simulate(args) -> int:
    from .report import save_image
    from .simulate import StemSimConfig, simulate, to_uint16
    config = StemSimConfig(height=args.size, width=args.size, dose=tuple(args.dose))
    if args.defects is not None:
        config = replace(config, defect_probabilities=(0.0, *args.defects))
    sample = simulate(config, seed=args.seed)
    save_image(args.out, to_uint16(sample.image))
    truth = {'seed': args.seed, 'pixel_size_m': sample.pixel_size, 'params': sample.params,
             'class_names': list(CLASS_NAMES), 'counts': sample.class_counts.tolist(),
             'unit_boxes': np.round(sample.unit_boxes, 2).tolist(), 'unit_classes': sample.unit_classes.tolist(),
             'hex_boxes': np.round(sample.hex_boxes, 2).tolist()}
    truth_path = args.truth or args.out.with_suffix('.json')
    truth_path.write_text(json.dumps(truth) + '\n')
    print(f'wrote {args.out} and {truth_path}: {len(sample.unit_boxes)} unit cells, counts '
          + ', '.join(f'{n}={c}' for n, c in zip(CLASS_NAMES, sample.class_counts)))
    return 0


def _train_cells(args, argv) -> int:
    from .train import DetectorTraining, train_detector
    options = DetectorTraining(target=args.target, steps=args.steps, batch=args.batch, crop=args.crop,
                               lr=args.lr, images=args.images, seed=args.seed, threads=args.threads,
                               pretrained=not args.no_pretrained)
    card = train_detector(options, args.out, _command_line(argv))
    print(json.dumps(card['metrics']))
    return 0


def _train_classifier(args, argv) -> int:
    from .train import ClassifierTraining, train_classifier
    options = ClassifierTraining(channels=args.channels, input_size=args.input_size, steps=args.steps,
                                 batch=args.batch, images=args.images, lr=args.lr, seed=args.seed,
                                 threads=args.threads)
    _, card = train_classifier(options, args.out, _command_line(argv))
    print(json.dumps(card['metrics']))
    return 0


def _analyze(args) -> int:
    from .analyze import DefectAnalyzer, prepare_input
    from .report import load_image, write_report
    image = load_image(args.image)
    pixels, pixel_size = prepare_input(image, args.pixel_size or None)  # fail fast, before loading models
    analyzer = DefectAnalyzer(args.detector, args.classifier, threads=args.threads)
    analysis = analyzer.analyze(pixels, pixel_size)
    paths = write_report(args.report, image, analysis, image_id=args.image.stem)
    counts = ', '.join(f'{n}={c}' for n, c in zip(CLASS_NAMES, analysis.counts))
    print(f'{len(analysis.classes)} unit cells in {analysis.processing_time:.1f} s: {counts}')
    for path in paths:
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
