"""Few-shot Mask R-CNN on the real NbSe2 micrographs: the class-agnostic network fine-tuned on
the labels of at most five images of one flake, scored on the images of every other flake.

Data and scoring as ``bench_real_nbse2.py`` (48 JPEGs at 150x from the flakedetectron project,
GPL-3.0; held out by flake name, never by image; mask IoU >= 0.5, one to one). Every
detection counts as a flake (the network has one class); layer labels come from the
optical estimator with the zero-shot ``flake-calibrate`` file of the same images. Rows:
the shipped network before fine-tuning (zero-shot) and after, per fold and pooled.

    python bench/bench_real_nbse2_maskrcnn.py [--folds N | --fold flake2] [--steps 600] [--input-scale 0.3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import re
import sys
import tempfile
import time

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_real_nbse2 as real  # noqa: E402

# 150x frames into a network trained on simulated 10x frames: flakes of the size it learned.
INPUT_SCALE = 0.3


def labelled_coco(gt: dict, paths: dict, ids: list[int], folder: Path) -> Path:
    """A COCO file of images ``ids`` (absolute file names) with their labels."""
    chosen = set(ids)
    coco = {'images': [{**im, 'file_name': str(paths[im['id']])} for im in gt['images'] if im['id'] in chosen],
            'annotations': [a for a in gt['annotations'] if a['image_id'] in chosen],
            'categories': gt['categories']}
    path = folder / f'labels_{len(list(folder.glob("labels_*.json")))}.json'
    path.write_text(json.dumps(coco))
    return path


def detect(model_path, calibration: Path, paths: dict, ids, score_threshold: float, input_scale: float,
           threads: int) -> tuple[list[dict], float]:
    from flake_detector.evaluation import detections_to_predictions
    from flake_detector.maskrcnn.infer import MaskRCNNDetector

    detector = MaskRCNNDetector(model_path=model_path, materials=real.MATERIAL, calibration=str(calibration),
                                input_scale=input_scale, score_threshold=score_threshold, threads=threads)
    predictions, seconds = [], 0.0
    for image_id in ids:
        image = cv2.imread(str(paths[image_id]))
        started = time.perf_counter()
        found = detector.detect(image).detections
        seconds += time.perf_counter() - started
        predictions += detections_to_predictions(image_id, found, image.shape[0], image.shape[1])
    for prediction in predictions:
        prediction['material'] = real.MATERIAL  # one class: every detection is a flake here
    return predictions, seconds / max(1, len(ids))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--folds', type=int, default=3, help='flake names to hold out in turn (default 3)')
    parser.add_argument('--fold', default=None, help='only this flake name (e.g. flake2), to run folds side by side')
    parser.add_argument('--steps', type=int, default=600)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--score', type=float, default=0.5, help='score cut of the detections')
    parser.add_argument('--input-scale', type=float, default=INPUT_SCALE,
                        help=f'model pixels per image pixel (default {INPUT_SCALE})')
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    if not real.DATA.is_dir():
        print(f'(no NbSe2 micrographs in {real.DATA})')
        return 0
    from flake_detector.calibrate import ImageFiles, calibrate
    from flake_detector.maskrcnn.finetune import finetune

    gt, paths = real.load()
    ids = sorted(paths)
    names = {i: real.flake_name(paths[i].name) for i in ids}
    work = Path(tempfile.mkdtemp(prefix='nbse2-maskrcnn-'))
    calibration = work / 'zero.json'
    calibrate(ImageFiles(paths[i] for i in ids), (real.MATERIAL,), name='nbse2-zero-shot').calibration.save(calibration)
    groups = sorted(set(names.values()), key=lambda n: int(re.sub(r'\D', '', n) or 0))[:args.folds]
    if args.fold:
        if args.fold not in names.values():
            parser.error(f'no flake named {args.fold!r}; names: {", ".join(sorted(set(names.values())))}')
        groups = [args.fold]
    lines = ['| run | flakes | detections | found | recall | precision | layer label right | fine-tuning CPU s '
             '| ms per image |', '|---|---|---|---|---|---|---|---|---|']
    pooled = {'before': [0, 0, 0], 'after': [0, 0, 0]}
    for group in groups:
        labelled = [i for i in ids if names[i] == group][:5]
        held = [i for i in ids if names[i] != group]
        coco = labelled_coco(gt, paths, labelled, work)
        before, ms_before = detect('', calibration, paths, held, args.score, args.input_scale, args.threads)
        m_before = real.score(gt, before, held)
        started = time.process_time()
        model = finetune([str(coco)], str(work / f'{group}.pt'), steps=args.steps, lr=args.lr,
                         input_scale=args.input_scale, material=real.MATERIAL, threads=args.threads,
                         log=lambda text, fold=group: print(f'[bench] {fold}: {text}', file=sys.stderr, flush=True))
        cpu = time.process_time() - started
        after, ms_after = detect(model, calibration, paths, held, args.score, args.input_scale, args.threads)
        m_after = real.score(gt, after, held)
        lines.append(real._row(f'shipped network, scored on the {len(held)} images not of {group}', m_before, '-',
                               1e3 * ms_before))
        lines.append(real._row(f'fine-tuned on {len(labelled)} images of {group}, same {len(held)} images',
                               m_after, f'{cpu:.0f}', 1e3 * ms_after))
        for key, m in (('before', m_before), ('after', m_after)):
            pooled[key][0] += m['flakes']
            pooled[key][1] += m['detections']
            pooled[key][2] += m['matched']
    for key, (flakes, detections, matched) in pooled.items():
        recall = matched / max(1, flakes)
        precision = matched / detections if detections else 0.0
        label = 'shipped network' if key == 'before' else 'fine-tuned'
        lines.append(f'| {label}, pooled over {len(groups)} held-out folds | {flakes} | {detections} | {matched} | '
                     f'{recall:.2f} | {precision:.2f} | - | - | - |')
    print(f'### Few-shot Mask R-CNN on the real NbSe2 micrographs ({args.steps} steps at lr {args.lr:g}, '
          f'input scale {args.input_scale:g}, score >= {args.score})\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
