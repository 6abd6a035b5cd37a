"""Render speed of the simulated microscope: frames/s per objective at 1024x1024 on one thread.

Prints a Markdown table. Each objective renders a short raster scan (new field of view
every frame, so nothing comes from the raster cache) and a focus sweep (same field,
varying z, as autofocus does). A last row renders at 10x through the held-out look
``all235`` (broad colour bands with 11 wavelengths each, gamma, black level, JPEG, shading,
dirt and surface texture): what a randomised training set costs per frame.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault('OMP_NUM_THREADS', '1')

import cv2  # noqa: E402

from flake_core.objectives import OBJECTIVES  # noqa: E402
from flake_scanner.sim.camera import CameraModel, CameraSettings  # noqa: E402
from flake_scanner.sim.randomise import SimLook, look_by_name  # noqa: E402
from flake_scanner.sim.wafer import VirtualWafer  # noqa: E402

FRAMES = 12


def bench_objective(name: str, look: SimLook | None = None) -> dict:
    look = look or SimLook('default')
    wafer = VirtualWafer.generate(look.wafer_config(seed=1))
    camera = CameraModel(wafer, look.camera_settings(CameraSettings(width=1024, height=1024, objective=name, seed=1)))
    fov_w, fov_h = camera.field_of_view
    # A raster scan of adjacent fields, kept on the chip.
    per_row = max(1, int(8e-3 // fov_w))
    poses = [wafer.wafer_to_stage.apply(1e-3 + fov_w * (0.5 + i % per_row), 1e-3 + fov_h * (0.5 + i // per_row))
             for i in range(FRAMES)]
    # Warm-up: thin-film colours and the cells of this strip are computed once per wafer.
    for x, y in poses:
        camera.ground_truth(x, y)
    camera.render(*poses[0])
    t0 = time.perf_counter()
    for x, y in poses:
        camera.render(x, y)
    scan_s = (time.perf_counter() - t0) / FRAMES
    x, y = poses[0]
    focus = camera.focal_plane_z(x, y)
    dof = camera.objective.depth_of_field_m
    t0 = time.perf_counter()
    for i in range(FRAMES):
        camera.render(x, y, focus + (i - FRAMES / 2) * dof)
    sweep_s = (time.perf_counter() - t0) / FRAMES
    t0 = time.perf_counter()
    for x, y in poses[:4]:
        camera.ground_truth(x, y)
    truth_s = (time.perf_counter() - t0) / 4
    if look.name != 'default':
        name = f'{name}, look {look.name}'
    return {'objective': name, 'pixel_um': camera.pixel_size * 1e6, 'fov_um': fov_w * 1e6,
            'scan_fps': 1 / scan_s, 'sweep_fps': 1 / sweep_s, 'truth_ms': truth_s * 1e3}


def main() -> None:
    cv2.setNumThreads(1)
    rows = [bench_objective(name) for name in OBJECTIVES]
    rows.append(bench_objective('10x', look_by_name('all235')))
    print('| objective | um/px | field [um] | scan fps (new field) | focus-sweep fps | ground truth [ms] |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['objective']} | {r['pixel_um']:.3f} | {r['fov_um']:.0f} | {r['scan_fps']:.1f} | "
              f"{r['sweep_fps']:.1f} | {r['truth_ms']:.0f} |")
    print(f'\n1024x1024 bgr8, one thread (cv2.setNumThreads(1)), {FRAMES} frames each, default camera settings.')


if __name__ == '__main__':
    main()
