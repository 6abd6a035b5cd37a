"""Anchors of the shipped design reach the small flakes of a 10x objective."""

import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from flake_detector.maskrcnn.model import ModelConfig, build_model

torch.set_num_threads(1)  # more threads thrash on shared, busy cores


def worst_best_iou(anchor_offsets: int, sizes=((12, 12), (8, 18), (18, 8))) -> float:
    """Over every position of a flake within one stride-8 cell: the best anchor's IoU, at its worst."""
    config = ModelConfig(input_size=128, pixel_scale=1.0, fpn_channels=8, embedding_dim=4, class_agnostic=True,
                         anchor_sizes='12/16/24,28/36/48,64/80/96,128/160/192', anchor_offsets=anchor_offsets)
    model = build_model(config, pretrained_backbone=False).eval()
    image = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():
        features = list(model.backbone(image).values())
    anchors = model.rpn.anchor_generator(ImageList(image, [(128, 128)]), features)[0]
    worst = 1.0
    for dx in range(8):
        for dy in range(8):
            for w, h in sizes:
                box = torch.tensor([[48.0 + dx, 48.0 + dy, 48.0 + dx + w, 48.0 + dy + h]])
                worst = min(worst, float(box_iou(box, anchors).max()))
    return worst


def test_anchors_cover_a_12_px_flake_anywhere_at_iou_0_5():
    assert worst_best_iou(anchor_offsets=2) >= 0.5


def test_one_anchor_centre_per_cell_misses_a_12_px_flake_between_cells():
    # Why the shipped design puts anchors every half stride.
    assert worst_best_iou(anchor_offsets=1) < 0.5
