"""A camera on a microscope looking at a VirtualWafer: renders bgr8 frames and their ground truth.

Pixel convention: exactly flake_core.geometry.pixel_to_stage (image centre at the
stage position, +u along stage +x, +v along stage -y), then the chip mount
(``wafer.stage_to_wafer``) into the chip's frame.

Image formation, per frame:
1. rasterise the field of view (cached per pose, so focus sweeps reuse it): every
   object filled with its band reflectance (B, G, R) from the thin-film model;
2. blur with the diffraction limit plus the geometric defocus blur
   ``|z - focal_plane_z(x, y)| * tan(asin(NA))`` (separable Gaussian; large blurs on a
   downsampled copy);
3. scale to the linear signal: the camera response's channel gain (lamp colour, white
   balance, intensity, exposure, gain; ``flake_core.camera_response``) times the field's
   shading: vignetting, a residual flat-field error, uneven illumination and
   out-of-focus dirt on the optics; a fine texture of the sample's surface;
4. shot noise (from the electron count) and read noise, then the encoding (black level,
   gamma, 8-bit saturation) and the camera's JPEG compression.

Band reflectances are taken through the camera's spectral bands (``CameraSettings``
``channel_centres_nm``/``channel_widths_nm``); with the default bands the shipped
measured contrasts apply, with others the thin-film model alone (a measurement belongs
to the camera that made it). ``CameraModel.response`` is the ``CameraResponse`` a frame
is rendered with, what a calibration of this simulated microscope should recover.

Noise is seeded by the camera seed and the pose, so a pose renders the same image
every time; the shading maps are seeded by the camera seed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
import functools
import math

import cv2
import numpy as np

from flake_core import calibration, optics
from flake_core.camera_response import CameraResponse, white_balance_for
from flake_core.geometry import Affine2D, pixel_to_stage
from flake_core.materials import layer_class_name
from flake_core.objectives import Objective, objective_by_name
from flake_scanner.sim.wafer import VirtualWafer, WaferObject


@dataclass(frozen=True)
class CameraSettings:
    """Sensor, optics and exposure. Change with ``CameraModel.with_settings(**changes)``."""

    width: int = 1024
    height: int = 1024
    pixel_pitch_um: float = 5.5
    objective: str = '10x'
    exposure_s: float = 0.01
    gain: float = 1.0
    intensity: float = 1.0
    lamp_temperature_k: float = 3200.0
    white_balance_k: float = 3200.0
    vignetting: float = 0.15
    read_noise_dn: float = 1.2
    shot_noise: bool = True
    full_well_e: float = 10000.0
    # Bare substrate's brightest channel at exposure 10 ms, gain 1, intensity 1 [fraction of the
    # linear full scale].
    substrate_level: float = 0.55
    # Output encoding: 1.0 is a linear camera (contrast C is preserved, as the shipped
    # calibrations assume); 2.2 mimics a gamma-encoded colour camera.
    gamma: float = 1.0
    seed: int = 0
    # Spectral bands of the B, G, R channels (centre, 1-sigma width [nm]; samples per band).
    channel_centres_nm: tuple[float, float, float] = optics.CHANNEL_CENTRES_NM
    channel_widths_nm: tuple[float, float, float] = optics.CHANNEL_WIDTHS_NM
    band_samples: int = optics.BAND_SAMPLES
    # Explicit white-balance gains (B, G, R); None: set for white_balance_k.
    white_balance_gains: tuple[float, float, float] | None = None
    black_level_dn: float = 0.0
    jpeg_quality: int = 0  # 0: no JPEG compression
    # Shading left in the frame: peak deviation of a smooth per-channel flat-field error,
    # brightness change across the frame from uneven illumination, specks of dirt on the
    # optics (out of focus, fixed in the frame) and the sample's fine surface texture (std).
    flat_field_error: float = 0.0
    illumination_gradient: float = 0.0
    optics_dirt: int = 0
    substrate_texture: float = 0.0

    def validate(self) -> None:
        objective_by_name(self.objective)
        if not (16 <= self.width <= 8192 and 16 <= self.height <= 8192):
            raise ValueError(f'sensor size must be 16..8192 px, got {self.width}x{self.height}')
        checks = {
            'pixel_pitch_um': 0.5 <= self.pixel_pitch_um <= 50,
            'exposure_s': 1e-6 <= self.exposure_s <= 10,
            'gain': 0.01 <= self.gain <= 100,
            'intensity': 0 <= self.intensity <= 100,
            'lamp_temperature_k': 1000 <= self.lamp_temperature_k <= 20000,
            'white_balance_k': 1000 <= self.white_balance_k <= 20000,
            'vignetting': 0 <= self.vignetting < 1,
            'read_noise_dn': 0 <= self.read_noise_dn <= 50,
            'full_well_e': 100 <= self.full_well_e <= 1e7,
            'substrate_level': 0 < self.substrate_level <= 1,
            'gamma': 0.2 <= self.gamma <= 5,
            'black_level_dn': 0 <= self.black_level_dn < 128,
            'jpeg_quality': int(self.jpeg_quality) == self.jpeg_quality and 0 <= self.jpeg_quality <= 100,
            'flat_field_error': 0 <= self.flat_field_error <= 0.5,
            'illumination_gradient': 0 <= self.illumination_gradient <= 0.9,
            'optics_dirt': int(self.optics_dirt) == self.optics_dirt and 0 <= self.optics_dirt <= 100,
            'substrate_texture': 0 <= self.substrate_texture <= 0.2,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            listed = ', '.join(f'{n}={getattr(self, n)}' for n in bad)
            raise ValueError(f'camera settings out of range: {listed}')
        self.response(1.0)  # validates the bands and the white balance

    @property
    def spectral(self) -> optics.SpectralResponse:
        return optics.SpectralResponse(self.channel_centres_nm, self.channel_widths_nm, self.band_samples)

    def response(self, exposure: float) -> CameraResponse:
        """The camera response of these settings with ``exposure`` (which the camera model
        derives from ``substrate_level`` and the wafer's substrate)."""
        spectral = self.spectral
        gains = self.white_balance_gains
        if gains is None and self.white_balance_k != self.lamp_temperature_k:
            gains = white_balance_for(self.white_balance_k, spectral)
        return CameraResponse(channel_centres_nm=spectral.centres_nm, channel_widths_nm=spectral.widths_nm,
                              band_samples=spectral.samples, lamp_temperature_k=self.lamp_temperature_k,
                              white_balance=gains, exposure=exposure, black_level_dn=self.black_level_dn,
                              gamma=self.gamma, jpeg_quality=self.jpeg_quality)


@dataclass
class ObjectTruth:
    """One object visible in a frame."""

    object_id: int
    kind: str
    material: str
    layers: int
    thickness_nm: float
    is_contaminant: bool
    parent_id: int
    mask: np.ndarray  # (H, W) bool, the visible pixels
    bbox: tuple[int, int, int, int]  # u, v, width, height [px]
    polygon_wafer: np.ndarray  # full outline (or line path) in the wafer frame [m]
    centre_wafer: tuple[float, float]

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())

    @property
    def layer_class(self) -> str:
        return layer_class_name(self.layers)


