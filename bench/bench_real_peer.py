"""The optical detector beside 2DMatGMM on its own real micrographs, image by image in one run.

2DMatGMM (Uslu et al., MIT licence; the peer a lab would pick instead) is not part of the
project: it runs in a virtual environment of its own, in a worker process that this bench
starts and feeds one image path at a time (its public ``MaterialDetector`` API, as its
documentation shows; no code of it is copied here). The two detectors take turns on each
image, several rounds, so that the machine's load falls on both alike; the table gives the
median milliseconds per image of each, CPU time of the detecting process (what a dedicated core
gives; one thread each) and wall time (what the machine delivered), and their ratios.

Both look for graphene with the same smallest size (200 px; 2DMatGMM its classes of 1-4 layers,
the optical detector up to 10) on the 8 demo
micrographs of 2DMatGMM (1920 x 1200, 20x, graphene on 90 nm SiO2); the optical detector
uses the shipped calibration measured on that microscope (``calibration measured``).
Agreement: flakes of 1-3 layers that both report with masks overlapping at IoU >= 0.5, and
how many of those get the same layer count. Overlays of both go to docs/img/.

    python3 -m venv PEER_VENV      # outside the repository (or git-ignored)
    PEER_VENV/bin/pip install numpy opencv-python-headless numba scikit-image scikit-learn joblib pycocotools
    python bench/bench_real_peer.py --peer-python PEER_VENV/bin/python [--rounds 3] [--no-overlays]
"""

from __future__ import annotations

import argparse
import json
import os

# One thread for each side (set before numpy loads its BLAS).
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
from pathlib import Path
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT.parent / 'shared' / 'data' / 'real_images_2dmatgmm'
PEER = ROOT.parent / 'shared' / 'peers' / '2DMatGMM'
IMG_DIR = ROOT / 'docs' / 'img'
SIZE_PX = 200
THIN = (1, 3)

# The worker: reads image paths on stdin, answers one JSON line per image (milliseconds, and
# per flake its layer count, false-positive probability and mask as RLE).
WORKER = r'''
import json, sys, time
import cv2, numpy as np
from pycocotools import mask as mask_utils
sys.path.insert(0, sys.argv[1])
from GMMDetector import MaterialDetector
contrast = json.load(open(sys.argv[2]))
detector = MaterialDetector(contrast_dict=contrast, size_threshold=int(sys.argv[3]),
                            standard_deviation_threshold=5, used_channels='BGR')
print(json.dumps({'ready': True}), flush=True)
for line in sys.stdin:
    image = cv2.imread(line.strip())
    t0, c0 = time.perf_counter(), time.process_time()
    flakes = detector(image)
    ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    out = []
    for flake in flakes:
        rle = mask_utils.encode(np.asfortranarray(np.asarray(flake.mask, dtype=np.uint8)))
        out.append({'layers': int(flake.thickness), 'fp': float(flake.false_positive_probability),
                    'rle': {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}})
    print(json.dumps({'ms': ms, 'cpu_ms': cpu_ms, 'flakes': out}), flush=True)
'''


