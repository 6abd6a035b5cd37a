"""Soft-label RPN (Nguyen et al. (2022)): attention soft labels from hand-made embeddings, and the loss."""

import numpy as np
import pytest
import torch
from torch.nn import functional

from flake_detector.maskrcnn.model import ModelConfig, build_model
from flake_detector.maskrcnn.soft_rpn import (
    EmbeddingRPNHead,
    SoftLabelConfig,
    SoftLabelRPN,
    attention_soft_labels,
    flatten_embeddings,
)

D = 8
torch.set_num_threads(1)  # more threads thrash on shared, busy cores


def unit(*weights):
    v = torch.zeros(D)
    v[:len(weights)] = torch.tensor(weights, dtype=torch.float32)
    return v / v.norm()


def reference_attention(negatives, keys, temperature):
    n = negatives.numpy() / np.linalg.norm(negatives.numpy(), axis=1, keepdims=True)
    k = keys.numpy() / np.linalg.norm(keys.numpy(), axis=1, keepdims=True)
    logits = n @ k.T / temperature
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_only_negatives_whose_attention_passes_t_get_a_soft_label():
    positives = torch.stack([unit(1, 0, 0), unit(0, 1, 0)])
    negatives = torch.stack([
        unit(1, 0.05, 0),      # looks like the first positive: a missing annotation
        unit(0, 0, 1),         # plain background
        unit(1, 1, 0),         # halfway between the two positives: attention is split
        unit(0.2, 0, 1),       # mostly background
    ])
    labels = attention_soft_labels(negatives, positives, threshold=0.8, temperature=0.1)
    attention = reference_attention(negatives, positives, 0.1)
    best = attention.max(axis=1)
    assert best[0] > 0.8 and best[2] < 0.8
    expected = np.where(best >= 0.8, best, 0.0)
    np.testing.assert_allclose(labels.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert labels[0] == pytest.approx(best[0], rel=1e-5)
    assert labels[1] == 0 and labels[2] == 0


def test_threshold_above_every_attention_gives_no_soft_labels():
    positives = torch.stack([unit(1, 0), unit(0, 1)])
    negatives = torch.stack([unit(1, 0.3), unit(0.3, 1)])
    best = reference_attention(negatives, positives, 1.0).max(axis=1)
    labels = attention_soft_labels(negatives, positives, threshold=float(best.max()) + 0.01, temperature=1.0)
    assert torch.count_nonzero(labels) == 0
    labels = attention_soft_labels(negatives, positives, threshold=float(best.min()) - 0.01, temperature=1.0)
    np.testing.assert_allclose(labels.numpy(), best, rtol=1e-5)


def test_instance_prototypes_and_background_key():
    # Five positive anchors on one flake: a softmax over anchors would cap attention at ~1/5.
    flake = torch.stack([unit(1, 0.01 * i, 0) for i in range(5)])
    negatives = torch.stack([unit(1, 0.02, 0), unit(0, 0, 1), unit(0, 0.1, 1)])
    per_anchor = attention_soft_labels(negatives, flake, threshold=0.5, temperature=0.1)
    assert torch.count_nonzero(per_anchor) == 0
    groups = torch.zeros(5, dtype=torch.long)
    # One instance and no background key: every negative attends to it with weight 1.
    grouped = attention_soft_labels(negatives, flake, groups, threshold=0.8, temperature=0.1)
    assert torch.all(grouped == 1.0)
    # The background key takes the mass of background-like negatives.
    with_background = attention_soft_labels(negatives, flake, groups, threshold=0.8, temperature=0.1,
                                            background_key=True)
    assert with_background[0] >= 0.8
    assert with_background[1] == 0 and with_background[2] == 0


def test_empty_sets():
    assert attention_soft_labels(torch.zeros(0, D), torch.ones(3, D)).numel() == 0
    assert torch.all(attention_soft_labels(torch.ones(4, D), torch.zeros(0, D)) == 0)
    with pytest.raises(ValueError):
        SoftLabelConfig(threshold=1.5)


def _rpn(enabled: bool) -> SoftLabelRPN:
    built = build_model(ModelConfig(input_size=64, fpn_channels=16, embedding_dim=D,
                                    soft_labels={'enabled': enabled, 'threshold': 0.8, 'temperature': 0.1,
                                                 'instance_prototypes': True, 'background_key': True}),
                        pretrained_backbone=False)
    return built.rpn


@pytest.mark.parametrize('enabled', [True, False])
def test_rpn_loss_uses_soft_targets_only_when_switched_on(enabled):
    torch.manual_seed(0)
    rpn = _rpn(enabled)
    # One image, six anchors: two positives of one flake, four negatives, one ignored.
    labels = [torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0])]
    box = torch.tensor([10.0, 10.0, 30.0, 30.0])
    matched = [torch.stack([box, box] + [torch.zeros(4)] * 5)]
    embeddings = torch.stack([unit(1, 0, 0), unit(1, 0.02, 0), unit(1, 0.03, 0), unit(0, 0, 1),
                              unit(0, 0.1, 1), unit(0.1, 0, 1), unit(1, 0, 0)]).unsqueeze(0)
    objectness = torch.linspace(-1.0, 1.0, 7)
    deltas = torch.zeros(7, 4)
    targets = [torch.zeros(7, 4)]
    loss, box_loss = rpn.soft_label_loss(objectness, deltas, labels, targets, matched, embeddings)
    soft = attention_soft_labels(embeddings[0, 2:6], embeddings[0, :2], torch.zeros(2, dtype=torch.long),
                                 0.8, 0.1, background_key=True)
    expected_targets = torch.cat([torch.ones(2), soft if enabled else torch.zeros(4)])
    expected = functional.binary_cross_entropy_with_logits(objectness[:6], expected_targets)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(box_loss) == 0.0
    if enabled:
        assert soft[0] >= 0.8 and torch.count_nonzero(soft) == 1  # only the flake-like negative
        assert rpn.last_soft_fraction == pytest.approx(0.25)
    else:
        assert rpn.last_soft_fraction == 0.0


