"""Benchmark of the STEM point-defect analyzer on simulated frames the training never saw.

Prints Markdown tables:
1. per material, on detector angles (8, 50 and 180 mrad), doses (3 and 80 counts) and a
   contamination texture (granular patches with adatoms) outside the training ranges: unit-cell
   detection and defect-class accuracy of the whole pipeline (shipped networks; ``--classifier`` names
   the CNN-2 checkpoints compared on the same frames, default the shipped one);
1b. on the same conditions, CNN-2 on the true unit cells: the shipped self-calibrated network
   beside the same network trained the same way without self-calibration;
2. leave-one-material-out: CNN-2 trained on every 2H material but one (same recipe and
   budget), evaluated on the held-out one;
3. self-calibration: the chalcogen/metal column ratio it measures against the simulated one,
   per material and detector;
4. memory and time on 2048 x 2048 and 8192 x 8192 frames and on a decompression bomb, each in
   a fresh process (peak resident memory).

Run: ``python bench/bench_defects.py`` (``--quick`` for fewer frames and shorter training).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
from pathlib import Path
import subprocess
import sys
import tempfile
import time

import numpy as np
from scipy.spatial import cKDTree
import torch

from flake_core.materials import stem_lattice
from flake_detector.defects.analyze import CLASSIFIER_CHECKPOINT, DefectAnalyzer
from flake_detector.defects.calibrate import calibrate_cells
from flake_detector.defects.models import MODELS_DIR, ClassifierConfig, classify
from flake_detector.defects.simulate import StemSimConfig, balanced_config, simulate
from flake_detector.defects.train import ClassifierTraining, cell_inputs, train_classifier

BENCH_SEED = 5_000_000  # disjoint from every training and validation seed
TMDS = ('mote2', 'mos2', 'mose2', 'ws2', 'wse2')
LATTICE_PX = 12.0       # lattice constant in the test frames [px] (e.g. WSe2 at 0.027 nm/px)
# Imaging conditions outside the training ranges (training: 12-40 and 60-120 mrad, dose 4-40, smooth blobs).
UNSEEN = (
    ('LAADF 8 mrad, dose 80', dict(detector_inner_mrad=(8.0, 8.0), dose=(80.0, 80.0))),
    ('MAADF 50 mrad, dose 3', dict(detector_inner_mrad=(50.0, 50.0), dose=(3.0, 3.0))),
    ('HAADF 180 mrad, dose 80, granular contamination', dict(detector_inner_mrad=(180.0, 180.0), dose=(80.0, 80.0),
                                                             contamination=(0.15, 0.15),
                                                             contamination_style='patches')),
)


def log(message: str) -> None:
    print(f'[bench_defects] {message}', file=sys.stderr, flush=True)


def unseen_config(material: str, changes: dict, size: int, balanced: bool = False) -> StemSimConfig:
    a = stem_lattice(material).lattice_a
    config = StemSimConfig(material=material, height=size, width=size, pixel_size=a / LATTICE_PX,
                           rotation_deg=(-25.0, 25.0), swap_probability=0.5, exponent_spread=0.0,
                           probe_fwhm=(0.9e-10, 1.3e-10), defect_probabilities=(0.0, 0.06, 0.02, 0.02, 0.01, 0.01),
                           background=(0.05, 0.2), jitter_px=0.3, line_gain_sigma=0.01, **changes)
    return balanced_config(config) if balanced else config


def score(analysis, sample) -> dict:
    """Detection: clean true cells with a found cell within a quarter lattice constant; classes on those."""
    # Cells not under contamination and a lattice constant or more inside the frame (the analyzer, like the
    # truth, keeps whole cells only; at the border the two boxes differ by a pixel or two).
    margin = sample.params['lattice_px']
    H, W = sample.image.shape
    centres = sample.unit_centres
    inside = ((centres[:, 0] > margin) & (centres[:, 0] < W - margin) & (centres[:, 1] > margin)
              & (centres[:, 1] < H - margin))
    clean = sample.unit_clean & inside
    truth = centres[clean]
    classes = sample.unit_classes[clean]
    if len(analysis.centres) == 0:
        return dict(cells=len(truth), found=0, correct=0, defects=int((classes > 0).sum()), defects_correct=0)
    distance, index = cKDTree(analysis.centres).query(truth)
    found = distance < 0.25 * sample.params['lattice_px']
    right = np.zeros(len(truth), bool)
    right[found] = analysis.classes[index[found]] == classes[found]
    defective = classes > 0
    return dict(cells=len(truth), found=int(found.sum()), correct=int(right.sum()),
                defects=int(defective.sum()), defects_correct=int(right[defective].sum()))


def pipeline_table(frames: int, size: int, materials=TMDS, classifiers=()) -> str:
    """The shipped CNN-1 with each CNN-2 of ``classifiers`` (default: the shipped one), on the same frames."""
    shipped = (MODELS_DIR / CLASSIFIER_CHECKPOINT).resolve()
    analyzers = [(_classifier_label(Path(path), shipped), DefectAnalyzer(classifier_path=Path(path), threads=1))
                 for path in (classifiers or (shipped,))]
    lines = ['| material | conditions (never trained on) | CNN-2 | clean cells | unit-cell detection | '
             'class accuracy of detected | defect-class accuracy | metal found by |',
             '|---|---|---|---|---|---|---|---|']
    totals = {(material, name): dict(cells=0, found=0, correct=0, defects=0, defects_correct=0)
              for material in materials + ('all',) for name, _ in analyzers}
    for material in materials:
        for c, (label, changes) in enumerate(UNSEEN):
            samples = [simulate(unseen_config(material, changes, size), seed=BENCH_SEED + 1000 * c + i)
                       for i in range(frames)]
            for name, analyzer in analyzers:
                tally = dict(cells=0, found=0, correct=0, defects=0, defects_correct=0)
                bases = set()
                for sample in samples:
                    analysis = analyzer.analyze(sample.image, sample.pixel_size, material)
                    if analysis.sublattice is not None:
                        right = analysis.sublattice.metal_site == ('Q' if sample.params['swap'] else 'P')
                        bases.add(f'{analysis.sublattice.basis}{"" if right else " (WRONG)"}')
                    for key, value in score(analysis, sample).items():
                        tally[key] += value
                        totals[material, name][key] += value
                        totals['all', name][key] += value
                lines.append(_row(stem_lattice(material), material, label, name, tally, ', '.join(sorted(bases))))
            log(f'{material} {label} done')
    for (material, name), tally in totals.items():
        lines.append(_row(material != 'all', material, f'all {len(UNSEEN)}', name, tally, ''))
    lines.append(f'\n{frames} frame(s) of {size} x {size} px per row, lattice constant {LATTICE_PX:g} px, '
                 'lattice turned '
                 'by up to 25 degrees, either sublattice on top, 10 % of cells defective. Only cells not under '
                 'contamination count (the analyzer masks the rest). Detection: a found cell within a quarter lattice '
                 'constant of the true one; cells within a lattice constant of the frame edge are left out. Targets: '
                 'detection >= 0.99, class accuracy >= 95 %.')
    return '\n'.join(lines)


def _classifier_label(path: Path, shipped: Path) -> str:
    return f'{path.stem} (shipped)' if path.resolve() == shipped else path.stem


def _row(lattice, material, label, name, t, bases) -> str:
    shown = stem_lattice(material).metal + stem_lattice(material).chalcogen + '2' if lattice else 'all'
    return (f'| {shown} | {label} | {name} | {t["cells"]} | {t["found"] / max(t["cells"], 1):.3f} | '
            f'{100 * t["correct"] / max(t["found"], 1):.1f} % | '
            f'{100 * t["defects_correct"] / max(t["defects"], 1):.1f} % '
            f'| {bases} |')


def true_cell_crops(material: str, config: ClassifierConfig, frames: int, size: int):
    inputs, labels = [], []
    for c, (_, changes) in enumerate(UNSEEN):
        for i in range(frames):
            sample = simulate(unseen_config(material, changes, size, balanced=True), seed=BENCH_SEED + 77 + 10 * c + i)
            clean = sample.unit_clean
            inputs.append(cell_inputs(sample, sample.unit_boxes[clean], config))
            labels.append(torch.from_numpy(sample.unit_classes[clean]))
    return torch.cat(inputs), torch.cat(labels)


def calibration_comparison_table(steps: int, images: int, frames: int, size: int) -> str:
    """CNN-2 trained with and without self-calibration, same recipe and budget, on the unseen conditions."""
    models = []
    for calibrated in (True, False):
        log(f'training CNN-2 {"with" if calibrated else "without"} self-calibration ({steps} steps)')
        model, card = train_classifier(ClassifierTraining(input_size=16, steps=steps, images=images, threads=1,
                                                          calibrated=calibrated), None, verbose=False)
        models.append(('self-calibrated' if calibrated else 'without self-calibration', model,
                       ClassifierConfig(2, 16, calibrated)))
    lines = ['| material | crops | ' + ' | '.join(name for name, _, _ in models) + ' |',
             '|---|---|' + '---|' * len(models)]
    for material in TMDS:
        cells = []
        for _, model, config in models:
            x, y = true_cell_crops(material, config, frames, size)
            cells.append(f'{100 * float((classify(model, x).argmax(1) == y).float().mean()):.1f} %')
        lines.append(f'| {_label(material)} | {len(y)} | ' + ' | '.join(cells) + ' |')
    lines.append(f'\nCNN-2 (16 px per channel) trained {steps} steps on {images} frames of every material, once on '
                 'self-calibrated crops and once on percentile-normalised crops (same seeds, recipe and budget); '
                 'evaluated on crops of the true unit cells of balanced frames (every class equally likely beside '
                 'Perfect) under the three unseen conditions of table 1.')
    return '\n'.join(lines)


def _label(material: str) -> str:
    lattice = stem_lattice(material)
    return f'{lattice.metal}{lattice.chalcogen}2'


def leave_one_out_table(steps: int, images: int, frames: int, size: int) -> str:
    lines = ['| held-out material | trained on | crops | accuracy on held-out | same budget, trained on all |',
             '|---|---|---|---|---|']
    all_model, _ = train_classifier(ClassifierTraining(input_size=16, steps=steps, images=images, threads=1), None,
                                    verbose=False)
    for material in TMDS:
        others = tuple(m for m in ('mos2', 'mose2', 'mote2', 'ws2', 'wse2', 'nbse2') if m != material)
        log(f'leave-one-out: training without {material} ({steps} steps)')
        model, _ = train_classifier(ClassifierTraining(input_size=16, steps=steps, images=images, threads=1,
                                                       materials=others), None, verbose=False)
        x, y = true_cell_crops(material, ClassifierConfig(2, 16), frames, size)
        held = float((classify(model, x).argmax(1) == y).float().mean())
        both = float((classify(all_model, x).argmax(1) == y).float().mean())
        lines.append(f'| {stem_lattice(material).metal}{stem_lattice(material).chalcogen}2 | {", ".join(others)} | '
                     f'{len(y)} | {100 * held:.1f} % | {100 * both:.1f} % |')
    lines.append(f'\nCNN-2 (16 px per channel) trained {steps} steps on {images} frames per run; evaluated on crops of '
                 'the true unit cells of balanced frames of the held-out material under the unseen conditions of '
                 'table 1 (every class equally likely beside Perfect).')
    return '\n'.join(lines)


def calibration_table(size: int) -> str:
    angles = (8.0, 25.0, 50.0, 100.0, 180.0)
    lines = ['| material | ' + ' | '.join(f'{a:g} mrad: true / measured' for a in angles) + ' | largest error |',
             '|---|' + '---|' * (len(angles) + 1)]
    worst_all = 0.0
    for material in TMDS:
        cells, worst = [], 0.0
        lattice = stem_lattice(material)
        for k, angle in enumerate(angles):
            changes = dict(detector_inner_mrad=(angle, angle), dose=(20.0, 20.0))
            sample = simulate(unseen_config(material, changes, size), seed=BENCH_SEED + 500 + k)
            a = lattice.lattice_a / sample.pixel_size
            # The calibration on the true cells, in the frame the networks use (lattice 30 px, turned straight).
            from flake_detector.defects.lattice import to_canonical
            canonical, valid, transform = to_canonical(sample.image, sample.params['rotation_deg'], 30.0 / a)
            centres = transform.to_canonical(sample.unit_centres)
            inset = np.array([-0.25 * 30 - 0.214 * 30, -30 / (4 * np.sqrt(3)) - 0.214 * 30])
            boxes = np.concatenate([centres + inset, centres - inset], 1)
            calibration, _ = calibrate_cells(canonical, boxes, 30.0, lattice, (0.7, 2.1), valid)
            true, measured = sample.params['chalcogen_metal_ratio'], calibration.ratio
            error = abs(measured / true - 1)
            worst = max(worst, error)
            cells.append(f'{true:.3f} / {measured:.3f}')
        worst_all = max(worst_all, worst)
        lines.append(f'| {lattice.metal}{lattice.chalcogen}2 | ' + ' | '.join(cells) + f' | {100 * worst:.1f} % |')
    lines.append(f'\nDose 20, lattice {LATTICE_PX:g} px, turned by up to 25 degrees; ratio = chalcogen pair / metal '
                 'column '
                 f'signal above the hollow-site background. Largest error over all: {100 * worst_all:.1f} %.')
    return '\n'.join(lines)


SCALE_SCRIPT = '''
import json, sys, time
import numpy as np
from flake_detector.defects.analyze import CLASSIFIER_CHECKPOINT, DefectAnalyzer
from flake_detector.defects.io import read_image
path, pixel_size = sys.argv[1], float(sys.argv[2])
analyzer = DefectAnalyzer(threads=1)
start = time.perf_counter()
try:
    frame = read_image(path)
    analysis = analyzer.analyze(frame.pixels, pixel_size, 'mote2')
    outcome = f"{int(analysis.analysed.sum())} cells, {analysis.tiles} tiles"
except (ValueError, OSError) as error:
    outcome = 'refused: ' + str(error).split(': ', 1)[-1][:60]
# VmHWM: the peak of this program's own memory (ru_maxrss would count the parent's pages copied before exec).
peak = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))
print(json.dumps({'seconds': time.perf_counter() - start, 'outcome': outcome, 'peak_mb': peak / 1024}))
'''


def scale_table(big: int) -> str:
    from flake_detector.defects.io import write_image
    from flake_detector.defects.simulate import to_uint16
    lines = ['| input | file | outcome | seconds | peak memory of the process |', '|---|---|---|---|---|']
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        baseline = _run_child(SCALE_SCRIPT, str(folder / 'missing.npy'), '4e-11')
        lines.append(f'| (no image: interpreter, torch and models loaded) | - | - | - | {baseline["peak_mb"]:.0f} MB |')
        a = stem_lattice('mote2').lattice_a
        for side, lattice_px in ((2048, 120.0), (big, 120.0)):
            sample = simulate(replace(unseen_config('mote2', dict(detector_inner_mrad=(80.0, 80.0), dose=(20.0, 20.0)),
                                                    side), rotation_deg=(7.0, 7.0), pixel_size=a / lattice_px),
                              seed=BENCH_SEED + 900)
            path = write_image(folder / f'frame_{side}.tif', to_uint16(sample.image), a / lattice_px)
            del sample
            result = _run_child(SCALE_SCRIPT, str(path), str(a / lattice_px))
            lines.append(f'| {side} x {side} px, 16 bit, lattice {lattice_px:g} px | TIFF, '
                         f'{path.stat().st_size / 2**20:.0f} MB | {result["outcome"]} | {result["seconds"]:.0f} | '
                         f'{result["peak_mb"]:.0f} MB |')
        bomb = folder / 'bomb.png'
        _png_bomb(bomb)
        result = _run_child(SCALE_SCRIPT, str(bomb), '4e-11')
        lines.append(f'| decompression bomb: PNG header promising 60000 x 60000 px | PNG, {bomb.stat().st_size} B | '
                     f'{result["outcome"]} | {result["seconds"]:.2f} | {result["peak_mb"]:.0f} MB |')
    lines.append('\nEach row is a fresh process (peak resident set size, including the interpreter, torch and the two '
                 'networks). Frames are analysed in tiles of at most 2048 px in the networks\' frame.')
    return '\n'.join(lines)


def _png_bomb(path: Path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack('>IIBBBBB', 60000, 60000, 8, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\x00' * 60001 * 64))
                     + chunk(b'IEND', b''))


def _run_child(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, '-c', script, *args], capture_output=True, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith('{'):
            return json.loads(line)
    return {'seconds': float('nan'), 'outcome': f'failed: {done.stderr.strip()[-100:]}', 'peak_mb': float('nan')}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='fewer frames and shorter training')
    parser.add_argument('--materials', default=','.join(TMDS), help='materials of the pipeline table')
    parser.add_argument('--classifier', action='append', type=Path, default=[],
                        help='CNN-2 checkpoint for the pipeline table (repeat to compare several on the same frames; '
                             'default: the shipped one)')
    parser.add_argument('--tables', default='pipeline,classifier,transfer,calibration,scale',
                        help='comma-separated: pipeline, classifier, transfer, calibration, scale')
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if not (MODELS_DIR / 'cnn1_hex.pt').is_file():
        print('shipped checkpoints missing: run `make train-defects`', file=sys.stderr)
        return 1
    tables = set(args.tables.split(','))
    start = time.perf_counter()
    if 'pipeline' in tables:
        log('whole pipeline on unseen conditions')
        print('## Whole pipeline, per material, on conditions never trained on\n\n'
              + pipeline_table(1, 256 if args.quick else 320, tuple(args.materials.split(',')),
                                 tuple(args.classifier)) + '\n')
    if 'classifier' in tables:
        log('CNN-2 with and without self-calibration')
        print('## CNN-2 with and without self-calibration\n\n'
              + calibration_comparison_table(20 if args.quick else 40, 4 if args.quick else 8, 1, 320) + '\n')
    if 'transfer' in tables:
        print('## Leave one material out (CNN-2)\n\n'
              + leave_one_out_table(20 if args.quick else 40, 4 if args.quick else 8, 1, 320) + '\n')
    if 'calibration' in tables:
        log('self-calibration across detectors')
        print('## Self-calibration: chalcogen/metal ratio across detectors\n\n' + calibration_table(384) + '\n')
    if 'scale' in tables:
        log('memory and time')
        print('## Memory and time\n\n' + scale_table(4096 if args.quick else 8192) + '\n')
    log(f'done in {time.perf_counter() - start:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