class Peer:
    def __init__(self, python: str):
        self.script = Path(tempfile.mkdtemp(prefix='peer-')) / 'worker.py'
        self.script.write_text(WORKER)
        contrast = PEER / 'GMMDetector' / 'trained_parameters' / 'Graphene_GMM.json'
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'NUMBA_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
        self.process = subprocess.Popen([python, str(self.script), str(PEER), str(contrast), str(SIZE_PX)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = self.process.stdout.readline()
        if not ready:
            raise SystemExit('the 2DMatGMM worker did not start (check --peer-python and its packages)')

    def detect(self, path: Path) -> dict:
        self.process.stdin.write(f'{path}\n')
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _mask(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({'size': rle['size'], 'counts': rle['counts'].encode('ascii')}).astype(bool)


def _agreement(ours: list, theirs: list) -> tuple[int, int, int, int]:
    """Thin flakes each reports, how many both report (IoU >= 0.5), and with the same layers."""
    ours = [(m, n) for m, n in ours if THIN[0] <= n <= THIN[1]]
    theirs = [(m, n) for m, n in theirs if THIN[0] <= n <= THIN[1]]
    both = same = 0
    taken = set()
    for mask, layers in ours:
        best, best_iou = None, 0.5
        for j, (other, _) in enumerate(theirs):
            if j in taken:
                continue
            iou = (mask & other).sum() / max(1, (mask | other).sum())
            if iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            taken.add(best)
            both += 1
            same += layers == theirs[best][1]
    return len(ours), len(theirs), both, same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--peer-python', default=os.environ.get('FLAKE_PEER_PYTHON', ''),
                        help="python of the peer's virtual environment (or FLAKE_PEER_PYTHON)")
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds over the images')
    parser.add_argument('--work-size', type=int, default=960,
                        help='long side the optical detector segments at (0: full resolution)')
    parser.add_argument('--no-overlays', action='store_true')
    args = parser.parse_args()
    files = sorted(IMAGES.glob('*.jpg'))
    if not files or not PEER.is_dir():
        print(f'(no peer or no images: {PEER}, {IMAGES})')
        return 0
    if not args.peer_python:
        parser.error('give --peer-python (the python of a virtual environment with the peer\'s packages)')
    from flake_detector.optical import OpticalDetector

    cv2.setNumThreads(1)
    ours = OpticalDetector(materials='graphene', calibration='measured', max_layers=10, min_area_px=SIZE_PX,
                           work_size=args.work_size)
    peer = Peer(args.peer_python)
    times = {f: ([], [], [], []) for f in files}  # optical wall, peer wall, optical CPU, peer CPU
    results = {}
    for round_ in range(args.rounds + 1):  # round 0 warms both up (numba compiles on first use)
        for path in files:
            image = cv2.imread(str(path))
            t0, c0 = time.perf_counter(), time.process_time()
            found = ours.detect(image)
            ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
            theirs = peer.detect(path)
            if round_:
                for series, value in zip(times[path], (ms, theirs['ms'], cpu_ms, theirs['cpu_ms'])):
                    series.append(value)
            results[path] = (image, found, theirs)
    peer.close()
    lines = ['### The optical detector beside 2DMatGMM (its 8 micrographs, graphene, 1920 x 1200)', '',
             f'{args.rounds} interleaved rounds; optical detector at work size {args.work_size or "full"}, '
             f'both with flakes of at least {SIZE_PX} px.', '',
             '| image | optical ms CPU (wall) | 2DMatGMM ms CPU (wall) | ratio CPU (wall) | optical: thin flakes | '
             '2DMatGMM: thin flakes | both (IoU >= 0.5) | same layers | overlay |',
             '|---|---|---|---|---|---|---|---|---|']
    total = np.zeros(4, int)
    ours_ms, theirs_ms, ours_cpu, theirs_cpu = [], [], [], []
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(files):
        image, found, theirs = results[path]
        h, w = image.shape[:2]
        our_flakes = [(d.full_mask((h, w)), int(round(d.layers))) for d in found.detections
                      if d.material == 'graphene' and d.score >= 0.5]
        their_flakes = [(_mask(f['rle']), f['layers']) for f in theirs['flakes'] if f['fp'] < 0.5]
        counts = _agreement(our_flakes, their_flakes)
        total += counts
        mine, peer_ms, mine_cpu, peer_cpu = (float(np.median(series)) for series in times[path])
        ours_ms.append(mine)
        theirs_ms.append(peer_ms)
        ours_cpu.append(mine_cpu)
        theirs_cpu.append(peer_cpu)
        name = f'peer_{k}.jpg'
        if not args.no_overlays:
            overlay = image.copy()
            for mask, _ in their_flakes:
                contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(overlay, contours, -1, (255, 0, 255), 5)
            for mask, layers in our_flakes:
                contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(overlay, contours, -1, (0, 255, 255), 2)
                x, y = contours[0][0][0] if contours else (0, 0)
                cv2.putText(overlay, f'{layers}L', (int(x), max(12, int(y) - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.8,
                            (0, 255, 255), 2, cv2.LINE_AA)
            cv2.putText(overlay, 'yellow: optical detector, magenta: 2DMatGMM (image: 2DMatGMM, MIT)', (10, h - 12),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2, cv2.LINE_AA)
            small = cv2.resize(overlay, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(IMG_DIR / name), small, [cv2.IMWRITE_JPEG_QUALITY, 80])
        lines.append(f'| {path.name[:8]} | {mine_cpu:.0f} ({mine:.0f}) | {peer_cpu:.0f} ({peer_ms:.0f}) | '
                     f'{peer_cpu / mine_cpu:.2f} ({peer_ms / mine:.2f}) | {counts[0]} | {counts[1]} | {counts[2]} | '
                     f'{counts[3]} | ![](img/{name}) |')
    mine, peer_ms, mine_cpu, peer_cpu = (float(np.median(v)) for v in (ours_ms, theirs_ms, ours_cpu, theirs_cpu))
    lines.append(f'| median | {mine_cpu:.0f} ({mine:.0f}) | {peer_cpu:.0f} ({peer_ms:.0f}) | '
                 f'{peer_cpu / mine_cpu:.2f} ({peer_ms / mine:.2f}) | {total[0]} | {total[1]} | {total[2]} | '
                 f'{total[3]} | |')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
