"""COCO flake datasets for Mask R-CNN training: label mapping, geometry, augmentation.

Inputs are COCO instance files: ``flake-sim dataset`` output (categories graphene/hbn/
mos2/wte2 with ``attributes.layers`` / ``layer_class``), or a lab's export from LabelBox,
CVAT or labelme converted to COCO, where the layer class may instead be part of the
category name (``graphene_mono``, ``hBN few``, ``MoS2-thick``) or an annotation attribute.

Labels are material x {mono, few, thick} (Masubuchi et al. (2020)). Regions that are bulk (> 40 layers),
contaminants (tape residue, dust), or of unknown material/thickness are not targets:
the network learns them as background, which is what a flake search wants.

Geometry: an image is scaled by the model's ``pixel_scale`` and a square window of
``input_size`` is cut from it, zero padded where the image ends. ``pixel_scale = 0``
is Masubuchi et al.'s recipe instead: the whole image resized so its longest side is
``input_size`` (aspect ratio kept, remainder zero padded). Augmentation (Masubuchi et al. (2020)):
colour-channel multiplication, rotation, horizontal/vertical flips and shifts, all
folded into one affine warp per image so masks and image stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
import re

import cv2
import numpy as np
from pycocotools import mask as mask_utils
import torch

from flake_core.materials import layer_class_name
from flake_detector.maskrcnn.model import LAYER_CLASSES, MATERIALS, class_index

_MATERIAL_ALIASES = {'graphene': 'graphene', 'graphite': 'graphene', 'hbn': 'hbn', 'h-bn': 'hbn', 'bn': 'hbn',
                     'mos2': 'mos2', 'wte2': 'wte2'}
_LAYER_ALIASES = {'mono': 'mono', 'monolayer': 'mono', '1l': 'mono', 'single': 'mono', 'few': 'few',
                  'fewlayer': 'few', 'thick': 'thick', 'multilayer': 'thick'}


def layer_class_from_layers(layers: float) -> str | None:
    """The target class of a flake of ``layers`` layers; bulk and unknown thickness are no target."""
    name = layer_class_name(layers)
    return name if name in LAYER_CLASSES else None


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r'[\s_/,;:]+|(?<![hH])-', name.lower()) if t]


def resolve_label(annotation: dict, category: dict) -> int | None:
    """Class index (1..12) of an annotation, or None when it is not a flake target."""
    attributes = annotation.get('attributes') or {}
    if annotation.get('is_contaminant') or category.get('supercategory') == 'contaminant':
        return None
    tokens = _tokens(str(category.get('name', '')))
    material = str(attributes.get('material', '')).lower()
    material = _MATERIAL_ALIASES.get(material)
    if material is None:
        material = next((_MATERIAL_ALIASES[t] for t in tokens if t in _MATERIAL_ALIASES), None)
    layer_class = str(attributes.get('layer_class', '')).lower()
    layer_class = _LAYER_ALIASES.get(layer_class)
    if layer_class is None and str(attributes.get('layer_class', '')).lower() == 'bulk':
        return None
    if layer_class is None and attributes.get('layers') not in (None, ''):
        layer_class = layer_class_from_layers(float(attributes['layers']))
        if layer_class is None:
            return None
    if layer_class is None:
        layer_class = next((_LAYER_ALIASES[t] for t in tokens if t in _LAYER_ALIASES), None)
    if material is None or layer_class is None:
        return None
    return class_index(material, layer_class)


def is_flake_target(annotation: dict, category: dict) -> bool:
    """Whether an annotation is a target of the class-agnostic model: any flake of any
    material (a lab's NbSe2 labelled ``3L`` or ``>5L`` as well as the simulator's four
    materials), but no contaminant and no bulk crystal (more than 40 layers)."""
    attributes = annotation.get('attributes') or {}
    if annotation.get('is_contaminant') or category.get('supercategory') == 'contaminant':
        return False
    if str(attributes.get('layer_class', '')).lower() == 'bulk':
        return False
    layers = attributes.get('layers')
    return layers in (None, '') or layer_class_from_layers(float(layers)) is not None


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """uint8 mask from COCO polygons, uncompressed or compressed RLE."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation.get('counts'), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
        if isinstance(rle['counts'], str):
            rle['counts'] = rle['counts'].encode('ascii')
    return mask_utils.decode(rle).astype(np.uint8)


