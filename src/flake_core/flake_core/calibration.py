"""The one calibration of a microscope: what the simulator and every detector backend read.

A calibration says how flakes look through one microscope:

- ``oxide_nm``: the SiO2 thickness of the chips;
- ``camera``: the ``flake_core.camera_response.CameraResponse`` (spectral bands, black level,
  gamma; its per-channel gains are a property of each image, not of the calibration, since
  contrast does not depend on them);
- ``materials``: per material, layer classes measured on this microscope (a Gaussian per
  layer count of the physical contrast ``C = R_flake / R_substrate - 1``, R, G, B order),
  which replace the thin-film model for the layer counts they cover;
- ``model_sigma`` and ``relative_sigma``: the spread of real flakes around the thin-film
  model, ``sqrt(model_sigma^2 + (relative_sigma * C)^2)`` per channel [contrast] (camera
  curves and lamps that are not exactly the model's add an error that grows with C);
- ``images`` and ``fit``: what ``flake-calibrate`` measured and how well the model fits
  (substrate colour, white balance and exposure per image; residuals; counts).

Every layer count a calibration does not measure comes from the transfer-matrix model of
``flake_core.optics`` seen through the camera's bands, so one file serves every material and
thickness. Contrast here is always *physical* (linear in light): a detector decodes the
camera's gamma and black level first (``CameraResponse.decode``), and the simulator renders
physical contrast before its camera encodes it.

Files are JSON (``FORMAT``); ``load_calibration`` reads a file or a shipped name:

- ``'model'``: the thin-film model with the default camera at the given oxide;
- ``'measured'``: the shipped measured classes (graphene and WSe2 on 90 nm SiO2 from the
  MIT-licensed 2DMatGMM project, ``calibration/LICENSE.2DMatGMM``), model elsewhere;
- ``'auto'``: measured when the oxide is the one they were measured on (90 nm), else model;
- a path to a file ``flake-calibrate`` (or a person) wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from flake_core import materials, optics
from flake_core.camera_response import CameraResponse

FORMAT = 'flake-calibration/1'
SHIPPED_DIR = Path(__file__).resolve().parent / 'calibration'
MEASURED_FILE = SHIPPED_DIR / 'sio2_90nm_2dmatgmm.json'
# Spread of real flakes around the model contrast (per channel): the measured graphene
# classes of the shipped file sit within ~0.02 of the model.
MODEL_SIGMA = 0.02
SOURCES = ('auto', 'measured', 'model')


@dataclass(frozen=True)
class MeasuredClass:
    """One layer count of one material as measured on this microscope (R, G, B physical contrast)."""

    layers: int
    contrast_rgb: tuple[float, float, float]
    covariance_rgb: tuple[tuple[float, float, float], ...]
    regions: int = 0  # flakes it was measured on (0: not recorded)

    def __post_init__(self) -> None:
        mean = np.asarray(self.contrast_rgb, dtype=float)
        cov = np.asarray(self.covariance_rgb, dtype=float)
        if int(self.layers) != self.layers or self.layers < 1:
            raise ValueError(f'layer count must be a positive integer, got {self.layers}')
        if mean.shape != (3,) or not np.all(np.isfinite(mean)):
            raise ValueError(f'contrast of layer count {self.layers} needs three finite values')
        if cov.shape != (3, 3) or not np.all(np.isfinite(cov)):
            raise ValueError(f'covariance of layer count {self.layers} is not a finite 3x3 matrix')
        if np.any(np.linalg.eigvalsh(0.5 * (cov + cov.T)) <= 0):
            raise ValueError(f'covariance of layer count {self.layers} is not positive definite')
        object.__setattr__(self, 'layers', int(self.layers))
        object.__setattr__(self, 'contrast_rgb', tuple(float(v) for v in mean))
        object.__setattr__(self, 'covariance_rgb', tuple(tuple(float(v) for v in row) for row in cov))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {'layers': self.layers, 'contrast_rgb': list(self.contrast_rgb),
                               'covariance_rgb': [list(row) for row in self.covariance_rgb]}
        if self.regions:
            out['regions'] = self.regions
        return out


@dataclass(frozen=True)
class LayerClasses:
    """Gaussian per layer count of one material in physical contrast, R, G, B order: what a
    detector matches regions against."""

    material: str
    layer_nm: float
    layers: npt.NDArray[np.float64]  # (K,)
    means: npt.NDArray[np.float64]  # (K, 3) contrast R, G, B
    covariances: npt.NDArray[np.float64]  # (K, 3, 3)
    version: str
    camera: CameraResponse = field(default_factory=CameraResponse)  # decodes images to physical contrast

    def restrict(self, max_layers: float) -> LayerClasses:
        keep = self.layers <= max_layers
        return replace(self, layers=self.layers[keep], means=self.means[keep], covariances=self.covariances[keep])


@dataclass(frozen=True)
class Calibration:
    """How flakes look through one microscope (see the module text)."""

    oxide_nm: float = 90.0
    camera: CameraResponse = field(default_factory=CameraResponse)
    materials: Mapping[str, tuple[MeasuredClass, ...]] = field(default_factory=dict)
    model_sigma: float = MODEL_SIGMA
    relative_sigma: float = 0.0
    name: str = 'model'
    source: str = 'thin-film model (flake_core.optics)'
    images: tuple[dict[str, Any], ...] = ()
    fit: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        oxide = float(self.oxide_nm)
        if not (math.isfinite(oxide) and 1.0 <= oxide <= 2000.0):
            raise ValueError(f'oxide thickness must lie within 1..2000 nm, got {self.oxide_nm}')
        if not (math.isfinite(self.model_sigma) and 1e-4 <= self.model_sigma <= 1.0):
            raise ValueError(f'model_sigma must lie within 1e-4..1, got {self.model_sigma}')
        if not (math.isfinite(self.relative_sigma) and 0.0 <= self.relative_sigma <= 1.0):
            raise ValueError(f'relative_sigma must lie within 0..1, got {self.relative_sigma}')
        measured: dict[str, tuple[MeasuredClass, ...]] = {}
        for name, classes in dict(self.materials).items():
            key = materials.material(name).name
            counts = [c.layers for c in classes]
            if len(set(counts)) != len(counts):
                raise ValueError(f'{key}: a layer count is measured twice')
            measured[key] = tuple(sorted(classes, key=lambda c: c.layers))
        object.__setattr__(self, 'oxide_nm', round(oxide, 1))
        object.__setattr__(self, 'materials', measured)
        object.__setattr__(self, 'model_sigma', float(self.model_sigma))
        object.__setattr__(self, 'relative_sigma', float(self.relative_sigma))
        object.__setattr__(self, 'images', tuple(self.images))
        object.__setattr__(self, 'fit', dict(self.fit))

    # -- what detectors and the simulator ask --------------------------------------------------
    @property
    def version(self) -> str:
        return f'{self.name}-sio2-{self.oxide_nm:g}nm'

    def model_contrast_rgb(self, material: str, layers: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Thin-film model contrast (K, 3), R, G, B, of ``layers`` (K,) layers through this camera."""
        key = materials.material(material).name
        return _model_table(key, tuple(float(n) for n in np.atleast_1d(layers)), self.oxide_nm,
                            self.camera.spectral).copy()

    def layer_classes(self, material: str, layers: Iterable[int] | None = None) -> LayerClasses:
        """Classes of ``material`` for ``layers`` (default: the material's ``optical_layers``):
        measured where this calibration measured them (extra measured counts are added),
        thin-film model with ``model_sigma`` elsewhere."""
        entry = materials.material(material)
        wanted = sorted({int(n) for n in (entry.optical_layers if layers is None else layers)})
        measured = {c.layers: c for c in self.materials.get(entry.name, ())}
        if layers is None:
            wanted = sorted(set(wanted) | set(measured))
        layer_array = np.array(wanted, dtype=np.float64)
        means = self.model_contrast_rgb(entry.name, layer_array) if len(wanted) else np.zeros((0, 3))
        variances = self.model_sigma ** 2 + (self.relative_sigma * means) ** 2
        covs = variances[:, :, None] * np.eye(3)[None]
        for k, n in enumerate(wanted):
            if n in measured:
                means[k] = measured[n].contrast_rgb
                covs[k] = measured[n].covariance_rgb
        version = f'{self.version}-{entry.name}' + ('-measured' if measured else '')
        return LayerClasses(entry.name, entry.layer_nm, layer_array, means, covs, version, self.camera)

    def contrast_table(self, material: str, max_layers: int = 300) -> npt.NDArray[np.float64]:
        """(max_layers, 3) physical contrast, **B, G, R** (the simulator's order), of 1..max_layers
        layers; row i is i + 1 layers. Measured layer counts win."""
        classes = self.layer_classes(material, range(1, int(max_layers) + 1))
        table = classes.means[:, ::-1].copy()
        table.setflags(write=False)
        return table

    def flake_contrast(self, material: str, layers: int) -> npt.NDArray[np.float64]:
        """Physical contrast (B, G, R) of a ``layers``-layer flake."""
        layers = int(layers)
        if layers < 1:
            raise ValueError(f'layer count must be >= 1, got {layers}')
        if layers <= 300:
            return self.contrast_table(material)[layers - 1, :].copy()
        return self.model_contrast_rgb(material, [layers])[0, ::-1].copy()

    def with_oxide(self, oxide_nm: float) -> Calibration:
        """This microscope on chips of another oxide: measured classes belong to their oxide
        and are dropped when it changes."""
        if round(float(oxide_nm), 1) == self.oxide_nm:
            return self
        return replace(self, oxide_nm=float(oxide_nm), materials={},
                       name=self.name if not self.materials else f'{self.name}-model')

    # -- files -------------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            'format': FORMAT, 'name': self.name, 'source': self.source, 'oxide_nm': self.oxide_nm,
            'camera': self.camera.as_dict(), 'model_sigma': self.model_sigma,
            'relative_sigma': self.relative_sigma,
            'materials': {m: {'classes': [c.as_dict() for c in classes]}
                          for m, classes in self.materials.items()}}
        if self.images:
            out['images'] = list(self.images)
        if self.fit:
            out['fit'] = dict(self.fit)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_plain(self.as_dict()), indent=1) + '\n')
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        if not isinstance(data, Mapping):
            raise ValueError('a calibration is a JSON object')
        if data.get('format') != FORMAT:
            raise ValueError(f'not a calibration file of format {FORMAT!r} (format: {data.get("format")!r})')
        known = {'format', 'name', 'source', 'oxide_nm', 'camera', 'model_sigma', 'relative_sigma', 'materials',
                 'images', 'fit'}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f'unknown calibration fields {sorted(unknown)}; known: {sorted(known)}')
        measured: dict[str, tuple[MeasuredClass, ...]] = {}
        for name, entry in dict(data.get('materials') or {}).items():
            classes = entry.get('classes') if isinstance(entry, Mapping) else None
            if not isinstance(classes, list):
                raise ValueError(f'materials.{name} needs a list of "classes"')
            measured[name] = tuple(MeasuredClass(int(c['layers']), tuple(c['contrast_rgb']),
                                                 tuple(tuple(r) for r in c['covariance_rgb']),
                                                 int(c.get('regions', 0))) for c in classes)
        return cls(oxide_nm=float(data.get('oxide_nm', 90.0)),
                   camera=CameraResponse.from_dict(dict(data.get('camera') or {})),
                   materials=measured, model_sigma=float(data.get('model_sigma', MODEL_SIGMA)),
                   relative_sigma=float(data.get('relative_sigma', 0.0)),
                   name=str(data.get('name', 'calibration')), source=str(data.get('source', '')),
                   images=tuple(data.get('images') or ()), fit=dict(data.get('fit') or {}))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except OSError as exc:
            raise ValueError(f'cannot read calibration {path}: {exc.strerror or exc}') from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f'cannot read calibration {path}: {exc}') from None


