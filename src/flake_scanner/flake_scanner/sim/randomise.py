"""Randomised looks of the simulated microscope, for training models that must work on any
lab's microscope (domain randomisation).

A ``SimLook`` is one microscope and one chip's look: the camera (``flake_core.camera_response``
drawn by ``random_camera``: spectral bands, lamp, white balance, exposure, gamma, black
level, JPEG), the oxide thickness (80-300 nm), the field's shading (vignetting, a residual
flat-field error, uneven illumination, dirt on the optics), the sample's surface texture,
the sensor's noise and the chip's dirt (dust, tape residue, bulk crystals). ``random_look(seed)``
draws one; the same seed always gives the same look.

Intervals of ``HELD_OUT`` (the camera's gamma, lamp and white-balance temperatures, and the
oxide thickness here) are never drawn unless ``held_out=False``: ``held_out_looks()`` are
cameras inside them, so a model trained on the randomiser meets them for the first time
(bench/bench_heldout_camera.py).

    look = random_look(7)
    wafer = VirtualWafer.generate(look.wafer_config(seed=7, thin_fraction=0.5))
    camera = CameraModel(wafer, look.camera_settings(CameraSettings(seed=7)))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from flake_core import optics
from flake_core.camera_response import HELD_OUT, RANGES, CameraRanges, CameraResponse, random_camera
from flake_scanner.sim.camera import CameraSettings
from flake_scanner.sim.wafer import WaferConfig

# Oxide thicknesses no training chip is drawn with [nm]: where thin graphene shows in blue
# alone (between the green-red contrast of 90 nm and 285 nm; 130-190 nm hides it entirely).
HELD_OUT_OXIDE_NM = (225.0, 245.0)
# Randomised sets draw a new look every few frames; the chip of look g of seed s has wafer seed
# s * LOOKS_PER_SEED + g, so seeds kept apart for training and evaluation keep their chips apart.
LOOKS_PER_SEED = 1000


@dataclass(frozen=True)
class LookRanges:
    """Ranges (low, high) of everything ``random_look`` draws besides the camera response."""

    oxide_nm: tuple[float, float] = (80.0, 300.0)
    vignetting: tuple[float, float] = (0.0, 0.35)
    flat_field_error: tuple[float, float] = (0.0, 0.08)
    illumination_gradient: tuple[float, float] = (0.0, 0.25)
    optics_dirt: tuple[int, int] = (0, 6)
    substrate_texture: tuple[float, float] = (0.0, 0.012)
    read_noise_dn: tuple[float, float] = (0.5, 4.0)
    full_well_e: tuple[float, float] = (6000.0, 25000.0)
    dust_density_per_mm2: tuple[float, float] = (3.0, 40.0)
    residue_line_density_per_mm2: tuple[float, float] = (0.0, 8.0)
    residue_network_density_per_mm2: tuple[float, float] = (0.0, 1.0)
    bulk_density_per_mm2: tuple[float, float] = (2.0, 12.0)
    camera: CameraRanges = RANGES


LOOK_RANGES = LookRanges()


@dataclass(frozen=True)
class SimLook:
    """One microscope's look: overrides of ``WaferConfig`` and ``CameraSettings``."""

    name: str
    wafer: dict = field(default_factory=dict)
    camera: dict = field(default_factory=dict)
    description: str = ''

    @property
    def oxide_nm(self) -> float:
        return float(self.wafer.get('oxide_nm', WaferConfig.oxide_nm))

    def wafer_config(self, **base) -> WaferConfig:
        """A WaferConfig of ``base`` fields with this look's oxide and dirt."""
        return WaferConfig(**{**base, **self.wafer})

    def camera_settings(self, base: CameraSettings | None = None) -> CameraSettings:
        """``base`` (sensor size, objective, seed, ...) with this look's camera."""
        return replace(base or CameraSettings(), **self.camera)

    def as_dict(self) -> dict:
        """JSON-ready (COCO image entries carry it)."""
        def plain(value):
            return list(value) if isinstance(value, tuple) else value
        return {'name': self.name, 'description': self.description,
                'wafer': {k: plain(v) for k, v in self.wafer.items()},
                'camera': {k: plain(v) for k, v in self.camera.items()}}


def camera_fields(camera: CameraResponse, oxide_nm: float) -> dict:
    """CameraSettings fields that render with ``camera`` on a chip of ``oxide_nm``: the
    exposure becomes ``substrate_level`` (the bare substrate's brightest channel)."""
    substrate = optics.substrate_reflectance(oxide_nm, camera.spectral)
    level = float((substrate * camera.channel_gain()).max())
    return {'channel_centres_nm': camera.channel_centres_nm, 'channel_widths_nm': camera.channel_widths_nm,
            'band_samples': camera.band_samples, 'lamp_temperature_k': camera.lamp_temperature_k,
            'white_balance_k': camera.lamp_temperature_k,
            'white_balance_gains': camera.white_balance, 'substrate_level': level, 'gamma': camera.gamma,
            'black_level_dn': camera.black_level_dn, 'jpeg_quality': camera.jpeg_quality}