@dataclass(frozen=True)
class Augmentation:
    """Ranges of Masubuchi et al.'s online augmentation, each applied with probability ``probability``."""

    probability: float = 0.5
    intensity: tuple[float, float] = (0.4, 1.2)   # common factor of the colour multiplication
    channel: tuple[float, float] = (0.85, 1.15)   # extra per-channel factor (white balance)
    rotation_deg: float = 180.0
    shift_fraction: float = 0.1


@dataclass
class Entry:
    image_id: int
    path: Path
    width: int
    height: int
    annotations: list[tuple[int, dict]]  # (class index, annotation)


class CocoFlakeDataset(torch.utils.data.Dataset):
    """Items are ``(image, target)``: float RGB CHW in [0, 1] of ``input_size`` squared, and
    torchvision's target dict (boxes x0 y0 x1 y1, labels, uint8 masks)."""

    def __init__(self, annotation_file: str | Path, image_root: str | Path | None = None,
                 input_size: int = 1024, pixel_scale: float = 0.0, augment: Augmentation | None = None,
                 drop_fraction: float = 0.0, materials: tuple[str, ...] | None = None, seed: int = 0,
                 min_area_px: int = 4, object_crop_probability: float = 0.8, class_agnostic: bool = False):
        annotation_file = Path(annotation_file)
        if not annotation_file.is_file():
            raise FileNotFoundError(f'COCO annotation file not found: {annotation_file}')
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f'drop_fraction must be in [0, 1), got {drop_fraction}')
        for material in materials or ():
            if material not in MATERIALS:
                raise ValueError(f'unknown material {material!r}; known: {MATERIALS}')
        self.root = Path(image_root) if image_root else annotation_file.parent
        self.input_size = int(input_size)
        self.pixel_scale = float(pixel_scale)
        self.augment = augment
        self.min_area_px = min_area_px
        self.object_crop_probability = object_crop_probability
        self.rng = np.random.default_rng(seed)
        coco = json.loads(annotation_file.read_text())
        categories = {c['id']: c for c in coco.get('categories', [])}
        by_image: dict[int, list[tuple[int, dict]]] = {}
        for ann in coco.get('annotations', []):
            category = categories.get(ann['category_id'], {})
            if ann.get('iscrowd', 0):
                continue
            if class_agnostic and not materials:
                # One class: every flake of 1-40 layers, of whatever material the labels name.
                if is_flake_target(ann, category):
                    by_image.setdefault(ann['image_id'], []).append((1, ann))
                continue
            label = resolve_label(ann, category)
            if label is None:
                continue
            material = MATERIALS[(label - 1) // len(LAYER_CLASSES)]
            if materials and material not in materials:
                continue
            by_image.setdefault(ann['image_id'], []).append((1 if class_agnostic else label, ann))
        self.total_annotations = sum(len(v) for v in by_image.values())
        self.dropped = self._drop(by_image, drop_fraction, seed)
        self.entries = []
        for image in coco.get('images', []):
            anns = by_image.get(image['id'], [])
            if materials and not anns and image['id'] not in self.dropped:
                continue
            self.entries.append(Entry(image['id'], self.root / image['file_name'], int(image['width']),
                                      int(image['height']), anns))
        if not self.entries:
            raise ValueError(f'{annotation_file} has no usable images'
                             + (f' for materials {materials}' if materials else ''))

    @staticmethod
    def _drop(by_image: dict, fraction: float, seed: int) -> set[int]:
        """Remove ``fraction`` of all flake annotations at random (Nguyen et al.'s missing labels)."""
        if fraction <= 0:
            return set()
        keys = [(image_id, i) for image_id, anns in by_image.items() for i in range(len(anns))]
        order = np.random.default_rng(seed + 7919).permutation(len(keys))
        drop = {keys[k] for k in order[:round(fraction * len(keys))]}
        images = set()
        for image_id in list(by_image):
            kept = [a for i, a in enumerate(by_image[image_id]) if (image_id, i) not in drop]
            if len(kept) < len(by_image[image_id]):
                images.add(image_id)
            by_image[image_id] = kept
        return images

    def __len__(self) -> int:
        return len(self.entries)

    def class_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for entry in self.entries:
            for label, _ in entry.annotations:
                counts[label] = counts.get(label, 0) + 1
        return counts

    def __getitem__(self, index: int):
        entry = self.entries[index]
        image = cv2.imread(str(entry.path), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f'cannot read image {entry.path}')
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        height, width = image.shape[:2]
        matrix = self._warp_matrix(entry, width, height)
        size = self.input_size
        warped = cv2.warpAffine(image, matrix[:2], (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        masks, labels = [], []
        for label, ann in entry.annotations:
            if not _box_visible(ann['bbox'], matrix, size):
                continue
            mask = decode_segmentation(ann['segmentation'], height, width)
            mask = cv2.warpAffine(mask, matrix[:2], (size, size), flags=cv2.INTER_NEAREST,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            if int(mask.sum()) >= self.min_area_px:
                masks.append(mask)
                labels.append(label)
        tensor = torch.from_numpy(warped).permute(2, 0, 1).float() / 255.0
        if self.augment is not None:
            tensor = self._colour(tensor)
        return tensor, make_target(masks, labels, size)

    def _warp_matrix(self, entry: Entry, width: int, height: int) -> np.ndarray:
        size = self.input_size
        scale = self.pixel_scale if self.pixel_scale > 0 else size / max(width, height)
        matrix = np.diag([scale, scale, 1.0])
        aug, rng = self.augment, self.rng
        if self.pixel_scale > 0:
            # Cut a window of the scaled image, usually centred near a flake so crops are not empty.
            sw, sh = width * scale, height * scale
            if aug is not None and entry.annotations and rng.random() < self.object_crop_probability:
                x, y, w, h = entry.annotations[rng.integers(len(entry.annotations))][1]['bbox']
                cx = (x + w / 2) * scale + rng.uniform(-0.35, 0.35) * size
                cy = (y + h / 2) * scale + rng.uniform(-0.35, 0.35) * size
                ox, oy = cx - size / 2, cy - size / 2
            elif aug is not None:
                ox, oy = rng.uniform(0, max(sw - size, 0)), rng.uniform(0, max(sh - size, 0))
            else:
                ox, oy = max(sw - size, 0) / 2, max(sh - size, 0) / 2
            matrix = _translation(-ox, -oy) @ matrix
            centre = (size / 2, size / 2)
        else:
            centre = (width * scale / 2, height * scale / 2)
        if aug is None:
            return matrix
        about = _translation(*centre)
        back = _translation(-centre[0], -centre[1])
        if rng.random() < aug.probability:
            matrix = about @ np.diag([-1.0, 1.0, 1.0]) @ back @ matrix
        if rng.random() < aug.probability:
            matrix = about @ np.diag([1.0, -1.0, 1.0]) @ back @ matrix
        if rng.random() < aug.probability:
            rotation = np.eye(3)
            rotation[:2] = cv2.getRotationMatrix2D(centre, rng.uniform(-aug.rotation_deg, aug.rotation_deg), 1.0)
            matrix = rotation @ matrix
        if rng.random() < aug.probability:
            shift = rng.uniform(-aug.shift_fraction, aug.shift_fraction, 2) * size
            matrix = _translation(*shift) @ matrix
        return matrix

    def _colour(self, tensor: torch.Tensor) -> torch.Tensor:
        aug, rng = self.augment, self.rng
        if rng.random() >= aug.probability:
            return tensor
        factors = rng.uniform(*aug.intensity) * rng.uniform(*aug.channel, size=3)
        return (tensor * torch.as_tensor(factors, dtype=tensor.dtype).view(3, 1, 1)).clamp_(0.0, 1.0)


def _translation(dx: float, dy: float) -> np.ndarray:
    matrix = np.eye(3)
    matrix[0, 2], matrix[1, 2] = dx, dy
    return matrix


def _box_visible(bbox, matrix: np.ndarray, size: int) -> bool:
    x, y, w, h = bbox
    corners = np.array([[x, y, 1], [x + w, y, 1], [x, y + h, 1], [x + w, y + h, 1]], dtype=float)
    mapped = corners @ matrix.T
    return bool(mapped[:, 0].max() > 0 and mapped[:, 1].max() > 0
                and mapped[:, 0].min() < size and mapped[:, 1].min() < size)


def make_target(masks: list[np.ndarray], labels: list[int], size: int) -> dict[str, torch.Tensor]:
    """torchvision target from full-size uint8 masks; boxes are the masks' extents."""
    if not masks:
        return {'boxes': torch.zeros((0, 4)), 'labels': torch.zeros((0,), dtype=torch.int64),
                'masks': torch.zeros((0, size, size), dtype=torch.uint8)}
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {'boxes': torch.tensor(boxes, dtype=torch.float32),
            'labels': torch.tensor(labels, dtype=torch.int64),
            'masks': torch.from_numpy(np.stack(masks))}


def collate(batch):
    return tuple(zip(*batch, strict=True))
