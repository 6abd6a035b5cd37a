"""Thin-film interference colours of flakes on SiO2/Si (transfer-matrix method).

The stack is air / film / SiO2 / Si at normal incidence. Each camera channel is a
band of wavelengths (Gaussian weights) given by a ``SpectralResponse``; the default,
``DEFAULT_RESPONSE``, has bands around 460 nm (B), 535 nm (G) and 610 nm (R). The
channel reflectance is the weighted mean of the ``tmm`` reflectance over the band.
Every band function takes the response as ``response=`` (``flake_core.camera_response``
describes a whole camera around it).

Every array of three channel values in this module is in **B, G, R order**, the
order of the bgr8 images the camera renders.

Contrast is ``C = (R_film - R_substrate) / R_substrate`` (negative = darker). A
measured calibration (``flake_core.calibration``) replaces the model's contrast for the
layer counts it covers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
import functools
import math

import numpy as np
import numpy.typing as npt
import tmm

from flake_core import materials

CHANNELS = ('b', 'g', 'r')
# Centre and 1-sigma width of each camera channel's band [nm], B, G, R order.
CHANNEL_CENTRES_NM = (460.0, 535.0, 610.0)
CHANNEL_WIDTHS_NM = (20.0, 22.0, 22.0)
BAND_SAMPLES = 5
OXIDE_THICKNESSES_NM = (90.0, 285.0)

# n + ik at 450 / 550 / 650 nm, interpolated linearly in wavelength between the three anchor
# points and held flat outside. Flake materials come from flake_core.materials; the substrate
# and the tape residue are media of the stack, not flakes.
_ANCHOR_NM = np.array([450.0, 550.0, 650.0])
MEDIA = {
    'si': (4.69 + 0.086j, 4.08 + 0.028j, 3.84 + 0.014j),  # Green 2008
    'sio2': (1.466 + 0j, 1.460 + 0j, 1.457 + 0j),  # Malitson 1965
    # Adhesive left by exfoliation tape: a weakly dispersive polymer film.
    'residue': (1.50 + 0.002j, 1.49 + 0.001j, 1.48 + 0.001j),
}
REFRACTIVE_INDEX = {**MEDIA, **{m.name: m.refractive_index for m in materials.MATERIALS.values()}}
# Interlayer spacing [nm] of the layered materials.
LAYER_THICKNESS_NM = {m.name: m.layer_nm for m in materials.MATERIALS.values()}
MATERIALS = materials.FLAKE_MATERIALS


def channel_floats(values: Iterable[float]) -> tuple[float, float, float]:
    """One plain float per channel (B, G, R): the form of cache keys and JSON. ValueError unless three."""
    blue, green, red = (float(v) for v in values)
    return blue, green, red


def _check_material(material: str) -> str:
    key = material.lower()
    if key not in REFRACTIVE_INDEX or key in ('si', 'sio2'):
        known = ', '.join(sorted(set(REFRACTIVE_INDEX) - {'si', 'sio2'}))
        raise ValueError(f'unknown material {material!r}; known: {known}')
    return key


def layer_thickness_nm(material: str) -> float:
    """Thickness of one layer [nm] of a layered material."""
    key = _check_material(material)
    if key not in LAYER_THICKNESS_NM:
        raise ValueError(f'{material!r} is not a layered material')
    return LAYER_THICKNESS_NM[key]


def refractive_index(material: str, wavelength_nm: float) -> complex:
    """Complex refractive index n + ik of a stack material at one wavelength."""
    key = material.lower()
    if key not in REFRACTIVE_INDEX:
        raise ValueError(f'unknown material {material!r}')
    values = np.array(REFRACTIVE_INDEX[key])
    n = np.interp(wavelength_nm, _ANCHOR_NM, values.real)
    k = np.interp(wavelength_nm, _ANCHOR_NM, values.imag)
    return complex(n, k)


@dataclass(frozen=True)
class SpectralResponse:
    """The camera's three channels as Gaussian bands: centre and 1-sigma width [nm], B, G, R
    order. Each band is sampled at ``samples`` wavelengths over +-1.5 sigma; wide bands
    (sigma above about 30 nm) want 7-9 samples so that thin-film fringes are resolved."""

    centres_nm: tuple[float, float, float] = CHANNEL_CENTRES_NM
    widths_nm: tuple[float, float, float] = CHANNEL_WIDTHS_NM
    samples: int = BAND_SAMPLES

    def __post_init__(self) -> None:
        centres = tuple(float(v) for v in self.centres_nm)
        widths = tuple(float(v) for v in self.widths_nm)
        if len(centres) != 3 or len(widths) != 3:
            raise ValueError('a spectral response has three channels (B, G, R)')
        if not all(math.isfinite(c) and 300.0 <= c <= 1000.0 for c in centres):
            raise ValueError(f'channel centres must lie within 300..1000 nm, got {centres}')
        if not all(math.isfinite(w) and 1.0 <= w <= 150.0 for w in widths):
            raise ValueError(f'channel widths must lie within 1..150 nm, got {widths}')
        if not (isinstance(self.samples, int | np.integer) and 1 <= self.samples <= 101):
            raise ValueError(f'samples per band must be an integer within 1..101, got {self.samples}')
        # Plain floats: responses are cache keys and go to JSON.
        object.__setattr__(self, 'centres_nm', centres)
        object.__setattr__(self, 'widths_nm', widths)
        object.__setattr__(self, 'samples', int(self.samples))

    def bands(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Wavelengths (3, samples) [nm] and normalised weights (3, samples) of the B, G, R bands."""
        offsets = np.linspace(-1.5, 1.5, self.samples)
        weights = np.exp(-0.5 * offsets ** 2)
        weights = weights / weights.sum()
        wavelengths = np.stack([centre + width * offsets
                                for centre, width in zip(self.centres_nm, self.widths_nm, strict=True)])
        return wavelengths, np.stack([weights] * 3)


