"""Small seeded synthetic micrographs for the detector tests.

Flakes are random polygons whose colour is the substrate times (1 + thin-film
contrast) of their layer count, on a vignetted substrate with camera noise, plus
dust specks and thin residue lines that a detector must not report. The full
simulated microscope lives in flake_scanner.sim; these frames keep unit tests
fast and independent of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from flake_detector.optical import thin_film_contrast

SUBSTRATE_BGR = np.array([150.0, 120.0, 135.0])


@dataclass
class TruthFlake:
    mask: np.ndarray  # bool, frame-sized
    material: str
    layers: int
    centre: tuple[float, float]  # (u, v) px


def random_polygon(rng: np.random.Generator, centre, radius: float) -> np.ndarray:
    count = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = radius * rng.uniform(0.6, 1.0, count)
    return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)


def make_frame(seed: int, size: int = 256, flakes=(('graphene', 1), ('graphene', 2), ('graphene', 3)),
               oxide_nm: float = 90.0, noise: float = 2.0, clutter: bool = True, radius=(14, 30),
               brightness: float = 1.0):
    """Return (bgr uint8 image, [TruthFlake]) with the flakes spread over the frame."""
    rng = np.random.default_rng(seed)
    vv, uu = np.mgrid[0:size, 0:size].astype(np.float64)
    r2 = ((uu - size / 2) ** 2 + (vv - size / 2) ** 2) / (size / 2) ** 2
    substrate = SUBSTRATE_BGR * rng.uniform(0.85, 1.15) * brightness
    background = substrate[None, None, :] * (1.0 - 0.08 * r2)[..., None]
    image = background.copy()
    truths: list[TruthFlake] = []
    cells = int(np.ceil(np.sqrt(len(flakes) + (3 if clutter else 0))))
    slots = rng.permutation(cells * cells)
    pitch = size / cells
    for k, (material, layers) in enumerate(flakes):
        row, col = divmod(int(slots[k]), cells)
        centre = ((col + 0.5) * pitch + rng.uniform(-0.1, 0.1) * pitch,
                  (row + 0.5) * pitch + rng.uniform(-0.1, 0.1) * pitch)
        rad = min(rng.uniform(*radius), 0.42 * pitch)
        poly = random_polygon(rng, centre, rad)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        mask = mask.astype(bool)
        c_rgb = np.array(thin_film_contrast(material, int(layers), oxide_nm))
        image[mask] = background[mask] * (1.0 + c_rgb[::-1])
        vs, us = np.nonzero(mask)
        truths.append(TruthFlake(mask, material, int(layers), (float(us.mean()), float(vs.mean()))))
    if clutter:
        for k in range(len(flakes), min(len(flakes) + 3, cells * cells)):
            row, col = divmod(int(slots[k]), cells)
            cx, cy = (col + 0.5) * pitch, (row + 0.5) * pitch
            if k % 2 == 0:  # dust: small, very dark speck
                cv2.circle(image, (int(cx), int(cy)), int(rng.integers(2, 4)), (30.0, 30.0, 30.0), -1)
            else:  # tape residue: thin bluish line
                end = (int(cx + rng.uniform(-0.4, 0.4) * pitch), int(cy + rng.uniform(-0.4, 0.4) * pitch))
                cv2.line(image, (int(cx - 0.3 * pitch), int(cy)), end, (200.0, 140.0, 110.0), 2)
    image = cv2.GaussianBlur(image, (0, 0), 0.8)
    image += rng.normal(0.0, noise, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), truths


def sim_frames(seed: int, count: int, size: int = 512, thin_fraction: float = 0.6, oxide_nm: float = 90.0,
               objective: str = '10x', chip_mm: float = 2.0, **wafer_overrides):
    """``count`` frames of the simulated microscope, each centred near a flake: (bgr, FrameTruth)."""
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    wafer = VirtualWafer.generate(WaferConfig(seed=seed, oxide_nm=oxide_nm, thin_fraction=thin_fraction,
                                              chip_width_m=chip_mm * 1e-3, chip_height_m=chip_mm * 1e-3,
                                              **wafer_overrides))
    camera = CameraModel(wafer, CameraSettings(width=size, height=size, objective=objective, seed=seed))
    rng = np.random.default_rng(seed)
    flakes = [o for o in wafer.flakes() if 0.1e-3 < o.centre[0] < (chip_mm - 0.1) * 1e-3
              and 0.1e-3 < o.centre[1] < (chip_mm - 0.1) * 1e-3]
    for index in rng.permutation(len(flakes))[:count]:
        x, y = wafer.wafer_to_stage.apply(*flakes[int(index)].centre)
        yield camera.render(x, y), camera.ground_truth(x, y)