def test_embedding_order_matches_objectness_order():
    torch.manual_seed(1)
    head = EmbeddingRPNHead(in_channels=4, num_anchors=3, embedding_dim=5)
    features = [torch.randn(2, 4, 3, 2), torch.randn(2, 4, 2, 2)]
    logits, _, embeddings = head(features)
    flat = flatten_embeddings(embeddings, 3)
    # Objectness recomputed from each anchor's own embedding equals the head's logit.
    from torchvision.models.detection.rpn import concat_box_prediction_layers
    objectness, _ = concat_box_prediction_layers(logits, [torch.zeros(2, 12, *f.shape[-2:]) for f in features])
    weight = head.cls_logits.weight.view(3, 5)
    bias = head.cls_logits.bias
    anchor_ids = torch.arange(flat.shape[1]) % 3
    recomputed = (flat * weight[anchor_ids]).sum(-1) + bias[anchor_ids]
    torch.testing.assert_close(recomputed.flatten(), objectness.flatten(), rtol=1e-5, atol=1e-6)


def test_soft_labels_wait_for_the_warm_up_then_t_falls_to_its_value():
    config = SoftLabelConfig(threshold=0.8, warmup_iterations=100, ramp_iterations=50)
    assert config.threshold_at(0) is None and config.threshold_at(99) is None
    assert config.threshold_at(100) == pytest.approx(1.0)
    assert config.threshold_at(125) == pytest.approx(0.9)
    assert config.threshold_at(150) == pytest.approx(0.8) and config.threshold_at(10_000) == pytest.approx(0.8)
    assert SoftLabelConfig(enabled=False).threshold_at(10_000) is None
    with pytest.raises(ValueError):
        SoftLabelConfig(warmup_iterations=-1)


def test_rpn_gives_no_soft_label_during_the_warm_up():
    torch.manual_seed(0)
    built = build_model(ModelConfig(input_size=64, fpn_channels=16, embedding_dim=D,
                                    soft_labels={'threshold': 0.8, 'temperature': 0.1, 'warmup_iterations': 10}),
                        pretrained_backbone=False)
    rpn = built.rpn
    labels = [torch.tensor([1.0, 1.0, 0.0, 0.0])]
    box = torch.tensor([10.0, 10.0, 30.0, 30.0])
    matched = [torch.stack([box, box, torch.zeros(4), torch.zeros(4)])]
    # The first negative looks exactly like the flake: after the warm-up it is softened.
    embeddings = torch.stack([unit(1, 0, 0), unit(1, 0.01, 0), unit(1, 0.01, 0), unit(0, 0, 1)]).unsqueeze(0)
    args = (torch.zeros(4), torch.zeros(4, 4), labels, [torch.zeros(4, 4)], matched, embeddings)
    rpn.iteration = 9
    rpn.soft_label_loss(*args)
    assert rpn.last_soft_fraction == 0.0
    rpn.iteration = 10
    rpn.soft_label_loss(*args)
    assert rpn.last_soft_fraction == pytest.approx(0.5)


def test_fused_objectness_equals_the_embedding_path():
    torch.manual_seed(2)
    head = EmbeddingRPNHead(in_channels=6, num_anchors=4, embedding_dim=5)
    for layer in head.modules():  # away from the tiny initialisation, so the check means something
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.normal_(layer.weight)
            torch.nn.init.normal_(layer.bias)
    features = [torch.randn(2, 6, 5, 4), torch.randn(2, 6, 3, 3)]
    logits, deltas, _ = head(features)
    fused_logits, fused_deltas = head.dense(features, head.fused_objectness())
    for a, b in zip(logits + deltas, fused_logits + fused_deltas, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