@dataclass
class FrameTruth:
    stage_x: float
    stage_y: float
    width: int
    height: int
    pixel_size: float
    pixel_to_wafer: Affine2D
    objects: list[ObjectTruth] = field(default_factory=list)

    @property
    def flakes(self) -> list[ObjectTruth]:
        return [o for o in self.objects if not o.is_contaminant]


class CameraModel:
    """Renders the view of ``wafer`` through one objective at any stage pose."""

    _RASTER_CACHE = 6
    _OFF_CHIP_REFLECTANCE = (0.015, 0.015, 0.018)
    _DUST_REFLECTANCE = (0.03, 0.035, 0.04)

    def __init__(self, wafer: VirtualWafer, settings: CameraSettings | None = None,
                 optics_model: calibration.OpticsModel | None = None):
        self.wafer = wafer
        self.optics = optics_model or calibration.default_model()
        self._colour_cache: dict[tuple, np.ndarray] = {}
        self._contrast_tables: dict[str, np.ndarray] = {}
        self._raster_cache: OrderedDict = OrderedDict()
        self._noise: np.ndarray | None = None
        self._vignette_key = None
        self._vignette: np.ndarray | None = None
        self._gain_key = None
        self._template_key = None
        self._template: np.ndarray | None = None
        self._gain: np.ndarray | None = None
        self._response: CameraResponse | None = None
        self.settings = settings or CameraSettings()
        rng = np.random.default_rng([wafer.config.seed, 0xF0C5])
        corners = wafer.corner_positions_stage()
        self._focus_centre = (corners[1] + corners[2]) / 2
        self._focus_z0 = float(rng.uniform(-10e-6, 10e-6))
        self._focus_tilt = rng.uniform(-8e-4, 8e-4, 2)
        self._focus_curvature = float(rng.uniform(-0.06, 0.06))  # [1/m]: about +-3 um at 7 mm

    # -- settings -----------------------------------------------------------------------
    @property
    def settings(self) -> CameraSettings:
        return self._settings

    @settings.setter
    def settings(self, value: CameraSettings) -> None:
        value.validate()
        old = getattr(self, '_settings', None)
        self._settings = value
        self._response = None
        if old is None or old.spectral != value.spectral:
            self._colour_cache.clear()
            self._raster_cache.clear()
        if old is None or (old.width, old.height, old.objective, old.pixel_pitch_um) != (
                value.width, value.height, value.objective, value.pixel_pitch_um):
            self._raster_cache.clear()
        if old is None or (old.width, old.height, old.seed) != (value.width, value.height, value.seed):
            self._noise = None

    def with_settings(self, **changes) -> CameraSettings:
        """Change settings in place (e.g. ``objective='50x', exposure_s=0.02``); returns the new ones."""
        self.settings = replace(self._settings, **changes)
        return self._settings

    @property
    def objective(self) -> Objective:
        return objective_by_name(self._settings.objective)

    @property
    def pixel_size(self) -> float:
        """Size of one pixel at the sample [m]."""
        return self._settings.pixel_pitch_um * 1e-6 / self.objective.magnification

    @property
    def field_of_view(self) -> tuple[float, float]:
        return self._settings.width * self.pixel_size, self._settings.height * self.pixel_size

    # -- focus ----------------------------------------------------------------------------
    def focal_plane_z(self, stage_x: float, stage_y: float) -> float:
        """Stage z [m] at which the sample at (x, y) is in focus: tilted, slightly curved."""
        dx, dy = stage_x - self._focus_centre[0], stage_y - self._focus_centre[1]
        return float(self._focus_z0 + self._focus_tilt[0] * dx + self._focus_tilt[1] * dy
                     + self._focus_curvature * (dx * dx + dy * dy))

    def blur_sigma_px(self, stage_x: float, stage_y: float, z: float) -> float:
        """Gaussian sigma [px] of the point spread at this pose: diffraction plus defocus."""
        obj = self.objective
        diffraction = obj.diffraction_sigma_m
        defocus = abs(z - self.focal_plane_z(stage_x, stage_y)) * obj.defocus_blur_per_m / 2
        return math.hypot(diffraction, defocus) / self.pixel_size

    # -- geometry ---------------------------------------------------------------------------
    def pixel_to_wafer(self, stage_x: float, stage_y: float) -> Affine2D:
        s = self._settings
        return pixel_to_stage(stage_x, stage_y, self.pixel_size, s.width, s.height).then(
            self.wafer.stage_to_wafer)

    def flake_corner_in_view(self, rng: np.random.Generator, low: float = 1e-3, high: float = 9e-3,
                             tries: int = 50) -> tuple[float, float]:
        """A stage (x, y) centring the view on a corner of some flake: its edges give focus,
        contrast and motion blur something to show. Wafer points are drawn in [low, high]^2 [m]."""
        for _ in range(tries):
            wx, wy = rng.uniform(low, high, 2)
            flakes = [o for o in self.wafer.objects_in_rect(wx - 3e-4, wy - 3e-4, wx + 3e-4, wy + 3e-4)
                      if o.kind == 'flake']
            if flakes:
                x, y = self.wafer.wafer_to_stage.apply(*flakes[0].polygon[0])
                if self.ground_truth(x, y).flakes:
                    return float(x), float(y)
        raise LookupError(f'no flake corner found in {tries} tries')

    def _visible_objects(self, to_wafer: Affine2D) -> list[WaferObject]:
        s = self._settings
        frame = np.array([[-1, -1], [s.width, -1], [-1, s.height], [s.width, s.height]])
        corners = to_wafer.apply_points(frame)
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        return self.wafer.objects_in_rect(lo[0], lo[1], hi[0], hi[1])

    @staticmethod
    def _to_pixels(to_pixel: Affine2D, pts: np.ndarray) -> np.ndarray:
        # 4 fractional bits: fillPoly/polylines with shift=4 draw with sub-pixel vertices.
        return np.round(to_pixel.apply_points(pts) * 16).astype(np.int32)

    def _pixel_outlines(self, objects: list[WaferObject], to_pixel: Affine2D) -> list[np.ndarray]:
        """Every object's outline in 1/16 pixel units, transformed in one go."""
        if not objects:
            return []
        points = np.concatenate([obj.polygon for obj in objects])
        ends = np.cumsum([len(obj.polygon) for obj in objects])[:-1]
        return np.split(self._to_pixels(to_pixel, points), ends)

    def _draw(self, canvas: np.ndarray, obj: WaferObject, pts: np.ndarray, value) -> None:
        if obj.shape == 'line':
            width_px = obj.line_width_m / self.pixel_size
            cv2.polylines(canvas, [pts], False, value, thickness=max(1, int(round(width_px))),
                          lineType=cv2.LINE_8, shift=4)
        else:
            cv2.fillPoly(canvas, [pts], value, lineType=cv2.LINE_8, shift=4)

    # -- colours ------------------------------------------------------------------------------
    @property
    def response(self) -> CameraResponse:
        """The camera response frames are rendered with: the settings' bands, lamp, white
        balance, gamma, black level and JPEG, and the exposure that puts this wafer's bare
        substrate at ``substrate_level`` (scaled by intensity, exposure time and gain)."""
        if self._response is None:
            s = self._settings
            balance = s.response(1.0).balance()
            brightest = float((self._reflectance(None) * balance).max())
            exposure = s.substrate_level / brightest * s.intensity * (s.exposure_s / 0.01) * s.gain
            self._response = s.response(exposure)
        return self._response

    def _reflectance(self, obj: WaferObject | None) -> np.ndarray:
        oxide = self.wafer.config.oxide_nm
        key = None if obj is None else (obj.kind, obj.material, obj.layers, obj.thickness_nm)
        cached = self._colour_cache.get(key)
        if cached is not None:
            return cached
        spectral = self._settings.spectral
        sub = optics.substrate_reflectance(oxide, spectral)
        if obj is None or obj.kind == 'crack':
            value = sub
        elif obj.kind == 'dust':
            value = np.array(self._DUST_REFLECTANCE)
        elif obj.kind in ('flake', 'terrace', 'fold') and spectral == optics.DEFAULT_RESPONSE:
            value = sub * (1.0 + self._flake_contrast(obj.material, obj.layers, oxide))
        else:
            value = sub * (1.0 + optics.model_contrast(obj.material, obj.thickness_nm, oxide, spectral))
        self._colour_cache[key] = value
        return value

    def contrast(self, obj: WaferObject) -> np.ndarray:
        """Physical contrast (B, G, R) of ``obj`` against the bare substrate through this camera's
        bands: what decides whether any camera can see it."""
        return self._reflectance(obj) / self._reflectance(None) - 1.0

    def _flake_contrast(self, material: str, layers: int, oxide: float) -> np.ndarray:
        """The optics' contrast of a flake, from one table per material (a new field of view
        meets dozens of new flakes; asking the optics for each costs a table each)."""
        if not 1 <= layers <= 300:
            return self.optics.flake_contrast(material, layers, oxide)
        table = self._contrast_tables.get(material)
        if table is None:
            table = self._contrast_tables[material] = self.optics.contrast_table(material, oxide)
        return table[layers - 1]

    def _line_value(self, obj: WaferObject) -> np.ndarray:
        # Lines thinner than a pixel: blend with the substrate by their coverage.
        colour = self._reflectance(obj)
        coverage = min(1.0, obj.line_width_m / self.pixel_size)
        sub = self._reflectance(None)
        return sub + (colour - sub) * coverage

    def _raster(self, stage_x: float, stage_y: float) -> np.ndarray:
        """Reflectance image (H, W, 3) float32 of the field of view, in focus, before the camera."""
        key = (round(stage_x, 10), round(stage_y, 10), self.wafer.revision)
        cached = self._raster_cache.get(key)
        if cached is not None:
            self._raster_cache.move_to_end(key)
            return cached
        s = self._settings
        to_wafer = self.pixel_to_wafer(stage_x, stage_y)
        to_pixel = to_wafer.inverse()
        frame = to_wafer.apply_points(np.array([[-1, -1], [s.width, -1], [-1, s.height], [s.width, s.height]]))
        if all(self.wafer.contains(fx, fy) for fx, fy in frame):
            canvas = self._uniform(tuple(self._reflectance(None)))
        else:
            canvas = self._uniform(self._OFF_CHIP_REFLECTANCE)
            chip = self._to_pixels(to_pixel, self.wafer.chip_polygon())
            cv2.fillPoly(canvas, [chip], self._reflectance(None).tolist(), lineType=cv2.LINE_8, shift=4)
        objects = self._visible_objects(to_wafer)
        for obj, pts in zip(objects, self._pixel_outlines(objects, to_pixel), strict=True):
            value = self._line_value(obj) if obj.shape == 'line' else self._reflectance(obj)
            self._draw(canvas, obj, pts, value.tolist())
        self._raster_cache[key] = canvas
        while len(self._raster_cache) > self._RASTER_CACHE:
            self._raster_cache.popitem(last=False)
        return canvas

    def _uniform(self, colour: tuple) -> np.ndarray:
        """A fresh (H, W, 3) float32 image of one colour (copying a template beats broadcasting)."""
        s = self._settings
        key = (s.width, s.height, colour)
        if self._template_key != key:
            self._template = np.tile(np.asarray(colour, np.float32), (s.height, s.width, 1))
            self._template_key = key
        return self._template.copy()

    def _channel_scale(self) -> np.ndarray:
        """Linear digital numbers per unit reflectance, per channel (B, G, R)."""
        return (255.0 * self.response.channel_gain()).astype(np.float32)

    def _vignette_map(self) -> np.ndarray:
        s = self._settings
        key = (s.width, s.height, s.vignetting)
        if self._vignette_key != key:
            u = (np.arange(s.width, dtype=np.float32) - (s.width - 1) / 2) / (s.width / 2)
            v = (np.arange(s.height, dtype=np.float32) - (s.height - 1) / 2) / (s.height / 2)
            r2 = (v[:, None] ** 2 + u[None, :] ** 2) / 2
            self._vignette = (1.0 - s.vignetting * r2).astype(np.float32)[:, :, None]
            self._vignette_key = key
        return self._vignette

    def shading_map(self) -> np.ndarray:
        """(H, W, 3) float32 multiplicative shading of the field: vignetting, flat-field error,
        uneven illumination and dirt on the optics (1 where the field is perfectly even)."""
        s = self._settings
        shading = self._vignette_map()
        if not (s.flat_field_error or s.illumination_gradient or s.optics_dirt):
            return shading
        rng = np.random.default_rng([s.seed, 0xF1A7])
        u = ((np.arange(s.width, dtype=np.float64) - (s.width - 1) / 2) / (s.width / 2))[None, :]
        v = ((np.arange(s.height, dtype=np.float64) - (s.height - 1) / 2) / (s.height / 2))[:, None]
        field = np.ones((s.height, s.width, 3))
        # Low-order terms per channel: what a flat-field taken with another objective, focus or
        # lamp setting leaves behind, often coloured.
        terms = [u + 0 * v, v + 0 * u, u * v, u * u - v * v, u * u + v * v - 2 / 3]
        for c in range(3):
            error = sum(float(rng.normal()) * t for t in terms)
            field[:, :, c] *= 1.0 + s.flat_field_error * error / max(float(np.abs(error).max()), 1e-12)
        theta = float(rng.uniform(0, 2 * np.pi))
        field *= (1.0 + 0.5 * s.illumination_gradient * (math.cos(theta) * u + math.sin(theta) * v)
                  / math.sqrt(2))[:, :, None]
        for _ in range(s.optics_dirt):
            cu, cv = rng.uniform(-1, 1, 2)
            sigma = float(rng.uniform(0.02, 0.08))
            depth = float(rng.uniform(0.02, 0.12))
            field *= (1.0 - depth * np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * sigma ** 2)))[:, :, None]
        return (shading * field).astype(np.float32)

    def _texture(self, pose: list[int]) -> np.ndarray:
        """(H, W, 1) float32 factor 1 + texture: a fine, smooth roughness of the sample's surface."""
        s = self._settings
        rng = np.random.default_rng([*pose, 0x7E47])
        coarse = rng.standard_normal((s.height // 6 + 2, s.width // 6 + 2)).astype(np.float32)
        fine = cv2.resize(coarse, (s.width, s.height), interpolation=cv2.INTER_CUBIC)
        return (1.0 + s.substrate_texture * fine)[:, :, None]

    def _noise_buffer(self) -> np.ndarray:
        if self._noise is None:
            s = self._settings
            rng = np.random.default_rng([s.seed, 0x0153])
            self._noise = rng.standard_normal(s.width * s.height * 3 + (1 << 16), dtype=np.float32)
        return self._noise

    @staticmethod
    def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
        if sigma < 0.3:
            return image.copy()
        if sigma <= 3.0:
            return cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        sigma = min(sigma, 400.0)
        factor = max(2, int(sigma / 1.5))
        h, w = image.shape[:2]
        small = cv2.resize(image, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
        # Area averaging already blurs by about factor/2 px; take the rest here.
        rest = math.sqrt(max(sigma ** 2 - (factor / 2) ** 2, 0.25)) / factor
        small = cv2.GaussianBlur(small, (0, 0), rest, borderType=cv2.BORDER_REFLECT)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)

    # -- public rendering ------------------------------------------------------------------------
    def render(self, stage_x: float, stage_y: float, z: float | None = None,
               noise_seed: int = 0) -> np.ndarray:
        """bgr8 image (H, W, 3) at stage (x, y) [m] and focus z [m] (None: in focus).

        The noise is a function of the camera seed, the pose and ``noise_seed``: the same
        call gives the same frame; pass a frame counter as ``noise_seed`` for fresh noise
        at an unchanged pose.
        """
        for name, value in (('stage_x', stage_x), ('stage_y', stage_y), ('z', 0.0 if z is None else z)):
            if not math.isfinite(value):
                raise ValueError(f'{name} must be finite, got {value}')
        if z is None:
            z = self.focal_plane_z(stage_x, stage_y)
        s = self._settings
        image = self._blur(self._raster(stage_x, stage_y), self.blur_sigma_px(stage_x, stage_y, z))
        pose = [s.seed, int(noise_seed) & 0xFFFFFFFF,
                *(int(round(v * 1e9)) & 0xFFFFFFFF for v in (stage_x, stage_y, z))]
        if s.substrate_texture > 0:
            cv2.multiply(image, np.repeat(self._texture(pose[:1] + pose[2:4]), 3, axis=2), dst=image)
        cv2.multiply(image, self._gain_map(), dst=image)
        if s.shot_noise or s.read_noise_dn > 0:
            # Shot noise variance grows with the signal (electrons = DN / dn_per_electron).
            dn_per_electron = 255.0 * s.gain / s.full_well_e if s.shot_noise else 0.0
            std = cv2.addWeighted(image, dn_per_electron, image, 0.0, s.read_noise_dn ** 2)
            np.maximum(std, 0.0, out=std)
            cv2.sqrt(std, dst=std)
            noise = self._noise_buffer()
            start = int(np.random.default_rng(pose).integers(0, noise.size - image.size))
            cv2.multiply(std, noise[start:start + image.size].reshape(image.shape), dst=std)
            cv2.add(image, std, dst=image)
        np.maximum(image, 0.0, out=image)
        if s.gamma != 1.0 or s.black_level_dn:
            # A 12-bit lookup: keeps the dark levels and is far cheaper than a float power.
            image *= 16.0
            np.minimum(image, 4095.0, out=image)
            encoded = self._encoding_table(s.gamma, s.black_level_dn)[image.astype(np.uint16)]
        else:
            # Rounds and saturates to 0..255 (the input is already non-negative).
            encoded = cv2.convertScaleAbs(image)
        return self.response.compress(encoded)

    def _gain_map(self) -> np.ndarray:
        """Per-pixel, per-channel linear DN per unit reflectance: channel gain times shading."""
        s = self._settings
        key = (s.width, s.height, s.vignetting, s.flat_field_error, s.illumination_gradient, s.optics_dirt,
               s.seed, self.response)
        if self._gain_key != key:
            self._gain = np.ascontiguousarray(self.shading_map() * self._channel_scale()[None, None, :])
            self._gain_key = key
        return self._gain

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def _encoding_table(gamma: float, black_level_dn: float) -> np.ndarray:
        """12-bit linear level (16 per DN) -> 8-bit digital number: black level and gamma of the
        camera response (``CameraResponse.encode``)."""
        levels = np.minimum((np.arange(4096, dtype=np.float64) + 0.5) / 4080.0, 1.0)
        return np.round(black_level_dn + (255.0 - black_level_dn) * levels ** (1.0 / gamma)).astype(np.uint8)

    def ground_truth(self, stage_x: float, stage_y: float) -> FrameTruth:
        """Visible objects of the frame at (x, y) with exclusive instance masks."""
        s = self._settings
        to_wafer = self.pixel_to_wafer(stage_x, stage_y)
        to_pixel = to_wafer.inverse()
        labels = np.zeros((s.height, s.width), np.int32)
        chip = np.zeros((s.height, s.width), np.uint8)
        cv2.fillPoly(chip, [self._to_pixels(to_pixel, self.wafer.chip_polygon())], 1, shift=4)
        objects = self._visible_objects(to_wafer)
        for index, (obj, pts) in enumerate(zip(objects, self._pixel_outlines(objects, to_pixel), strict=True),
                                           start=1):
            self._draw(labels, obj, pts, 0 if obj.kind == 'crack' else index)
        labels[chip == 0] = 0
        truth = FrameTruth(stage_x, stage_y, s.width, s.height, self.pixel_size, to_wafer)
        for index, obj in enumerate(objects, start=1):
            if obj.kind == 'crack':
                continue
            # Only look inside the object's own pixel box (plus the line width).
            corners = to_pixel.apply_points(np.array([[obj.bbox[0], obj.bbox[1]], [obj.bbox[2], obj.bbox[1]],
                                                      [obj.bbox[0], obj.bbox[3]], [obj.bbox[2], obj.bbox[3]]]))
            u0, v0 = np.floor(corners.min(axis=0)).astype(int) - 2
            u1, v1 = np.ceil(corners.max(axis=0)).astype(int) + 3
            u0, v0, u1, v1 = max(u0, 0), max(v0, 0), min(u1, s.width), min(v1, s.height)
            if u0 >= u1 or v0 >= v1:
                continue
            crop = labels[v0:v1, u0:u1] == index
            if not crop.any():
                continue
            vs, us = np.nonzero(crop.any(axis=1))[0], np.nonzero(crop.any(axis=0))[0]
            bbox = (int(u0 + us[0]), int(v0 + vs[0]), int(us[-1] - us[0] + 1), int(vs[-1] - vs[0] + 1))
            mask = np.zeros((s.height, s.width), bool)
            mask[v0:v1, u0:u1] = crop
            truth.objects.append(ObjectTruth(
                object_id=obj.object_id, kind=obj.kind, material=obj.material, layers=obj.layers,
                thickness_nm=obj.thickness_nm, is_contaminant=obj.is_contaminant, parent_id=obj.parent_id,
                mask=mask, bbox=bbox, polygon_wafer=obj.polygon.copy(), centre_wafer=obj.centre))
        return truth