@functools.lru_cache(maxsize=4096)
def _model_table(material: str, layers: tuple[float, ...], oxide_nm: float,
                 response: optics.SpectralResponse) -> npt.NDArray[np.float64]:
    thickness = np.asarray(layers) * optics.layer_thickness_nm(material)
    bgr = optics.band_reflectance(material, thickness, oxide_nm, response) / optics.substrate_reflectance(
        oxide_nm, response) - 1.0
    table = np.ascontiguousarray(bgr[:, ::-1])
    table.setflags(write=False)
    return table


def _plain(value: object) -> object:
    """``value`` with numpy arrays and scalars turned into lists and Python numbers (for JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@functools.lru_cache(maxsize=1)
def _shipped_measured() -> Calibration:
    return Calibration.load(MEASURED_FILE)


def load_calibration(spec: str | Path = 'auto', oxide_nm: float = 90.0) -> Calibration:
    """A calibration by shipped name (``'auto'``, ``'measured'``, ``'model'``; see the module
    text) at ``oxide_nm``, or from a file (whose own oxide holds)."""
    text = str(spec).strip()
    if text in SOURCES:
        measured = _shipped_measured()
        if text == 'measured' or (text == 'auto' and round(float(oxide_nm), 1) == measured.oxide_nm):
            if round(float(oxide_nm), 1) != measured.oxide_nm:
                raise ValueError(f'the shipped measured calibration belongs to {measured.oxide_nm:g} nm SiO2, '
                                 f'not {oxide_nm:g} nm: use calibration "model" or a calibration file')
            return measured
        return Calibration(oxide_nm=float(oxide_nm))
    path = Path(text)
    if not path.is_file():
        raise ValueError(f'calibration must be one of {", ".join(SOURCES)} or a calibration file; '
                         f'no such file: {text}')
    return Calibration.load(path)


class OpticsModel:
    """Physical contrast of flakes for the simulator: the calibration of the chip's oxide when one
    is given, the thin-film model otherwise."""

    def __init__(self, calibrations: list[Calibration] | None = None):
        self._by_oxide = {c.oxide_nm: c for c in calibrations or []}

    def calibration(self, oxide_nm: float) -> Calibration:
        oxide = round(float(oxide_nm), 1)
        found = self._by_oxide.get(oxide)
        if found is None:
            found = self._by_oxide[oxide] = Calibration(oxide_nm=oxide)
        return found

    def flake_contrast(self, material: str, layers: int, oxide_nm: float) -> npt.NDArray[np.float64]:
        """Contrast (B, G, R) of a ``layers``-layer flake; measured values win."""
        return self.calibration(oxide_nm).flake_contrast(material, layers)

    def contrast_table(self, material: str, oxide_nm: float, max_layers: int = 300) -> npt.NDArray[np.float64]:
        """(max_layers, 3) contrast, B, G, R, for 1..max_layers layers; row i is i + 1 layers."""
        return self.calibration(oxide_nm).contrast_table(material, max_layers)


@functools.lru_cache(maxsize=1)
def default_model() -> OpticsModel:
    """The simulator's optics: the shipped measured classes on 90 nm oxide, the model elsewhere."""
    return OpticsModel([_shipped_measured()])


def flake_contrast(material: str, layers: int, oxide_nm: float) -> npt.NDArray[np.float64]:
    """Contrast (B, G, R) of a flake with the default model (shipped calibrations applied)."""
    return default_model().flake_contrast(material, layers, oxide_nm)
