"""Greplova et al.'s cascade of noisy CNNs: the model, the 'good flake' targets, and inference.

The network follows Greplova et al. (2020), Table I: convolutions of 64 (5x5, stride 2), 64, 128 and
256 filters (3x3), a dense layer of 256 and a softmax over (bad, good), ReLU
throughout. The paper does not give the pooling; a 2x2 max-pool after each of the
first three convolutions and a global average before the dense layer keep a net at
~0.5 M parameters (1 MB in float16), so three nets per target ship in a few MB.
The 80 x 80 crops are area-averaged to 40 x 40 before the first convolution
(``net_input``): four times less arithmetic, which is what lets the cascade keep up
with the scan on a CPU, at no cost for objects that span tens of pixels.

Three nets are trained separately on the same crops; a candidate is good only if
every net of the cascade accepts it, which removes the bad candidates that any single
net lets through (Greplova et al. (2020), Fig. 2). Each net's decision threshold is chosen on a
validation seed for a recall target and folded into its output bias
(``fold_thresholds``), so the cascade always decides at P(good) = 0.5.

Crops are normalised by their own median colour (crop / median - 1): the input is
then a contrast image, independent of lamp brightness and white balance, like the
optical detector's contrast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import json
import math
from pathlib import Path
import time

import cv2
import numpy as np

from flake_detector.candidates import Candidate, CandidateFinder
from flake_detector.detection import (
    Detection,
    FrameResult,
    FunnelStage,
    add_isolation,
    region_quality,
    register_detector,
)

MODELS_DIR = Path(__file__).resolve().parent / 'models'


@dataclass(frozen=True)
class Target:
    """What a lab calls a good flake. Thickness bounds in nm, layer bounds in layers."""

    name: str
    material: str
    min_layers: float = 1.0
    max_layers: float = math.inf
    min_thickness_nm: float = 0.0
    max_thickness_nm: float = math.inf
    min_area_px: int = 60

    def accepts(self, material: str, layers: float, thickness_nm: float, area_px: float) -> bool:
        return (material == self.material and self.min_layers <= layers <= self.max_layers
                and self.min_thickness_nm <= thickness_nm <= self.max_thickness_nm
                and area_px >= self.min_area_px)

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> Target:
        data = dict(data)
        for key in ('max_layers', 'max_thickness_nm'):
            if data.get(key) is None:
                data[key] = math.inf
        return cls(**data)


# Default targets: hBN gate dielectric 10-90 nm (Greplova et al. 2020), graphene mono or few layers
# (Masubuchi et al. 2020).
TARGETS = {
    'hbn-10-90nm': Target('hbn-10-90nm', 'hbn', min_thickness_nm=10.0, max_thickness_nm=90.0),
    'graphene-1-10L': Target('graphene-1-10L', 'graphene', min_layers=1, max_layers=10),
}


def target_by_name(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f'unknown target {name!r}; known: {sorted(TARGETS)} (or give a Target)')
    return TARGETS[name]


def normalise_crops(crops: np.ndarray, size: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8 BGR crops -> (N, 3, size, size) float32 contrast images."""
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if size and crops.shape[1] != size:
        crops = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in crops]) \
            if len(crops) else np.zeros((0, size, size, crops.shape[-1]), crops.dtype)
    crops = crops.astype(np.float32)
    median = np.median(crops.reshape(len(crops), -1, crops.shape[-1]), axis=1)
    contrast = crops / np.maximum(median, 1.0)[:, None, None, :] - 1.0
    return np.ascontiguousarray(contrast.transpose(0, 3, 1, 2))


