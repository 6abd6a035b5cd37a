"""Held-out cameras: the optical (contrast) detector and the cascade on simulated frames rendered
with camera settings no training used, against the same frames rendered with the default camera.

The looks are ``flake_scanner.sim.randomise.held_out_looks()``: a white balance set for 4600 K
under the 3200 K lamp, a gamma-encoded camera (1.85), 235 nm of oxide, and all of these together
with a 4600 K LED, broad shifted colour bands, JPEG, shading and dirt on the optics. Each lies
inside intervals the randomiser never draws, so a cascade trained with ``--randomise-camera``
meets them here for the first time; the shipped cascade before it was trained on the default
camera alone. Every look renders the same chip (seed 7, a seed no training or threshold choice
used; all four materials, half the flakes forced to 1-10 layers) at the same stage positions,
so the rows compare like with like. A last row draws a new random look every 5 frames from seed
7 (inside the training ranges, but looks and chips no training drew).

Scored: graphene flakes of 1-10 layers (the cascade's ``graphene-1-10L`` target) of at least
60 px that a camera can see (physical contrast of at least 0.03 in some channel; thin graphene
vanishes on 130-190 nm of oxide, which random looks may draw); detections of invisible ones
are not counted either way. Recall: the share of them matched by a detection (mask IoU >= 0.5, one to one, by
score); precision: the share of detections that match one. The optical detector looks for all
four materials up to 10 layers, is told the oxide, and its graphene detections of 1-10 layers
count; the cascade's detections all count. In brackets for the cascade, the nets alone: the
share of good candidates (as training labels them) accepted, and the share of accepted
candidates that are good. "decoded" feeds the optical detector the frames
with the true camera's black level and gamma undone (``CameraResponse.decode``): what an exact
calibration of the camera gives it. "flake-calibrate" is what a lab does: the calibration
fitted (``flake_detector.calibrate.calibrate``, no labels, the four materials) on the frames
of the look themselves, then the detector with that file (``--no-calibrate`` leaves it out).

    python bench/bench_heldout_camera.py [--frames 30] [--no-calibrate] [--cascade LABEL=PATH ...]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
import time

os.environ.setdefault('OMP_NUM_THREADS', '1')

import numpy as np  # noqa: E402

EVAL_SEED = 7
MIN_AREA_PX = 60
TARGET_LAYERS = (1, 10)
MATERIALS = 'graphene,hbn,mos2,wte2'


def _truth_entries(truth, objects) -> tuple[list[dict], list[dict]]:
    """(visible target flakes, invisible ones): ``objects`` are the frame's TruthObjects, in the
    order of ``truth.flakes``, with their visibility."""
    from flake_detector.detection import encode_rle

    seen, unseen = [], []
    for obj, info in zip(truth.flakes, objects, strict=True):
        if obj.material == 'graphene' and TARGET_LAYERS[0] <= obj.layers <= TARGET_LAYERS[1] \
                and obj.area_px >= MIN_AREA_PX:
            entry = {'bbox': [float(v) for v in obj.bbox], 'segmentation': encode_rle(obj.mask)}
            (seen if info.visible else unseen).append(entry)
    return seen, unseen


class Score:
    def __init__(self):
        self.truth = self.predictions = self.matched = 0
        # The nets alone: good candidates, those accepted, all accepted.
        self.good = self.good_accepted = self.accepted = 0

    def add(self, truth: tuple[list[dict], list[dict]], predictions: list[dict], height: int, width: int) -> None:
        from flake_detector.evaluation import match_image

        truth, unseen = truth
        # A detection of a flake no camera can see is neither right nor wrong.
        hidden = {k for _, k, _ in match_image(unseen, predictions, height, width, 0.5)}
        predictions = [p for k, p in enumerate(predictions) if k not in hidden]
        self.truth += len(truth)
        self.predictions += len(predictions)
        self.matched += len(match_image(truth, predictions, height, width, 0.5))

    def add_candidates(self, labels: np.ndarray, accepted: np.ndarray) -> None:
        self.good += int((labels == 1).sum())
        self.good_accepted += int((accepted & (labels == 1)).sum())
        self.accepted += int((accepted & (labels >= 0)).sum())

    def cell(self) -> str:
        recall = self.matched / max(1, self.truth)
        precision = self.matched / self.predictions if self.predictions else float('nan')
        text = f'{recall:.2f} / {precision:.2f}'
        if self.good:
            kept = self.good_accepted / self.good
            share = self.good_accepted / self.accepted if self.accepted else float('nan')
            text += f' ({kept:.2f} / {share:.2f})'
        return text


def _graphene_thin(predictions: list[dict]) -> list[dict]:
    return [p for p in predictions if p.get('material') == 'graphene' and p.get('layers') is not None
            and TARGET_LAYERS[0] <= round(p['layers']) <= TARGET_LAYERS[1]]


def run(frames: int, cascades: list[tuple[str, Path]], fit: bool = True) -> list[str]:
    import tempfile

    import torch

    from flake_detector.calibrate import calibrate
    from flake_detector.cascade import Cascade, CascadeDetector
    from flake_detector.cascade_train import label_candidates, simulated_frames
    from flake_detector.evaluation import detections_to_predictions
    from flake_detector.optical import OpticalDetector
    from flake_scanner.sim.randomise import SimLook, default_look, held_out_looks, look_groups

    torch.set_num_threads(1)
    loaded = [(label, Cascade.load(path)) for label, path in cascades]
    header = (['look', 'graphene 1-10L', 'optical', 'optical, decoded'] + (['optical, flake-calibrate'] if fit else [])
              + [f'cascade {label}' for label, _ in loaded])
    work = Path(tempfile.mkdtemp(prefix='heldout-'))
    fits = []
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    notes = []
    rows = [(look.name, look.description or 'the simulator default camera, 90 nm SiO2', [(look, EVAL_SEED, frames)])
            for look in [default_look(), *held_out_looks()]]
    rows.append((f'random (seed {EVAL_SEED})', f'a new random look every 5 frames (`random_look([{EVAL_SEED}, g])`, '
                 'inside the training ranges but never drawn for training), each on its own chip',
                 look_groups(EVAL_SEED, frames, 5)))
    for name, description, groups in rows:
        started = time.perf_counter()
        optical_columns = 3 if fit else 2
        scores = [Score() for _ in range(optical_columns + len(loaded))]
        for look, wafer_seed, count in groups:
            look = look or SimLook('default')
            optical = OpticalDetector(materials=MATERIALS, oxide_nm=look.oxide_nm, calibration='auto',
                                      max_layers=10, min_area_px=40, work_size=0)
            detectors = [CascadeDetector(cascade=cascade, oxide_nm=look.oxide_nm) for _, cascade in loaded]
            response = _response(look)
            rendered = list(simulated_frames(wafer_seed, count, 1024, 0.5, 90.0, '10x', chip_mm=3.0, look=look,
                                             with_truth=True))
            calibrated = None
            if fit:
                # The lab's way: a calibration from the look's own unlabelled frames.
                try:
                    fitted = calibrate([(f'{k}.png', image) for k, (image, _, _) in enumerate(rendered)], MATERIALS,
                                       name=f'{look.name}-{wafer_seed}')
                except ValueError as exc:
                    fits.append(f'{name}: no fit ({exc})')
                else:
                    fits.append(f'{name}: oxide {fitted.report["oxide_nm"]:.0f} nm (true {look.oxide_nm:.0f}), '
                                f'gamma {fitted.report["gamma"]:.2f} (true {response.gamma:.2f})')
                    path = fitted.calibration.save(work / f'{len(fits)}.json')
                    calibrated = OpticalDetector(materials=MATERIALS, calibration=str(path), max_layers=10,
                                                 min_area_px=40, work_size=0)
            for image, objects, truth in rendered:
                h, w = image.shape[:2]
                gt = _truth_entries(truth, objects)
                result = optical.detect(image)
                scores[0].add(gt, _graphene_thin(detections_to_predictions(0, result.detections, h, w)), h, w)
                decoded = np.clip(np.round(255.0 * response.decode(image)), 0, 255).astype(np.uint8)
                result = optical.detect(decoded)
                scores[1].add(gt, _graphene_thin(detections_to_predictions(0, result.detections, h, w)), h, w)
                if calibrated is not None:
                    result = calibrated.detect(image)
                    scores[2].add(gt, _graphene_thin(detections_to_predictions(0, result.detections, h, w)), h, w)
                for score, detector in zip(scores[optical_columns:], detectors, strict=True):
                    result = detector.detect(image, truth.pixel_to_wafer)
                    score.add(gt, detections_to_predictions(0, result.detections, h, w), h, w)
                    candidates, accepted, _, _ = detector.classify(image, truth.pixel_to_wafer)
                    score.add_candidates(label_candidates(candidates, objects, detector.cascade.target), accepted)
        lines.append(f'| {name} | {scores[0].truth} | ' + ' | '.join(s.cell() for s in scores) + ' |')
        notes.append(f'- `{name}`: {description}')
        print(f'[bench] {name}: {time.perf_counter() - started:.0f} s', file=sys.stderr, flush=True)
    return lines + ['', *notes] + (['', 'Fitted by flake-calibrate: ' + '; '.join(fits) + '.'] if fits else [])


def _response(look):
    """The camera response a look renders with (the simulator's own, so decoding is exact)."""
    from flake_scanner.sim.camera import CameraModel
    from flake_scanner.sim.wafer import VirtualWafer

    wafer = VirtualWafer.generate(look.wafer_config(seed=EVAL_SEED, chip_width_m=1e-3, chip_height_m=1e-3))
    return CameraModel(wafer, look.camera_settings()).response


def main() -> int:
    from flake_detector.cascade import shipped_model

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--frames', type=int, default=30, help='frames per look (default 30)')
    parser.add_argument('--no-calibrate', action='store_true',
                        help='leave out the optical detector with a calibration fitted on the frames')
    parser.add_argument('--cascade', action='append', default=[],
                        help='LABEL=PATH of a graphene-1-10L cascade to score (default: the shipped one)')
    args = parser.parse_args()
    cascades = []
    for item in args.cascade or [f'shipped={shipped_model("graphene-1-10L")}']:
        label, _, path = item.partition('=')
        if not path or not Path(path).is_file():
            parser.error(f'--cascade wants LABEL=PATH of a weights file, got {item!r}')
        cascades.append((label, Path(path)))
    lines = [f'### Held-out cameras: recall / precision, graphene 1-10 layers, simulator seed {EVAL_SEED}, '
             f'{args.frames} frames per look (1024 x 1024, 10x)', '']
    lines += run(args.frames, cascades, not args.no_calibrate)
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