DEFAULT_RESPONSE = SpectralResponse()


def _indices(material: str, wavelengths_nm: npt.NDArray[np.float64]) -> npt.NDArray[np.complex128]:
    values = np.array(REFRACTIVE_INDEX[material], dtype=np.complex128)
    return (np.interp(wavelengths_nm, _ANCHOR_NM, values.real)
            + 1j * np.interp(wavelengths_nm, _ANCHOR_NM, values.imag))


def tmm_reflectance(film: str | None, film_nm: float, oxide_nm: float, wavelength_nm: float) -> float:
    """Reflectance of air/film/SiO2/Si at one wavelength from the ``tmm`` package (the reference)."""
    n_si = refractive_index('si', wavelength_nm)
    n_ox = refractive_index('sio2', wavelength_nm)
    if film is None or film_nm <= 0:
        n_list, d_list = [1.0, n_ox, n_si], [np.inf, oxide_nm, np.inf]
    else:
        n_film = refractive_index(film, wavelength_nm)
        n_list, d_list = [1.0, n_film, n_ox, n_si], [np.inf, film_nm, oxide_nm, np.inf]
    return float(tmm.coh_tmm('s', n_list, d_list, 0.0, wavelength_nm)['R'])


def stack_reflectance(film: str | None, film_nm: npt.ArrayLike, oxide_nm: float,
                      wavelength_nm: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Reflectance of air/film/SiO2/Si at normal incidence, vectorised over thickness and wavelength.

    The same characteristic-matrix (transfer-matrix) product that ``tmm.coh_tmm`` evaluates one
    wavelength at a time; tests hold the two equal. Arrays broadcast against each other.
    """
    lam = np.asarray(wavelength_nm, dtype=np.float64)
    n_ox, n_si = _indices('sio2', lam), _indices('si', lam)

    def layer(n: npt.NDArray[np.complex128], d: float | npt.NDArray[np.float64]
              ) -> tuple[npt.NDArray[np.complex128], ...]:
        """The characteristic matrix (a, b, c, d) of a film of index ``n`` and thickness ``d`` [nm]."""
        delta = 2.0 * np.pi * n * d / lam
        cos, sin = np.cos(delta), np.sin(delta)
        return cos, -1j * sin / n, -1j * n * sin, cos

    a, b, c, d = layer(n_ox, oxide_nm)
    if film is not None:
        d_film = np.asarray(film_nm, dtype=np.float64)
        fa, fb, fc, fd = layer(_indices(film, lam), d_film)
        a, b, c, d = fa * a + fb * c, fa * b + fb * d, fc * a + fd * c, fc * b + fd * d
    big_b, big_c = a + b * n_si, c + d * n_si
    return np.abs((big_b - big_c) / (big_b + big_c)) ** 2


def band_reflectance(film: str | None, film_nm: npt.ArrayLike, oxide_nm: float,
                     response: SpectralResponse = DEFAULT_RESPONSE) -> npt.NDArray[np.float64]:
    """Band reflectance (..., 3) in B, G, R order for film thicknesses ``film_nm`` (any shape),
    seen through the channels of ``response``."""
    wavelengths, weights = response.bands()
    thickness = np.asarray(film_nm, dtype=np.float64)[..., None, None]
    # numpy's stubs type a reduction along an axis as Any.
    reflectance: npt.NDArray[np.float64] = (stack_reflectance(film, thickness, oxide_nm, wavelengths)
                                            * weights).sum(axis=-1)
    return reflectance


@functools.lru_cache(maxsize=8192)
def _reflectance_cached(film: str | None, film_nm: float, oxide_nm: float,
                        response: SpectralResponse) -> tuple[float, float, float]:
    return channel_floats(band_reflectance(film, film_nm if film else 0.0, oxide_nm, response))


def _check_oxide(oxide_nm: float) -> float:
    oxide_nm = float(oxide_nm)
    if not (math.isfinite(oxide_nm) and 0.0 <= oxide_nm <= 2000.0):
        raise ValueError(f'oxide thickness must be within 0..2000 nm, got {oxide_nm}')
    return round(oxide_nm, 1)


def substrate_reflectance(oxide_nm: float,
                          response: SpectralResponse = DEFAULT_RESPONSE) -> npt.NDArray[np.float64]:
    """Band reflectance (B, G, R) of bare SiO2/Si."""
    return np.array(_reflectance_cached(None, 0.0, _check_oxide(oxide_nm), response))


def film_reflectance(material: str, thickness_nm: float, oxide_nm: float,
                     response: SpectralResponse = DEFAULT_RESPONSE) -> npt.NDArray[np.float64]:
    """Band reflectance (B, G, R) of a film of ``thickness_nm`` on SiO2/Si (model only)."""
    key = _check_material(material)
    if not (math.isfinite(thickness_nm) and thickness_nm >= 0):
        raise ValueError(f'film thickness must be a non-negative number, got {thickness_nm}')
    # 0.01 nm steps keep the cache small without visibly changing any colour.
    return np.array(_reflectance_cached(key, round(float(thickness_nm), 2), _check_oxide(oxide_nm), response))


def model_contrast(material: str, thickness_nm: float, oxide_nm: float,
                   response: SpectralResponse = DEFAULT_RESPONSE) -> npt.NDArray[np.float64]:
    """Model contrast (B, G, R) of a film ``thickness_nm`` thick."""
    sub = substrate_reflectance(oxide_nm, response)
    return film_reflectance(material, thickness_nm, oxide_nm, response) / sub - 1.0


def __getattr__(name: str) -> object:
    # Calibrations (measured classes, the simulator's OpticsModel) moved to flake_core.calibration,
    # the one calibration format; these names forward there for the simulator until it imports it.
    if name in ('OpticsModel', 'default_model', 'flake_contrast'):
        from flake_core import calibration

        return getattr(calibration, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
