"""A microscope camera: from the band reflectance of the sample to the digital numbers of an
image, and back.

``CameraResponse`` describes what a colour camera on a reflected-light microscope does to
light, with a handful of parameters a calibration can fit from a lab's own images. Per
channel c (B, G, R order throughout, like bgr8 images):

1. **Band reflectance** ``R_c``: the thin-film reflectance of the sample averaged over the
   channel's band (``flake_core.optics.band_reflectance(..., response=camera.spectral)``).
   The bands are Gaussians with a centre and a width per channel: the sensor's colour
   filters times the lamp's spectrum within the band (a lamp's slope across one band moves
   the effective centre by a few nm, which the centres absorb).
2. **Linear signal** (a fraction of full scale):
   ``linear_c = exposure * lamp_c * white_balance_c * R_c``. ``lamp_c`` is the power of a
   black-body lamp at ``lamp_temperature_k`` in band c relative to the green band;
   ``white_balance_c`` the camera's per-channel gains (``None``: neutral for the lamp, a
   grey card reads grey); ``exposure`` folds exposure time, gain and lamp brightness into
   one number.
3. **Encoding**: ``DN_c = black + (255 - black) * clip(linear_c, 0, 1) ** (1 / gamma)``, an
   8-bit value with a black level (pedestal) and a gamma curve (1: a linear camera, whose
   contrasts are physical; 2.2: like sRGB).
4. **JPEG** at ``jpeg_quality`` (0: none). Lossy: the only step with no inverse.

Steps 2-3 are ``to_digital`` and invert exactly below full scale (``to_reflectance``); a
digital number at 255 says only that the reflectance is at least the full-scale value.
From images alone only the product ``exposure * lamp_c * white_balance_c``
(``channel_gain``) can be known: a fit should hold ``lamp_temperature_k`` and fit
``white_balance`` and ``exposure`` (or the three gains directly, ``with_channel_gain``).

``random_camera(seed)`` draws a plausible camera for training (``CameraRanges``); intervals
listed in ``HELD_OUT`` are never drawn unless asked, so that cameras inside them stay
unseen by every model trained on the randomiser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from flake_core import optics

FULL_SCALE_DN = 255.0
# Second radiation constant h c / k [m K].
_C2 = 1.4388e-2


def lamp_band_power(temperature_k: float, spectral: optics.SpectralResponse = optics.DEFAULT_RESPONSE
                    ) -> npt.NDArray[np.float64]:
    """Power of a black-body lamp at ``temperature_k`` in each band (B, G, R), relative to green."""
    if not (math.isfinite(temperature_k) and 1000.0 <= temperature_k <= 20000.0):
        raise ValueError(f'lamp temperature must lie within 1000..20000 K, got {temperature_k}')
    wavelengths, weights = spectral.bands()
    lam = wavelengths * 1e-9
    radiance = lam ** -5 / np.expm1(_C2 / (lam * temperature_k))
    power = (radiance * weights).sum(axis=1)
    relative: npt.NDArray[np.float64] = power / power[1]    # numpy's stubs type a reduction as Any
    return relative


def white_balance_for(temperature_k: float, spectral: optics.SpectralResponse = optics.DEFAULT_RESPONSE
                      ) -> tuple[float, float, float]:
    """White-balance gains (B, G, R; green 1) that make a black body at ``temperature_k`` read grey:
    what a camera's white-balance setting of that colour temperature does."""
    return optics.channel_floats(1.0 / lamp_band_power(temperature_k, spectral))


