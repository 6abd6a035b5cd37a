"""Tiled Mask R-CNN inference: tiles, stitching across overlaps, the backend's output."""

import cv2
import numpy as np
import pytest
import torch

from flake_detector.detection import make_detector
from flake_detector.maskrcnn.infer import MaskRCNNDetector, TileDetection, stitch, tile_origins
from flake_detector.maskrcnn.model import ModelConfig, build_model, class_index
from flake_detector.maskrcnn.train import save_checkpoint

torch.set_num_threads(1)  # more threads thrash on shared, busy cores


def tile_view(frame_mask, window, label, score):
    """What one tile reports about a flake: the part of its mask inside the tile."""
    x0, y0, x1, y1 = window
    local = np.zeros_like(frame_mask)
    local[y0:y1, x0:x1] = frame_mask[y0:y1, x0:x1]
    ys, xs = np.nonzero(local)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return TileDetection(box, local[box[1]:box[3], box[0]:box[2]], label, score, window)


def paste(det, shape):
    out = np.zeros(shape, dtype=bool)
    out[det.box[1]:det.box[3], det.box[0]:det.box[2]] = det.mask
    return out


def test_tile_origins_cover_the_frame_with_overlap():
    assert tile_origins(100, 128, 16) == [0]
    origins = tile_origins(1000, 256, 32)
    assert origins[0] == 0 and origins[-1] == 1000 - 256
    assert all(b - a <= 256 - 32 for a, b in zip(origins, origins[1:], strict=False))


def test_a_flake_split_across_two_tiles_becomes_one():
    shape = (120, 200)
    flake = np.zeros(shape, np.uint8)
    cv2.ellipse(flake, (100, 60), (45, 25), 20, 0, 360, 1, -1)
    flake = flake.astype(bool)
    other = np.zeros(shape, bool)
    other[10:30, 10:40] = True  # a second flake, only in the left tile
    left, right = (0, 0, 128, 120), (72, 0, 200, 120)
    label = class_index('graphene', 'mono')
    parts = [tile_view(flake, left, label, 0.9), tile_view(flake, right, label, 0.7),
             tile_view(other, left, class_index('hbn', 'few'), 0.8)]
    # Neither tile alone sees the whole flake.
    assert parts[0].area < flake.sum() and parts[1].area < flake.sum()
    merged = stitch(parts)
    assert len(merged) == 2
    big = max(merged, key=lambda d: d.area)
    assert np.array_equal(paste(big, shape), flake)
    assert big.score == pytest.approx(0.9) and big.label == label
    small = min(merged, key=lambda d: d.area)
    assert np.array_equal(paste(small, shape), other)


def test_neighbours_that_only_touch_the_overlap_stay_apart():
    shape = (100, 200)
    a = np.zeros(shape, bool)
    a[20:60, 60:90] = True
    b = np.zeros(shape, bool)
    b[20:60, 95:130] = True
    left, right = (0, 0, 128, 100), (72, 0, 200, 100)
    merged = stitch([tile_view(a, left, 1, 0.9), tile_view(b, right, 1, 0.9)])
    assert len(merged) == 2
    # The same flake reported by both tiles (fully inside the overlap) is merged.
    c = np.zeros(shape, bool)
    c[40:70, 80:120] = True
    merged = stitch([tile_view(c, left, 1, 0.6), tile_view(c, right, 2, 0.8)])
    assert len(merged) == 1 and merged[0].label == 2 and np.array_equal(paste(merged[0], shape), c)


def test_backend_tiles_a_frame_and_labels_every_flake_with_the_model_version(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(input_size=64, pixel_scale=1.0, fpn_channels=16, embedding_dim=16, box_head_dim=32,
                         mask_head_channels=(16,), anchor_sizes=(16, 32, 64, 128), rpn_proposals_test=20)
    model = build_model(config, pretrained_backbone=False)
    path = tmp_path / 'tiny.pt'
    card = save_checkpoint(path, model, config, {'command': 'test'})
    detector = make_detector('maskrcnn', model_path=str(path), score_threshold=0.0, overlap_px=16,
                             refine_thickness=True, min_area_px=1, tile_size=64, runtime='torch')
    assert isinstance(detector, MaskRCNNDetector)
    assert detector.model_version == card['model_version']
    frame = np.full((90, 150, 3), (150, 140, 160), np.uint8)
    cv2.circle(frame, (75, 45), 15, (120, 110, 150), -1)
    result = detector.detect(frame)
    assert result.detections  # an untrained net still scores every class above zero
    assert result.timings['tiles'] == len(tile_origins(90, 64, 16)) * len(tile_origins(150, 64, 16))
    for det in result.detections:
        assert det.detector == 'maskrcnn' and det.model_version == card['model_version']
        x, y, w, h = det.bbox
        assert 0 <= x and x + w <= 150 and 0 <= y and y + h <= 90
        assert det.material in ('graphene', 'hbn', 'mos2', 'wte2')
    with pytest.raises(ValueError):
        detector.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(FileNotFoundError):
        MaskRCNNDetector(model_path=str(tmp_path / 'missing.pt'))