def build_net(width: float = 1.0):
    """Greplova et al. (2020), Table I (see the module text); ``width`` scales every layer (tests use tiny nets)."""
    from torch import nn

    def ch(n):
        return max(4, int(round(n * width)))

    net = nn.Sequential(
        nn.Conv2d(3, ch(64), 5, stride=2, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(ch(64), ch(64), 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(ch(64), ch(128), 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(ch(128), ch(256), 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(ch(256), ch(256)), nn.ReLU(inplace=True),
        nn.Linear(ch(256), 2),
    )
    return net


def logit(p: float) -> float:
    """log(p / (1 - p)): thresholds on P(good) shift the good-minus-bad output by this much."""
    return math.log(p / (1.0 - p))


class Cascade:
    """Several independently trained nets; a crop passes if every net calls it good."""

    def __init__(self, nets, target: Target, crop_size: int = 80, threshold: float = 0.5,
                 version: str = '', card: dict | None = None, width: float = 1.0, net_input: int = 40):
        if not nets:
            raise ValueError('a cascade needs at least one net')
        self.nets = list(nets)
        for net in self.nets:
            net.eval()
        self.target = target
        self.crop_size = int(crop_size)
        self.threshold = float(threshold)
        self.version = version or f'cascade-{target.name}'
        self.card = card or {}
        self.width = width
        self.net_input = int(net_input)

    def probabilities(self, crops: np.ndarray, net_index: int, batch: int = 256) -> np.ndarray:
        """P(good) of one net for (N, H, W, 3) uint8 crops."""
        import torch

        if len(crops) == 0:
            return np.zeros(0, dtype=np.float32)
        x = normalise_crops(crops, self.net_input)
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), batch):
                logits = self.nets[net_index](torch.from_numpy(x[start:start + batch]))
                out.append(torch.softmax(logits, dim=1)[:, 1].numpy())
        return np.concatenate(out)

    def run(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Apply the nets in turn to the survivors. Returns (accepted mask, min P(good)
        over the nets that saw each crop, survivors after each net)."""
        alive = np.arange(len(crops))
        score = np.ones(len(crops), dtype=np.float32)
        left = []
        for k in range(len(self.nets)):
            if len(alive):
                p = self.probabilities(crops[alive], k)
                score[alive] = np.minimum(score[alive], p)
                alive = alive[p >= self.threshold]
            left.append(int(len(alive)))
        accepted = np.zeros(len(crops), dtype=bool)
        accepted[alive] = True
        return accepted, score, left

    def fold_thresholds(self, thresholds) -> None:
        """Make P(good) = 0.5 of net k fall where it was ``thresholds[k]``.

        A threshold chosen for each net on a validation seed is moved into the net's
        output bias (a shift of the good-minus-bad logit by logit(t)), so the cascade
        decides at 0.5 whatever its nets: a single ``threshold`` (the node's
        cascade_threshold) then moves every net the same way from its chosen point.
        """
        import torch

        thresholds = [float(t) for t in thresholds]
        if len(thresholds) != len(self.nets):
            raise ValueError(f'need one threshold per net ({len(self.nets)}), got {len(thresholds)}')
        for net, t in zip(self.nets, thresholds, strict=True):
            if not 0.0 < t < 1.0:
                raise ValueError(f'thresholds must lie strictly between 0 and 1, got {t}')
            output = net[-1]
            with torch.no_grad():
                output.bias[1] -= logit(t)

    # -- files ------------------------------------------------------------------------------
    def save(self, path: Path | str, card: dict | None = None) -> Path:
        """Weights (float16) to ``path`` (.pt) and the model card next to it (.json)."""
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {'nets': [{k: v.detach().to(torch.float16) for k, v in net.state_dict().items()}
                          for net in self.nets],
                 'target': self.target.to_json(), 'crop_size': self.crop_size, 'threshold': self.threshold,
                 'width': self.width, 'net_input': self.net_input, 'version': self.version}
        torch.save(state, path)
        card = {**self.card, **(card or {}), 'version': self.version, 'target': self.target.to_json(),
                'crop_size': self.crop_size, 'threshold': self.threshold, 'nets': len(self.nets),
                'width': self.width, 'net_input': self.net_input, 'weights_file': path.name,
                'weights_bytes': path.stat().st_size}
        path.with_suffix('.json').write_text(json.dumps(card, indent=1))
        return path

    @classmethod
    def load(cls, path: Path | str) -> Cascade:
        import torch

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'no cascade weights at {path}')
        state = torch.load(path, map_location='cpu', weights_only=True)
        nets = []
        for sd in state['nets']:
            net = build_net(state.get('width', 1.0))
            net.load_state_dict({k: v.float() for k, v in sd.items()})
            nets.append(net)
        card_path = path.with_suffix('.json')
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        return cls(nets, Target.from_json(state['target']), state['crop_size'], state['threshold'],
                   state.get('version', ''), card, state.get('width', 1.0), state.get('net_input', 40))


def shipped_model(target: str) -> Path:
    return MODELS_DIR / f'cascade_{target}.pt'


class CascadeDetector:
    """The ``cascade`` backend: candidate finder, then the cascade, then the optical
    thickness estimate of each accepted candidate."""

    name = 'cascade'

    def __init__(self, target: str = 'graphene-1-10L', model_path: str = '', threshold: float | None = None,
                 oxide_nm: float = 90.0, calibration: str = 'auto', finder: CandidateFinder | None = None,
                 std_threshold: float = 0.02, min_area_px: int = 30, work_size: int = 512,
                 cascade: Cascade | None = None, min_contrast: float = 0.03, threads: int = 1):
        import torch

        # Small batches of small crops: one thread is fastest, more only spin.
        torch.set_num_threads(max(1, int(threads)))
        if cascade is None:
            path = Path(model_path) if model_path else shipped_model(target)
            cascade = Cascade.load(path)
        self.cascade = cascade
        if threshold is not None:
            self.cascade.threshold = float(threshold)
        self.finder = finder or CandidateFinder(crop_size=cascade.crop_size, std_threshold=std_threshold,
                                                min_area_px=min_area_px, work_size=work_size)
        self.model_version = cascade.version
        self.oxide_nm = oxide_nm
        self.min_contrast = float(min_contrast)
        self.calibration_source = calibration
        self._calibration = None

    @property
    def calibration(self):
        if self._calibration is None:
            from flake_detector.optical import load_calibration

            self._calibration = load_calibration(self.cascade.target.material, self.oxide_nm,
                                                 self.calibration_source)
        return self._calibration

    def classify(self, image: np.ndarray, pixel_to_wafer=None):
        """Candidates of a frame and the cascade's verdicts: (candidates, accepted, scores, funnel)."""
        candidates = self.finder.find(image, pixel_to_wafer)
        crops = self.finder.crops(image, candidates)
        accepted, scores, left = self.cascade.run(crops)
        funnel = [FunnelStage('candidates', len(candidates))]
        funnel += [FunnelStage(f'net {k + 1}', n) for k, n in enumerate(left)]
        return candidates, accepted, scores, funnel

    def detect(self, image_bgr: np.ndarray, pixel_to_wafer=None) -> FrameResult:
        from flake_detector.optical import estimate_background

        t0 = time.perf_counter()
        candidates, accepted, scores, funnel = self.classify(image_bgr, pixel_to_wafer)
        t1 = time.perf_counter()
        detections = []
        background = estimate_background(image_bgr) if accepted.any() else None
        for candidate, ok, score in zip(candidates, accepted, scores, strict=True):
            if ok:
                detections.append(self._detection(image_bgr, candidate, float(score), background))
        add_isolation(detections)
        t2 = time.perf_counter()
        return FrameResult(detections, candidates=len(candidates), funnel=funnel,
                           timings={'cascade': t1 - t0, 'thickness': t2 - t1})

    def _detection(self, image, candidate: Candidate, score: float, background) -> Detection:
        from flake_detector.optical import contrast_map, estimate_thickness

        x, y, w, h = candidate.bbox
        window = contrast_map(image[y:y + h, x:x + w], background[y:y + h, x:x + w], smooth=3)
        # The std region spills past the flake by half a std window: keep the part that
        # differs from the substrate, when that is most of a flake.
        magnitude = np.sqrt((window ** 2).sum(axis=2))
        noise = float(np.median(magnitude[~candidate.mask])) if (~candidate.mask).any() else 0.0
        mask = candidate.mask & (magnitude > max(self.min_contrast, 4.0 * noise))
        if mask.sum() < max(4, 0.2 * candidate.mask.sum()):
            mask = candidate.mask
        estimate = estimate_thickness(image, mask, self.calibration, background, bbox=candidate.bbox)
        quality = region_quality(mask, window)
        return Detection(
            bbox=candidate.bbox, mask=mask, material=self.cascade.target.material,
            layers=estimate.layers, layers_std=estimate.layers_std, thickness_nm=estimate.thickness_nm,
            thickness_nm_std=estimate.thickness_nm_std, score=score, detector=self.name,
            model_version=f'{self.model_version}+{estimate.version}', contrast=estimate.contrast,
            homogeneity=quality['homogeneity'], edge_straightness=quality['edge_straightness'],
            extra={'wafer_xy': candidate.wafer_xy, 'window': candidate.window})


register_detector('cascade')(CascadeDetector)