@dataclass(frozen=True)
class CameraResponse:
    """One camera on one microscope; see the module text for the model. Frozen and
    hashable; ``replace(camera, gamma=2.2)`` or ``camera.with_changes(...)`` for variants."""

    channel_centres_nm: tuple[float, float, float] = optics.CHANNEL_CENTRES_NM
    channel_widths_nm: tuple[float, float, float] = optics.CHANNEL_WIDTHS_NM
    band_samples: int = optics.BAND_SAMPLES
    lamp_temperature_k: float = 3200.0
    # Per-channel gains (B, G, R); None: neutral for the lamp.
    white_balance: tuple[float, float, float] | None = None
    # Linear signal per unit reflectance (before lamp colour and white balance) [fraction of full scale].
    exposure: float = 1.0
    black_level_dn: float = 0.0
    gamma: float = 1.0
    jpeg_quality: int = 0

    def __post_init__(self) -> None:
        # The spectral response validates the bands.
        spectral = optics.SpectralResponse(self.channel_centres_nm, self.channel_widths_nm, self.band_samples)
        object.__setattr__(self, 'channel_centres_nm', spectral.centres_nm)
        object.__setattr__(self, 'channel_widths_nm', spectral.widths_nm)
        object.__setattr__(self, 'band_samples', spectral.samples)
        lamp_band_power(self.lamp_temperature_k)
        if self.white_balance is not None:
            gains = tuple(float(g) for g in self.white_balance)
            if len(gains) != 3 or not all(math.isfinite(g) and 0.01 <= g <= 100.0 for g in gains):
                raise ValueError(f'white balance needs three gains within 0.01..100, got {self.white_balance}')
            object.__setattr__(self, 'white_balance', gains)
        checks = {
            'exposure': math.isfinite(self.exposure) and 0.0 < self.exposure <= 1e4,
            'black_level_dn': math.isfinite(self.black_level_dn) and 0.0 <= self.black_level_dn < 128.0,
            'gamma': math.isfinite(self.gamma) and 0.2 <= self.gamma <= 5.0,
            'jpeg_quality': int(self.jpeg_quality) == self.jpeg_quality and 0 <= self.jpeg_quality <= 100,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError('camera response out of range: ' + ', '.join(f'{n}={getattr(self, n)}' for n in bad))
        for name in ('lamp_temperature_k', 'exposure', 'black_level_dn', 'gamma'):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, 'jpeg_quality', int(self.jpeg_quality))

    # -- the parts ----------------------------------------------------------------------------
    @property
    def spectral(self) -> optics.SpectralResponse:
        """The channels' bands, for ``flake_core.optics``' band functions (``response=``)."""
        return optics.SpectralResponse(self.channel_centres_nm, self.channel_widths_nm, self.band_samples)

    def balance(self) -> npt.NDArray[np.float64]:
        """lamp_c * white_balance_c (B, G, R): the colour the lamp and the white balance give a
        white reflector, relative to ``exposure``."""
        if self.white_balance is None:
            return np.ones(3)
        gains = np.asarray(self.white_balance, dtype=np.float64)
        return lamp_band_power(self.lamp_temperature_k, self.spectral) * gains

    def channel_gain(self) -> npt.NDArray[np.float64]:
        """Linear signal per unit band reflectance, per channel (B, G, R) [fraction of full scale]."""
        return self.exposure * self.balance()

    def encode(self, linear: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Linear signal (fraction of full scale, any shape) -> digital numbers (float, not rounded)."""
        linear = np.clip(np.asarray(linear, dtype=np.float64), 0.0, 1.0)
        if self.gamma != 1.0:
            linear = linear ** (1.0 / self.gamma)
        return self.black_level_dn + (FULL_SCALE_DN - self.black_level_dn) * linear

    def decode(self, digital: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Digital numbers (any shape, any dtype) -> linear signal; the inverse of ``encode``
        (levels below the black level read 0, levels at 255 read full scale)."""
        level = (np.asarray(digital, dtype=np.float64) - self.black_level_dn) / (FULL_SCALE_DN - self.black_level_dn)
        level = np.clip(level, 0.0, 1.0)
        return level ** self.gamma if self.gamma != 1.0 else level

    # -- reflectance <-> digital numbers --------------------------------------------------------
    def to_digital(self, reflectance: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Band reflectance (..., 3), B, G, R -> digital numbers (..., 3), float, before noise and JPEG."""
        return self.encode(np.asarray(reflectance, dtype=np.float64) * self.channel_gain())

    def to_reflectance(self, digital: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Digital numbers (..., 3), B, G, R -> band reflectance (..., 3); exact below full scale."""
        return self.decode(digital) / self.channel_gain()

    def contrast(self, digital: npt.ArrayLike, substrate_digital: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Physical contrast R / R_substrate - 1 (..., 3) of digital numbers against the substrate's:
        the quantity the optics and the calibrations speak of, whatever the camera's gamma."""
        return self.decode(digital) / np.maximum(self.decode(substrate_digital), 1e-12) - 1.0

    def saturated(self, digital: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """True where a digital number is at full scale: its reflectance is only a lower bound."""
        return np.asarray(digital) >= FULL_SCALE_DN - 0.5

    def compress(self, image_bgr: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """The image after the camera's JPEG compression (unchanged when ``jpeg_quality`` is 0)."""
        if not self.jpeg_quality:
            return image_bgr
        import cv2

        ok, data = cv2.imencode('.jpg', image_bgr, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise ValueError('JPEG encoding failed')
        decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if decoded is None:
            raise ValueError('JPEG decoding failed')
        return np.asarray(decoded, dtype=np.uint8)

    # -- variants ---------------------------------------------------------------------------------
    def with_changes(self, **changes: Any) -> CameraResponse:
        # Any: each field has its own type; replace() refuses unknown names, __post_init__ checks values.
        return replace(self, **changes)

    def exposed_for(self, reflectance: npt.ArrayLike, level: float) -> CameraResponse:
        """The same camera with ``exposure`` set so that the brightest channel of ``reflectance``
        (B, G, R; e.g. the bare substrate) reads ``level`` of full scale (linear)."""
        if not 0.0 < level <= 1.0:
            raise ValueError(f'level must lie within (0, 1], got {level}')
        brightest = float(np.max(np.asarray(reflectance, dtype=np.float64) * self.balance()))
        if not brightest > 0.0:
            raise ValueError('the reference reflectance must be positive')
        return replace(self, exposure=level / brightest)

    def balanced_on(self, reflectance: npt.ArrayLike) -> CameraResponse:
        """The same camera white-balanced on a reference (B, G, R band reflectance, e.g. the
        substrate): the reference reads grey at the green channel's level, as a camera's
        'white balance on this area' button does."""
        reflectance = np.asarray(reflectance, dtype=np.float64)
        power = lamp_band_power(self.lamp_temperature_k, self.spectral)
        gains = power[1] * reflectance[1] / (power * reflectance)
        return replace(self, white_balance=optics.channel_floats(gains))

    def with_channel_gain(self, gain: npt.ArrayLike) -> CameraResponse:
        """The camera whose ``channel_gain()`` is ``gain`` (B, G, R), for the lamp it has: what a
        fit of the three per-channel gains turns into exposure and white balance."""
        gain = np.asarray(gain, dtype=np.float64)
        power = lamp_band_power(self.lamp_temperature_k, self.spectral)
        exposure = float(gain[1] / power[1])
        return replace(self, exposure=exposure, white_balance=optics.channel_floats(gain / (exposure * power)))

    # -- files ----------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CameraResponse:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f'unknown camera fields {sorted(unknown)}; known: {sorted(known)}')
        values: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**values)


def default_camera(oxide_nm: float = 90.0, substrate_level: float = 0.55) -> CameraResponse:
    """The simulator's default camera: linear, neutral white balance, the default bands, exposed
    so the bare substrate's brightest channel reads ``substrate_level`` of full scale."""
    camera = CameraResponse()
    return camera.exposed_for(optics.substrate_reflectance(oxide_nm, camera.spectral), substrate_level)


# -- randomiser ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CameraRanges:
    """Plausible ranges (low, high) of the cameras on labs' microscopes, for ``random_camera``.

    Colour filters of Bayer sensors are broad (half-widths of 40-60 nm: sigma 15-45 nm here)
    and their peaks differ by maker; lamps run from warm halogen to cool white LEDs; the
    white balance is either set for some colour temperature (often not the lamp's), clicked
    on the substrate (which then reads grey), or left at the sensor's raw gains.
    """

    centre_shift_nm: tuple[float, float] = (-12.0, 12.0)
    width_nm: tuple[float, float] = (15.0, 45.0)
    lamp_temperature_k: tuple[float, float] = (2700.0, 6500.0)
    white_balance_k: tuple[float, float] = (2500.0, 7500.0)
    # Chances of the three white-balance habits: set for a temperature, clicked on the substrate, raw.
    white_balance_modes: tuple[float, float, float] = (0.5, 0.35, 0.15)
    raw_gain: tuple[float, float] = (0.6, 1.6)
    substrate_level: tuple[float, float] = (0.4, 0.8)
    gamma: tuple[float, float] = (1.0, 2.4)
    linear_share: float = 0.3  # share of cameras that keep gamma 1 (scientific cameras)
    black_level_dn: tuple[float, float] = (0.0, 12.0)
    jpeg_quality: tuple[int, int] = (60, 98)
    jpeg_share: float = 0.5


RANGES = CameraRanges()
# Intervals no training camera is drawn from: cameras there are unseen by every model
# trained on the randomiser (bench/bench_heldout_camera.py renders with them).
HELD_OUT: dict[str, tuple[float, float]] = {
    'gamma': (1.75, 1.95),
    'white_balance_k': (4300.0, 4900.0),
    'lamp_temperature_k': (4300.0, 4900.0),
}


def _uniform_outside(rng: np.random.Generator, low: float, high: float, hole: tuple[float, float] | None) -> float:
    """Uniform on [low, high] less the open interval ``hole`` (drawn by rejection)."""
    for _ in range(1000):
        value = float(rng.uniform(low, high))
        if hole is None or not hole[0] < value < hole[1]:
            return value
    raise ValueError(f'the held-out interval {hole} covers the range {low}..{high}')


def random_camera(seed: int | Sequence[int] | np.random.Generator, ranges: CameraRanges = RANGES,
                  substrate: Callable[[optics.SpectralResponse], npt.ArrayLike] | None = None,
                  held_out: Mapping[str, tuple[float, float]] | None = HELD_OUT,
                  wavelength_samples: int | None = None) -> CameraResponse:
    """A plausible camera drawn from ``ranges`` (seeded: ``seed`` is an int, a sequence of ints,
    or a numpy Generator). ``substrate`` (a callable from a SpectralResponse to the substrate's
    band reflectance, or None) sets the exposure (the substrate's brightest channel at a level
    drawn from ``ranges.substrate_level``) and serves the clicked white balance; without it
    the exposure is 1 and the clicked balance becomes the temperature setting. Values inside
    ``held_out`` intervals are never drawn (None: draw everywhere)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    held_out = held_out or {}
    r = ranges
    centres = optics.channel_floats(c + rng.uniform(*r.centre_shift_nm) for c in optics.CHANNEL_CENTRES_NM)
    widths = optics.channel_floats(rng.uniform(*r.width_nm) for _ in range(3))
    # About one sample per 10 nm of band, odd, at least the default 5.
    samples = wavelength_samples or max(optics.BAND_SAMPLES, 2 * math.ceil(1.5 * max(widths) / 10.0) + 1)
    lamp = _uniform_outside(rng, *r.lamp_temperature_k, held_out.get('lamp_temperature_k'))
    camera = CameraResponse(channel_centres_nm=centres, channel_widths_nm=widths, band_samples=samples,
                            lamp_temperature_k=lamp)
    mode = int(rng.choice(3, p=np.asarray(r.white_balance_modes) / sum(r.white_balance_modes)))
    setting_k = _uniform_outside(rng, *r.white_balance_k, held_out.get('white_balance_k'))
    raw = tuple(float(rng.uniform(*r.raw_gain)) for _ in range(3))
    reference = substrate(camera.spectral) if substrate is not None else None
    if mode == 1 and reference is not None:
        camera = camera.balanced_on(reference)
    elif mode == 2:
        camera = replace(camera, white_balance=(raw[0] / raw[1], 1.0, raw[2] / raw[1]))
    else:
        camera = replace(camera, white_balance=white_balance_for(setting_k, camera.spectral))
    level = float(rng.uniform(*r.substrate_level))
    if reference is not None:
        camera = camera.exposed_for(reference, level)
    linear = rng.random() < r.linear_share
    gamma = _uniform_outside(rng, *r.gamma, held_out.get('gamma'))
    black = float(rng.uniform(*r.black_level_dn))
    jpeg = int(rng.integers(r.jpeg_quality[0], r.jpeg_quality[1] + 1)) if rng.random() < r.jpeg_share else 0
    return replace(camera, gamma=1.0 if linear else gamma, black_level_dn=black, jpeg_quality=jpeg)


def in_held_out(camera: CameraResponse, white_balance_k: float | None = None,
                held_out: Mapping[str, tuple[float, float]] | None = None) -> list[str]:
    """Names of the held-out intervals ``camera`` lies in (``white_balance_k``: the temperature its
    white balance was set for, when known)."""
    values = {'gamma': camera.gamma, 'lamp_temperature_k': camera.lamp_temperature_k,
              'white_balance_k': white_balance_k}
    return [name for name, (low, high) in (HELD_OUT if held_out is None else held_out).items()
            if (value := values.get(name)) is not None and low < value < high]