def _oxide(rng: np.random.Generator, ranges: LookRanges, held_out: bool) -> float:
    low, high = ranges.oxide_nm
    for _ in range(1000):
        value = round(float(rng.uniform(low, high)), 1)
        if not (held_out and HELD_OUT_OXIDE_NM[0] < value < HELD_OUT_OXIDE_NM[1]):
            return value
    raise ValueError(f'the held-out oxide interval {HELD_OUT_OXIDE_NM} covers {ranges.oxide_nm}')


def random_look(seed, ranges: LookRanges = LOOK_RANGES, held_out: bool = True) -> SimLook:
    """A randomised look (seeded by an int or a sequence of ints); nothing inside the held-out
    intervals unless ``held_out`` is False."""
    rng = np.random.default_rng(seed)
    r = ranges
    oxide = _oxide(rng, r, held_out)
    camera = random_camera(rng, r.camera, substrate=lambda spectral: optics.substrate_reflectance(oxide, spectral),
                           held_out=HELD_OUT if held_out else None)
    wafer = {'oxide_nm': oxide}
    for name in ('dust_density_per_mm2', 'residue_line_density_per_mm2', 'residue_network_density_per_mm2',
                 'bulk_density_per_mm2'):
        wafer[name] = round(float(rng.uniform(*getattr(r, name))), 3)
    settings = camera_fields(camera, oxide)
    for name in ('vignetting', 'flat_field_error', 'illumination_gradient', 'substrate_texture', 'read_noise_dn',
                 'full_well_e'):
        settings[name] = round(float(rng.uniform(*getattr(r, name))), 4)
    settings['optics_dirt'] = int(rng.integers(r.optics_dirt[0], r.optics_dirt[1] + 1))
    name = seed if isinstance(seed, int) else '-'.join(str(int(s)) for s in np.atleast_1d(seed))
    return SimLook(f'random-{name}', wafer, settings)


def look_groups(seed: int, frames: int, frames_per_look: int, held_out: bool = True
                ) -> list[tuple[SimLook, int, int]]:
    """(look, wafer seed, frames) for ``frames`` frames of seed ``seed`` with a new random look
    every ``frames_per_look`` frames."""
    if frames_per_look < 1:
        raise ValueError(f'frames per look must be >= 1, got {frames_per_look}')
    groups = -(-int(frames) // int(frames_per_look))
    if groups > LOOKS_PER_SEED:
        raise ValueError(f'at most {LOOKS_PER_SEED} looks per seed; give more frames per look')
    return [(random_look([seed, g], held_out=held_out), seed * LOOKS_PER_SEED + g,
             min(frames_per_look, frames - g * frames_per_look)) for g in range(groups)]


def default_look() -> SimLook:
    """The simulator's default camera and chip (what the shipped figures use)."""
    return SimLook('default')


def held_out_looks() -> list[SimLook]:
    """Cameras that no model trained on ``random_look`` saw: each sits inside held-out intervals
    (white-balance temperature, gamma, lamp temperature, oxide), one change at a time and all
    of them together."""
    from flake_core.camera_response import white_balance_for

    looks = [
        SimLook('wb4600', camera={'white_balance_k': 4600.0},
                description='white balance set for 4600 K under the 3200 K halogen lamp (a warm cast)'),
        SimLook('gamma185', camera={'gamma': 1.85, 'substrate_level': 0.6},
                description='a gamma-encoded colour camera (gamma 1.85), substrate at 60 % (linear)'),
        SimLook('oxide235', wafer={'oxide_nm': 235.0}, description='235 nm of SiO2, default camera'),
    ]
    # Everything at once: a 4600 K LED, broad shifted bands, gamma 1.85, JPEG, shading and dirt.
    bands = optics.SpectralResponse((466.0, 530.0, 602.0), (32.0, 35.0, 30.0), 11)
    everything = {'channel_centres_nm': bands.centres_nm, 'channel_widths_nm': bands.widths_nm,
                  'band_samples': bands.samples, 'lamp_temperature_k': 4600.0, 'white_balance_k': 4600.0,
                  'white_balance_gains': white_balance_for(4600.0, bands), 'gamma': 1.85, 'black_level_dn': 6.0,
                  'jpeg_quality': 85, 'substrate_level': 0.5, 'vignetting': 0.25, 'flat_field_error': 0.04,
                  'illumination_gradient': 0.1, 'optics_dirt': 3, 'substrate_texture': 0.01}
    looks.append(SimLook('all235', wafer={'oxide_nm': 235.0}, camera=everything,
                         description='235 nm SiO2, 4600 K LED, broad shifted bands, gamma 1.85, black level 6, '
                                     'JPEG 85, shading and dirt on the optics'))
    return looks


def look_by_name(name: str, held_out: bool = True) -> SimLook:
    """``default``, a held-out look's name, or ``random:SEED``."""
    name = str(name).strip()
    if name.startswith('random:'):
        try:
            return random_look(int(name.split(':', 1)[1]), held_out=held_out)
        except ValueError as exc:
            raise ValueError(f'random looks are named random:SEED with an integer seed, got {name!r}') from exc
    looks = {look.name: look for look in [default_look(), *held_out_looks()]}
    if name not in looks:
        raise ValueError(f'unknown look {name!r}; known: {", ".join(looks)}, random:SEED')
    return looks[name]
