"""Hexagonal-net casting (Yang et al. (2024), Fig. 2b): two unit cells from one hexagonal cell.

For a hexagonal-cell box (x_min, y_min, x_max, y_max) of width W_H and height H_H:
A = (x_min, y_min), B = (x_min + alpha W_H, y_min + beta H_H),
C = (x_max - alpha W_H, y_max - beta H_H), D = (x_max, y_max);
the unit cells are the boxes A-B (upper left) and C-D (lower right).

Neighbouring hexagons share unit cells (the upper-left cell of one hexagon is the
lower-right cell of the hexagon up and to its left), so cast cells are merged by
non-maximum suppression before they are counted.
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.65  # W_U / W_H
BETA = 0.5    # H_U / H_H


def cast_unit_cells(hex_boxes: np.ndarray, alpha: float = ALPHA, beta: float = BETA) -> np.ndarray:
    """(N, 4) hexagonal-cell boxes -> (2N, 4) unit-cell boxes: upper-left then lower-right of each."""
    if not (0 < alpha <= 1 and 0 < beta <= 1):
        raise ValueError(f'alpha and beta must be in (0, 1], got {alpha}, {beta}')
    boxes = np.asarray(hex_boxes, dtype=np.float64).reshape(-1, 4)
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    upper_left = np.stack([boxes[:, 0], boxes[:, 1],
                           boxes[:, 0] + alpha * width, boxes[:, 1] + beta * height], 1)
    lower_right = np.stack([boxes[:, 2] - alpha * width, boxes[:, 3] - beta * height,
                            boxes[:, 2], boxes[:, 3]], 1)
    return np.stack([upper_left, lower_right], 1).reshape(-1, 4)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def merge_duplicates(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind='stable')
    keep: list[int] = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    iou = box_iou(boxes, boxes) if len(boxes) else np.zeros((0, 0))
    for index in order:
        if suppressed[index]:
            continue
        keep.append(int(index))
        suppressed |= iou[index] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def match_accuracy(predicted: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> tuple[float, np.ndarray]:
    """Yang et al.'s unit-cell detection accuracy: share of true cells matched one-to-one with IoU > 0.5.

    Returns the accuracy and, per true cell, the index of its matched prediction (-1 if none).
    """
    truth = np.asarray(truth).reshape(-1, 4)
    matches = np.full(len(truth), -1, dtype=np.int64)
    if len(truth) == 0:
        return 1.0, matches
    if len(predicted) == 0:
        return 0.0, matches
    iou = box_iou(truth, predicted)
    pairs = np.argwhere(iou > iou_threshold)
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind='stable')
    used = set()
    for t, p in pairs[order]:
        if matches[t] < 0 and p not in used:
            matches[t] = p
            used.add(int(p))
    return float((matches >= 0).mean()), matches
