"""Microscope objectives: magnification, numerical aperture, working distance, and what
follows from them (depth of field, defocus blur). Used by the camera, the autofocus, the scan
coordinator and the simulated microscope alike."""

from __future__ import annotations

from dataclasses import dataclass
import math

_WAVELENGTH_M = 550e-9


@dataclass(frozen=True)
class Objective:
    name: str
    magnification: float
    numerical_aperture: float
    working_distance_m: float

    @property
    def depth_of_field_m(self) -> float:
        """Wave-optical depth of field lambda / NA^2 (green light, in air)."""
        return _WAVELENGTH_M / self.numerical_aperture ** 2

    @property
    def diffraction_sigma_m(self) -> float:
        """Gaussian sigma of the in-focus point spread (0.21 lambda / NA, green light)."""
        return 0.21 * _WAVELENGTH_M / self.numerical_aperture

    @property
    def defocus_blur_per_m(self) -> float:
        """Radius of the geometric blur disc per metre of defocus."""
        return math.tan(math.asin(self.numerical_aperture))


OBJECTIVES: dict[str, Objective] = {
    '5x': Objective('5x', 5.0, 0.15, 23.5e-3),
    '10x': Objective('10x', 10.0, 0.30, 17.5e-3),
    '20x': Objective('20x', 20.0, 0.45, 4.5e-3),
    '50x': Objective('50x', 50.0, 0.80, 1.0e-3),
    '100x': Objective('100x', 100.0, 0.90, 1.0e-3),
    '150x': Objective('150x', 150.0, 0.90, 1.0e-3),
}


def objective_by_name(name: str) -> Objective:
    key = str(name).lower()
    if key not in OBJECTIVES:
        raise ValueError(f'unknown objective {name!r}; choose one of {", ".join(OBJECTIVES)}')
    return OBJECTIVES[key]
