"""``flake-defects``: simulate ADF-STEM images, train the networks, analyse images.

    flake-defects simulate OUT.(png|tif|emd|npy) [--material wse2] [--detector 68-280] [--size 2048] [--seed 0]
    flake-defects train-cells --target hex|unit --out PATH [--steps N] [--seed S] [--materials a,b]
    flake-defects train-classifier --out PATH [--steps N] [--no-calibration] [--materials a,b]
    flake-defects analyze FILE --report DIR [--material wse2] [--detector haadf|INNER-OUTER] [--pixel-size M]

FILE: .dm3/.dm4, .emd, .ser, .tif (pixel size and detector from the file's metadata) or
.png/.jpg/.npy (give --pixel-size).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
from pathlib import Path
import shlex
import sys

import numpy as np

from flake_core.materials import STEM_MATERIALS, parse_materials


def _command_line(argv) -> str:
    return 'flake-defects ' + ' '.join(shlex.quote(a) for a in argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-defects', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    materials = ', '.join(STEM_MATERIALS)

    sim = sub.add_parser('simulate', help='render an ADF-STEM image of a 2H monolayer with ground truth')
    sim.add_argument('out', type=Path, help='image to write: .tif or .emd carry the pixel size; .png or .npy do not')
    sim.add_argument('--material', default='mote2', help=f'one of {materials}')
    sim.add_argument('--detector', default='haadf', help='haadf, maadf, laadf or INNER-OUTER in mrad')
    sim.add_argument('--pixel-size', type=float, default=0.0, help='[m/px]; 0: the lattice constant spans 120 px')
    sim.add_argument('--size', type=_positive_int, default=2048, help='image side [px]')
    sim.add_argument('--seed', type=int, default=0)
    sim.add_argument('--rotation', type=float, default=0.0, help='lattice rotation in the image [degrees]')
    sim.add_argument('--dose', type=float, nargs=2, default=(5.0, 20.0), metavar=('LOW', 'HIGH'),
                     help='Poisson lambda range: counts at the brighter column peak')
    sim.add_argument('--contamination', type=float, default=0.0, help='share of the frame under contamination')
    sim.add_argument('--defects', type=float, nargs=5, default=None,
                     metavar=('V_X', 'V_X2', 'V_M', 'V_M_V_X', 'V_M_V_X2'),
                     help='probability of each defect class per unit cell')
    sim.add_argument('--truth', type=Path, default=None, help='ground-truth JSON (default: OUT.json)')

    cells = sub.add_parser('train-cells', help='train CNN-1 (hexagonal cells) or the direct unit-cell detector')
    cells.add_argument('--target', choices=('hex', 'unit'), default='hex')
    cells.add_argument('--out', type=Path, required=True)
    cells.add_argument('--steps', type=_positive_int, default=800)
    cells.add_argument('--batch', type=_positive_int, default=2)
    cells.add_argument('--crop', type=_positive_int, default=192, help='training crop in the networks\' frame [px]')
    cells.add_argument('--images', type=_positive_int, default=32, help='simulated training frames')
    cells.add_argument('--lr', type=float, default=1e-4)
    cells.add_argument('--seed', type=int, default=0)
    cells.add_argument('--threads', type=_positive_int, default=1)
    cells.add_argument('--materials', default=','.join(STEM_MATERIALS), help='materials of the training frames')
    cells.add_argument('--no-pretrained', action='store_true', help='random init instead of ImageNet weights')

    cls = sub.add_parser('train-classifier', help='train CNN-2 (ResNet-18 defect classifier)')
    cls.add_argument('--channels', type=int, choices=(1, 2), default=2)
    cls.add_argument('--input-size', type=_positive_int, default=32, help='side of each input channel [px]')
    cls.add_argument('--no-calibration', action='store_true',
                     help='percentile-normalised input instead of the self-calibrated one (the comparison)')
    cls.add_argument('--out', type=Path, required=True)
    cls.add_argument('--steps', type=_positive_int, default=400)
    cls.add_argument('--batch', type=_positive_int, default=64)
    cls.add_argument('--images', type=_positive_int, default=48, help='balanced simulated training frames')
    cls.add_argument('--lr', type=float, default=1e-3)
    cls.add_argument('--seed', type=int, default=0)
    cls.add_argument('--threads', type=_positive_int, default=1)
    cls.add_argument('--materials', default=','.join(STEM_MATERIALS), help='materials of the training frames')

    analyze = sub.add_parser('analyze', help='count and map point defects in an ADF-STEM image')
    analyze.add_argument('image', type=Path, help='.dm3/.dm4, .emd, .ser, .tif, or .png/.jpg/.npy with --pixel-size')
    analyze.add_argument('--report', type=Path, required=True, help='directory for overlay PNG, CSV, JSON')
    analyze.add_argument('--material', default='mote2', help=f'one of {materials}')
    analyze.add_argument('--detector', default='',
                         help='annular detector: haadf, maadf, laadf or INNER-OUTER in mrad; default: the file\'s '
                              'metadata, else any detector (metal and chalcogen told apart by the image)')
    analyze.add_argument('--pixel-size', type=float, default=0.0,
                         help='[m/px]; replaces the file\'s calibration (required for files without one)')
    analyze.add_argument('--detector-checkpoint', type=Path, default=None, help='CNN-1 checkpoint')
    analyze.add_argument('--classifier', type=Path, default=None, help='CNN-2 checkpoint')
    analyze.add_argument('--threads', type=_positive_int, default=1)
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
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f'flake-defects {args.command}: error: {error}', file=sys.stderr)
        return 2


def _simulate(args) -> int:
    from flake_core.materials import stem_lattice

    from . import class_names
    from .adf import detector_from
    from .io import write_image
    from .simulate import StemSimConfig, simulate, to_uint16
    lattice = stem_lattice(args.material)
    adf = detector_from(args.detector)
    pixel_size = args.pixel_size or lattice.lattice_a / 120.0
    config = StemSimConfig(material=args.material, height=args.size, width=args.size, pixel_size=pixel_size,
                           dose=tuple(args.dose), rotation_deg=(args.rotation, args.rotation),
                           detector_inner_mrad=(adf.inner_mrad, adf.inner_mrad),
                           contamination=(args.contamination, args.contamination))
    if args.defects is not None:
        config = replace(config, defect_probabilities=(0.0, *args.defects))
    sample = simulate(config, seed=args.seed)
    write_image(args.out, to_uint16(sample.image), sample.pixel_size, detector=adf)
    names = class_names(args.material)
    truth = {'seed': args.seed, 'material': args.material, 'pixel_size_m': sample.pixel_size,
             'detector': adf.label, 'params': sample.params, 'class_names': list(names),
             'counts': sample.class_counts.tolist(), 'unit_boxes': np.round(sample.unit_boxes, 2).tolist(),
             'unit_classes': sample.unit_classes.tolist(), 'unit_clean': sample.unit_clean.tolist(),
             'hex_boxes': np.round(sample.hex_boxes, 2).tolist()}
    truth_path = args.truth or args.out.with_suffix('.json')
    truth_path.write_text(json.dumps(truth) + '\n')
    print(f'wrote {args.out} and {truth_path}: {len(sample.unit_boxes)} unit cells, counts '
          + ', '.join(f'{n}={c}' for n, c in zip(names, sample.class_counts)))
    return 0


def _train_cells(args, argv) -> int:
    from .train import DetectorTraining, train_detector
    options = DetectorTraining(target=args.target, steps=args.steps, batch=args.batch, crop=args.crop,
                               lr=args.lr, images=args.images, seed=args.seed, threads=args.threads,
                               pretrained=not args.no_pretrained, materials=parse_materials(args.materials))
    card = train_detector(options, args.out, _command_line(argv))
    print(json.dumps(card['metrics']))
    return 0


def _train_classifier(args, argv) -> int:
    from .train import ClassifierTraining, train_classifier
    options = ClassifierTraining(channels=args.channels, input_size=args.input_size,
                                 calibrated=not args.no_calibration, steps=args.steps, batch=args.batch,
                                 images=args.images, lr=args.lr, seed=args.seed, threads=args.threads,
                                 materials=parse_materials(args.materials))
    _, card = train_classifier(options, args.out, _command_line(argv))
    print(json.dumps(card['metrics']))
    return 0


def _analyze(args) -> int:
    from flake_core.materials import stem_lattice

    from .adf import detector_from
    from .analyze import DefectAnalyzer, prepare_input
    from .io import read_image
    from .report import write_report
    stem_lattice(args.material)                       # an unknown material or detector fails before the file is read
    if args.detector:
        detector_from(args.detector)
    frame = read_image(args.image)
    pixel_size = args.pixel_size or frame.pixel_size
    prepare_input(frame.pixels, pixel_size, args.material)   # and a bad frame before the networks are loaded
    if args.detector:
        detector, source = args.detector, 'request'
    elif frame.detector is not None:
        detector, source = frame.detector, 'file'
    else:
        detector, source = None, 'default'
    analyzer = DefectAnalyzer(args.detector_checkpoint, args.classifier, threads=args.threads)

    def progress(done: int, total: int) -> None:
        if total > 1:
            print(f'tile {done}/{total}', file=sys.stderr, flush=True)

    analysis = analyzer.analyze(frame.pixels, pixel_size, args.material, detector, source, progress)
    paths = write_report(args.report, frame.pixels, analysis, image_id=args.image.stem,
                         source={'file': args.image.name, **frame.metadata})
    for warning in frame.warnings + analysis.warnings:
        print(f'warning: {warning}', file=sys.stderr)
    counts = ', '.join(f'{n}={c}' for n, c in zip(analysis.class_names, analysis.counts))
    print(f'{analysis.summary()["cells_total"]} unit cells of {analysis.summary()["material_label"]} '
          f'analysed in {analysis.processing_time:.1f} s: {counts}')
    for path in paths:
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
