"""Bench of the contrast detector on flakes that clip the camera: MoS2 from 8 layers on
90 nm SiO2 is brighter than the camera's full scale in two or three channels at the
demo's exposure.

Frames tile a region of a simulated chip (10x, 1024 x 1024, 15 % overlap) and are scored
like `make demo` scores its registry (flake_scanner.demo.metrics: targets of 1-40 layers
and at least 20 um^2, a detection matches the true flake its centre lies in), with the
rim-direction measurement of clipped regions off (what the detector did before) and on,
in one run on the same frames:

- the demo region (seed 7, 1-4 x 2-5 mm) at the demo's exposure (10 ms);
- a fresh seed (11, 0.5-3 x 0.5-3 mm) at 10 ms;
- the demo region at 5 ms, where MoS2 of 8-40 layers keeps its red channel.

Detections are per frame (a flake seen in two frames counts twice in `found`, as in a
registry without merging), so precision is per detection.

    python bench/bench_optical_clipped.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

MATERIALS = ('graphene', 'hbn', 'mos2', 'wte2')
CASES = (('demo region, seed 7, 10 ms', 7, (1.0, 2.0, 4.0, 5.0), 0.01),
         ('fresh seed 11, 10 ms', 11, (0.5, 0.5, 3.0, 3.0), 0.01),
         ('demo region, seed 7, 5 ms', 7, (1.0, 2.0, 4.0, 5.0), 0.005))


def tiled_frames(seed: int, region_mm, exposure_s: float, quick: bool):
    """(wafer, region [m], [(bgr, pixel_to_wafer)]) over the region, as a scan would take them."""
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.wafer import VirtualWafer

    region = tuple(v * 1e-3 for v in region_mm)
    if quick:
        region = (region[0], region[1], region[0] + 1e-3, region[1] + 1e-3)
    wafer = VirtualWafer.generate(seed=seed, oxide_nm=90.0)
    camera = CameraModel(wafer, CameraSettings(exposure_s=exposure_s, seed=seed))
    fw, fh = camera.field_of_view
    xs = np.arange(region[0] + 0.45 * fw, region[2] + fw / 2, 0.85 * fw)
    ys = np.arange(region[1] + 0.45 * fh, region[3] + fh / 2, 0.85 * fh)
    frames = []
    for wy in ys:
        for wx in xs:
            x, y = wafer.wafer_to_stage.apply(float(wx), float(wy))
            frames.append((camera.render(x, y), camera.pixel_to_wafer(x, y)))
    return wafer, region, frames


def score(detector, wafer, region, frames):
    from flake_scanner.demo.metrics import FoundFlake, score_scan, targets_in_region

    found = []
    started = time.process_time()
    for image, to_wafer in frames:
        for d in detector.detect(image).detections:
            vs, us = np.nonzero(d.mask)
            centre = to_wafer.apply(float(d.bbox[0] + us.mean()), float(d.bbox[1] + vs.mean()))
            found.append(FoundFlake(str(len(found)), d.material, '', (float(centre[0]), float(centre[1])), 0.0))
    cpu = time.process_time() - started
    truth, too_small = targets_in_region(wafer, *region)
    return score_scan(found, truth, region=region, ignored=too_small), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='1 x 1 mm of each region (a smoke run)')
    args = parser.parse_args()
    import cv2
    import torch

    from flake_detector.detection import make_detector

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    detectors = {'off': make_detector('contrast', materials=','.join(MATERIALS), work_size=0, rim_direction=False),
                 'on': make_detector('contrast', materials=','.join(MATERIALS), work_size=0)}
    for title, seed, region_mm, exposure in CASES:
        wafer, region, frames = tiled_frames(seed, region_mm, exposure, args.quick)
        scores = {name: score(detector, wafer, region, frames) for name, detector in detectors.items()}
        print(f'\n#### {title}: {len(frames)} frames; rim direction off -> on\n')
        print('| material | found | true | precision | recall | thin (1-10 layers) found |')
        print('|---|---|---|---|---|---|')
        for material in MATERIALS:
            off, on = (scores[name][0].per_material[material] for name in ('off', 'on'))
            print(f'| {material} | {off.found} -> {on.found} | {on.true} | {off.precision:.2f} -> {on.precision:.2f} '
                  f'| {off.recall:.2f} -> {on.recall:.2f} | {off.thin_matched}/{off.thin_true} -> '
                  f'{on.thin_matched}/{on.thin_true} |')
        per_frame = {name: 1e3 * cpu / len(frames) for name, (_, cpu) in scores.items()}
        print(f'\nCPU per frame: {per_frame["off"]:.0f} ms off, {per_frame["on"]:.0f} ms on')


if __name__ == '__main__':
    main()
