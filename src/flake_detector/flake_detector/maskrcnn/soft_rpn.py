"""Region proposal network with per-anchor embeddings and attention soft labels (Nguyen et al. 2022).

Missing annotations turn real flakes into "negative" anchors, and a plain RPN is then
trained to call them background. Nguyen et al. give every anchor an embedding; negatives
whose embedding attends strongly to a positive one get that attention score as a soft
objectness target instead of 0.

Head layout (eq. 4 of the paper): ``G_share`` (3x3 conv) -> ``G_reg`` (box deltas) and
``G_e`` (one D-dimensional embedding per anchor) -> ``G_cls`` (a grouped 1x1 conv, so
each anchor's objectness is read from its own embedding only).

Attention (eq. 5): ``A = softmax(norm(F_neg) @ norm(F_pos).T / temperature)``. Two
choices the paper leaves open are made here, both configurable:

* keys are per-instance prototypes (the mean embedding of the positive anchors that
  match one ground-truth box) rather than every positive anchor: the dozens of positive
  anchors on one flake are near-duplicates, and a softmax over them spreads the mass so
  thinly that no negative could ever pass t;
* a background prototype (mean negative embedding) is added as one more key, so a
  negative that looks like background sends its attention there; soft labels are read
  from the object columns only. Without it an image with a single annotated flake would
  make every negative attend to that flake with weight 1.

Attention is computed on detached embeddings: the soft target must not be something the
network can raise by moving embeddings together.

An untrained embedding says nothing: with random embeddings about a fifth of the sampled
background anchors pass t and the objectness loss stalls. Soft labels are therefore off for
``warmup_iterations`` (the RPN learns objectness as the plain baseline does), and t then falls
linearly from 1 to its value over ``ramp_iterations``, so only the negatives that attend to a
flake almost certainly are softened first. The trainer tells the RPN its iteration.

The embedding is linear (no activation): signed embeddings spread their cosine similarities
over [-1, 1] instead of crowding near 1, and ``G_cls`` after a linear ``G_e`` folds into one
1x1 convolution for inference (``fused_objectness``), so the D channels per anchor cost
nothing once training is over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers


@dataclass(frozen=True)
class SoftLabelConfig:
    """Switches of the soft-label RPN; ``enabled=False`` is the plain Mask R-CNN baseline."""

    enabled: bool = True
    threshold: float = 0.8
    temperature: float = 0.1
    instance_prototypes: bool = True
    background_key: bool = True
    # Soft labels start after this many training iterations, with t falling from 1 to
    # ``threshold`` over the next ``ramp_iterations``.
    warmup_iterations: int = 0
    ramp_iterations: int = 0

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f'soft-label threshold t must be in (0, 1], got {self.threshold}')
        if self.temperature <= 0.0:
            raise ValueError(f'attention temperature must be > 0, got {self.temperature}')
        if self.warmup_iterations < 0 or self.ramp_iterations < 0:
            raise ValueError('warmup_iterations and ramp_iterations must be >= 0')

    def threshold_at(self, iteration: int) -> float | None:
        """t at a training iteration; None while soft labels are off (disabled or warming up)."""
        if not self.enabled or iteration < self.warmup_iterations:
            return None
        if self.ramp_iterations <= 0:
            return self.threshold
        progress = min(1.0, (iteration - self.warmup_iterations) / self.ramp_iterations)
        return 1.0 - (1.0 - self.threshold) * progress


def attention_soft_labels(negative_embeddings: Tensor, positive_embeddings: Tensor,
                          positive_groups: Tensor | None = None, threshold: float = 0.8,
                          temperature: float = 1.0, background_key: bool = False) -> Tensor:
    """Soft objectness targets for negative anchors (Nguyen et al. (2022), eq. 5 and the L_neg rule).

    ``negative_embeddings`` (N_neg x D), ``positive_embeddings`` (N_pos x D);
    ``positive_groups`` (N_pos, int) merges positives of the same instance into one key.
    Returns N_neg targets: ``max_j A_ij`` where that is >= ``threshold``, else 0.
    """
    n_neg = negative_embeddings.shape[0]
    if n_neg == 0 or positive_embeddings.shape[0] == 0:
        return negative_embeddings.new_zeros(n_neg)
    negatives = functional.normalize(negative_embeddings.float(), dim=1)
    keys = functional.normalize(positive_embeddings.float(), dim=1)
    if positive_groups is not None:
        groups, inverse = torch.unique(positive_groups, return_inverse=True)
        sums = keys.new_zeros(len(groups), keys.shape[1]).index_add_(0, inverse, keys)
        keys = functional.normalize(sums, dim=1)
    n_objects = keys.shape[0]
    if background_key:
        background = functional.normalize(negatives.mean(dim=0, keepdim=True), dim=1)
        keys = torch.cat([keys, background], dim=0)
    attention = torch.softmax(negatives @ keys.T / temperature, dim=1)
    best = attention[:, :n_objects].max(dim=1).values
    return torch.where(best >= threshold, best, torch.zeros_like(best))


class EmbeddingRPNHead(nn.Module):
    """RPN head with a D-dimensional embedding per anchor from which objectness is read."""

    def __init__(self, in_channels: int, num_anchors: int, embedding_dim: int = 256, embedding_relu: bool = False):
        super().__init__()
        self.num_anchors = num_anchors
        self.embedding_dim = embedding_dim
        # Checkpoints from before the linear embedding had a ReLU after G_e; they load as they were.
        self.embedding_relu = embedding_relu
        self.shared = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        self.embedding = nn.Conv2d(in_channels, num_anchors * embedding_dim, kernel_size=1)
        self.cls_logits = nn.Conv2d(num_anchors * embedding_dim, num_anchors, kernel_size=1, groups=num_anchors)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
        # Objectness is the product of G_e and G_cls: with both at torchvision's std 0.01 each
        # one's gradient is scaled by the other's tiny weights and objectness hardly learns.
        # G_e starts variance-preserving instead, so G_cls learns as a plain RPN's classifier does.
        nn.init.normal_(self.embedding.weight, std=in_channels ** -0.5)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        logits, deltas, embeddings = [], [], []
        for feature in features:
            shared = functional.relu(self.shared(feature))
            embedding = self.embedding(shared)
            if self.embedding_relu:
                embedding = functional.relu(embedding)
            logits.append(self.cls_logits(embedding))
            deltas.append(self.bbox_pred(shared))
            embeddings.append(embedding)
        return logits, deltas, embeddings

    def fused_objectness(self) -> nn.Module:
        """``G_cls`` after ``G_e`` as one 1x1 convolution (exact: both are linear); the two
        layers as they are for a legacy head with a ReLU between them."""
        if self.embedding_relu:
            return nn.Sequential(self.embedding, nn.ReLU(), self.cls_logits)
        a, d = self.num_anchors, self.embedding_dim
        channels = self.embedding.in_channels
        embed_w = self.embedding.weight.view(a, d, channels)
        cls_w = self.cls_logits.weight.view(a, d)
        fused = nn.Conv2d(channels, a, kernel_size=1)
        with torch.no_grad():
            fused.weight.copy_(torch.einsum('ad,adc->ac', cls_w, embed_w).view(a, channels, 1, 1))
            fused.bias.copy_((cls_w * self.embedding.bias.view(a, d)).sum(dim=1) + self.cls_logits.bias)
        return fused

    def dense(self, features: list[Tensor], fused: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """Inference outputs (objectness, box deltas per level) through the fused objectness."""
        logits, deltas = [], []
        for feature in features:
            shared = functional.relu(self.shared(feature))
            logits.append(fused(shared))
            deltas.append(self.bbox_pred(shared))
        return logits, deltas


def flatten_embeddings(embeddings: list[Tensor], num_anchors: int) -> Tensor:
    """Per-level (N, A*D, H, W) maps to (N, sum H*W*A, D), in the anchor order of torchvision's RPN."""
    flat = []
    for level in embeddings:
        n, channels, h, w = level.shape
        d = channels // num_anchors
        flat.append(level.view(n, num_anchors, d, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, d))
    return torch.cat(flat, dim=1)


