"""The maskrcnn backend gives the same flakes in ONNX Runtime as in torch; optics name the material."""

import numpy as np
import pytest
import torch

from flake_core import materials
from flake_detector.detection import Detection
from flake_detector.maskrcnn.infer import SHIPPED_MODEL, MaskRCNNDetector, paste_mask
from flake_detector.maskrcnn.model import ModelConfig, build_model
from flake_detector.maskrcnn.train import save_checkpoint
from flake_detector.optical import thin_film_contrast

torch.set_num_threads(1)  # more threads thrash on shared, busy cores


def simulated_frames(count=3, size=256):
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.cli import dataset_positions
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    wafer = VirtualWafer.generate(WaferConfig(seed=77, thin_fraction=0.5))
    camera = CameraModel(wafer, CameraSettings(width=size, height=size, seed=77))
    return [camera.render(x, y) for _, x, y in dataset_positions(camera, count, 0.0, 77)]


def box_iou(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def test_onnx_runtime_and_torch_find_the_same_flakes_with_the_shipped_model():
    pytest.importorskip('onnxruntime')
    frames = simulated_frames()
    common = dict(score_threshold=0.05, threads=1, refine_thickness=False)
    in_torch = MaskRCNNDetector(SHIPPED_MODEL, runtime='torch', **common)
    in_onnx = MaskRCNNDetector(SHIPPED_MODEL, runtime='onnxruntime', **common)
    assert (in_torch.runtime, in_onnx.runtime) == ('torch', 'onnxruntime')
    batch = torch.from_numpy(frames[0][..., ::-1].copy()).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    for a, b in zip(in_torch._dense_outputs(batch), in_onnx._dense_outputs(batch), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    found = 0
    for frame in frames:
        ours, theirs = in_torch.detect(frame).detections, in_onnx.detect(frame).detections
        # Scores right at the cut may fall either side of it: compare the ones clear of it.
        confident = [d for d in ours if d.score >= 0.1]
        found += len(confident)
        for det in confident:
            twin = max(theirs, key=lambda o: box_iou(o.bbox, det.bbox))
            assert box_iou(twin.bbox, det.bbox) >= 0.9 and twin.score == pytest.approx(det.score, abs=0.02)
    assert found  # something to compare: flakes fill these frames


def tiny_agnostic_checkpoint(path):
    config = ModelConfig(input_size=64, pixel_scale=1.0, fpn_channels=8, embedding_dim=4, box_head_dim=16,
                         mask_head_channels=(8,), class_agnostic=True, anchor_sizes='12,28,64,128',
                         rpn_proposals_test=10)
    save_checkpoint(path, build_model(config, pretrained_backbone=False), config, {'command': 'test'})
    return path


def test_a_class_agnostic_flake_takes_material_and_layers_from_its_colour(tmp_path):
    detector = MaskRCNNDetector(tiny_agnostic_checkpoint(tmp_path / 'flake.pt'), runtime='torch',
                                calibration='model')
    substrate = np.array([120.0, 110.0, 140.0])  # B, G, R
    frame = np.tile(substrate, (160, 240, 1))
    red, green, blue = thin_film_contrast('graphene', 5, 90.0)
    frame[30:90, 30:90] = substrate * (1 + np.array([blue, green, red]))
    frame[30:90, 140:200] = substrate * np.array([0.4, 1.6, 0.5])  # a colour no material has
    frame = np.clip(np.round(frame), 0, 255).astype(np.uint8)
    mask = np.ones((60, 60), bool)
    flakes = [Detection((30, 30, 60, 60), mask, material=materials.UNKNOWN),
              Detection((140, 30, 60, 60), mask, material=materials.UNKNOWN)]
    detector._optical(frame, flakes)
    graphene, odd = flakes
    assert graphene.material == 'graphene' and graphene.layers == pytest.approx(5, abs=1)
    assert graphene.layer_class == materials.LAYER_FEW
    assert odd.material == materials.UNKNOWN and odd.layer_class == materials.LAYER_UNKNOWN
    assert odd.extra['optical_mahalanobis'] > detector.gate_sigma


def test_whole_frames_run_as_one_piece_and_only_large_ones_are_tiled(tmp_path):
    detector = MaskRCNNDetector(tiny_agnostic_checkpoint(tmp_path / 'flake.pt'), runtime='torch',
                                max_tile_px=1024, overlap_px=32)
    assert detector.tile_windows(1024, 1024) == [(0, 0, 1024, 1024)]
    windows = detector.tile_windows(1200, 1920)
    assert len(windows) == 4 and max(x1 - x0 for x0, _, x1, _ in windows) == 1024
    with pytest.raises(ValueError):
        MaskRCNNDetector(tmp_path / 'flake.pt', runtime='tensorflow')


def test_pasted_mask_fills_its_box():
    probability = np.ones((28, 28), np.float32)
    mask, (x, y) = paste_mask(probability, (10.0, 20.0, 30.0, 36.0), 0.5, (100, 100))
    ys, xs = np.nonzero(mask)
    assert (x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1) == (10, 20, 30, 36)
    assert paste_mask(np.zeros((28, 28), np.float32), (10.0, 20.0, 30.0, 36.0), 0.5, (100, 100)) is None
