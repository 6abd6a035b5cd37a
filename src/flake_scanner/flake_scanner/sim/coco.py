"""COCO export of simulated frames' ground truth.

Categories are those of ``flake_core.materials.coco_categories()``: one per material
(graphene 1, hbn 2, mos2 3, wte2 4, ...) and contaminants from id 101 (tape_residue 101,
dust 102, bulk_crystal 103); ids are stable, evaluators may hard-code them.

Every annotation carries ``is_contaminant`` and ``attributes``: material, layers,
layer_class (mono 1 / few 2-10 / thick 11-40 / bulk > 40), thickness_nm, region kind
(flake, terrace, fold, ...), object and parent ids, and the wafer-frame centre [m].
Masks are compressed RLE (pycocotools). Evaluating flakes only: keep annotations with
``is_contaminant == False`` (or category ids below 100).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from flake_core import materials
from flake_scanner.sim.camera import FrameTruth, ObjectTruth


def categories() -> list[dict]:
    return materials.coco_categories()


def category_id(obj: ObjectTruth) -> int:
    if obj.is_contaminant:
        return materials.CONTAMINANT_CATEGORIES[obj.kind]
    return materials.material(obj.material).coco_id


@dataclass
class FrameRecord:
    """One exported frame: its image file name (relative to the dataset) and truth."""

    file_name: str
    truth: FrameTruth
    objective: str = ''
    z_offset_m: float = 0.0
    # Further fields of the COCO image entry (a randomised frame's look and camera response).
    extra: dict | None = None


def encode_mask(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    return rle


def frames_to_coco(frames: Iterable[FrameRecord], include_contaminants: bool = True,
                   description: str = 'flake scanner simulated frames') -> dict:
    """A COCO instances dict for ``frames`` (FrameRecord or (file_name, FrameTruth) pairs)."""
    images, annotations = [], []
    for image_id, frame in enumerate(frames, start=1):
        if not isinstance(frame, FrameRecord):
            frame = FrameRecord(*frame)
        truth = frame.truth
        images.append({
            'id': image_id, 'file_name': frame.file_name, 'width': truth.width, 'height': truth.height,
            'stage_x_m': truth.stage_x, 'stage_y_m': truth.stage_y, 'pixel_size_m': truth.pixel_size,
            'pixel_to_wafer': truth.pixel_to_wafer.as_list(), 'objective': frame.objective,
            'z_offset_m': frame.z_offset_m, **(frame.extra or {}),
        })
        for obj in truth.objects:
            if obj.is_contaminant and not include_contaminants:
                continue
            annotations.append({
                'id': len(annotations) + 1, 'image_id': image_id, 'category_id': category_id(obj),
                'segmentation': encode_mask(obj.mask), 'area': float(obj.area_px),
                'bbox': [float(v) for v in obj.bbox], 'iscrowd': 0,
                'is_contaminant': bool(obj.is_contaminant),
                'attributes': {
                    'material': obj.material, 'kind': obj.kind, 'layers': int(obj.layers),
                    'layer_class': obj.layer_class if not obj.is_contaminant else '',
                    'thickness_nm': float(obj.thickness_nm), 'object_id': int(obj.object_id),
                    'parent_id': int(obj.parent_id),
                    'centre_wafer_m': [float(obj.centre_wafer[0]), float(obj.centre_wafer[1])],
                },
            })
    return {
        'info': {'description': description, 'version': '1.0'},
        'licenses': [],
        'images': images,
        'annotations': annotations,
        'categories': categories(),
    }