class SoftLabelRPN(RegionProposalNetwork):
    """torchvision's RPN with the soft-label loss; with soft labels off it trains as the baseline."""

    def __init__(self, *args, soft_labels: SoftLabelConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.soft_labels = soft_labels or SoftLabelConfig()
        # Fraction of sampled negatives that received a soft label in the last step (for logs).
        self.last_soft_fraction = 0.0
        # Training iteration, set by the trainer: drives the warm-up and the schedule on t.
        self.iteration = 0

    def proposals_from_dense(self, images, feature_maps: list[Tensor], logits: list[Tensor],
                             deltas: list[Tensor]):
        """Proposals from the head's outputs, wherever they were computed (torch or ONNX Runtime);
        also the anchors and the flattened objectness and deltas the loss needs."""
        anchors = self.anchor_generator(images, feature_maps)
        anchors_per_level = [o[0].numel() for o in logits]
        objectness, box_deltas = concat_box_prediction_layers(logits, deltas)
        proposals = self.box_coder.decode(box_deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _scores = self.filter_proposals(proposals, objectness, images.image_sizes, anchors_per_level)
        return boxes, anchors, objectness, box_deltas

    def forward(self, images, features: dict[str, Tensor], targets=None):
        feature_maps = list(features.values())
        logits, deltas, embeddings = self.head(feature_maps)
        boxes, anchors, objectness, box_deltas = self.proposals_from_dense(images, feature_maps, logits, deltas)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError('targets are required in training mode')
            labels, matched_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_boxes, anchors)
            anchor_embeddings = flatten_embeddings(embeddings, self.head.num_anchors)
            loss_objectness, loss_box = self.soft_label_loss(
                objectness, box_deltas, labels, regression_targets, matched_boxes, anchor_embeddings)
            losses = {'loss_objectness': loss_objectness, 'loss_rpn_box_reg': loss_box}
        return boxes, losses

    def soft_label_loss(self, objectness: Tensor, box_deltas: Tensor, labels: list[Tensor],
                        regression_targets: list[Tensor], matched_boxes: list[Tensor],
                        anchor_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        positive_masks, negative_masks = self.fg_bg_sampler(labels)
        objectness = objectness.flatten()
        deltas_per_image = box_deltas.view(len(labels), -1, 4)
        logits_per_image = objectness.view(len(labels), -1)
        sampled_logits, sampled_targets, positive_deltas, positive_targets = [], [], [], []
        soft_count, negative_count = 0, 0
        threshold = self.soft_labels.threshold_at(self.iteration)
        for i, (pos_mask, neg_mask) in enumerate(zip(positive_masks, negative_masks, strict=True)):
            pos = torch.where(pos_mask)[0]
            neg = torch.where(neg_mask)[0]
            neg_targets = logits_per_image.new_zeros(len(neg))
            if threshold is not None and len(pos) and len(neg):
                groups = None
                if self.soft_labels.instance_prototypes:
                    _, groups = torch.unique(matched_boxes[i][pos], dim=0, return_inverse=True)
                with torch.no_grad():
                    neg_targets = attention_soft_labels(
                        anchor_embeddings[i, neg].detach(), anchor_embeddings[i, pos].detach(), groups,
                        threshold, self.soft_labels.temperature,
                        self.soft_labels.background_key)
                soft_count += int((neg_targets > 0).sum())
            negative_count += len(neg)
            sampled_logits += [logits_per_image[i, pos], logits_per_image[i, neg]]
            sampled_targets += [torch.ones_like(logits_per_image[i, pos]), neg_targets]
            positive_deltas.append(deltas_per_image[i, pos])
            positive_targets.append(regression_targets[i][pos])
        self.last_soft_fraction = soft_count / max(negative_count, 1)
        logits = torch.cat(sampled_logits)
        targets = torch.cat(sampled_targets)
        box_loss = functional.smooth_l1_loss(torch.cat(positive_deltas), torch.cat(positive_targets),
                                    beta=1 / 9, reduction='sum') / max(logits.numel(), 1)
        objectness_loss = functional.binary_cross_entropy_with_logits(logits, targets)
        return objectness_loss, box_loss
