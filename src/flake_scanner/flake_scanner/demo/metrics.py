"""Wafer-level scoring of a scan against the simulator's ground truth (pure core).

A registry flake matches a true flake when its wafer-frame centre lies inside the
true outline. Precision counts registry flakes that match something; recall
counts true flakes (large enough to be found) that some registry flake matched.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import cv2
import numpy as np

from flake_scanner.sim.wafer import VirtualWafer, layer_class

TRUTH_KINDS = ('flake', 'terrace', 'fold')
LAYER_CLASSES = ('mono', 'few', 'thick', 'bulk')


@dataclass(frozen=True)
class TruthFlake:
    object_id: int
    kind: str
    material: str
    layers: int
    layer_class: str
    centre: tuple[float, float]
    area: float
    polygon: np.ndarray
    z_order: int

    def contains(self, x: float, y: float) -> bool:
        contour = self.polygon.astype(np.float32).reshape(-1, 1, 2)
        return cv2.pointPolygonTest(contour, (float(x), float(y)), False) >= 0


@dataclass(frozen=True)
class FoundFlake:
    flake_id: str
    material: str
    layer_class: str
    centre: tuple[float, float]
    area: float
    score: float = 0.0


@dataclass
class MaterialScore:
    found: int = 0
    true: int = 0
    matched_found: int = 0
    matched_true: int = 0
    layer_class_correct: int = 0
    material_correct: int = 0

    @property
    def precision(self) -> float:
        return self.matched_found / self.found if self.found else float('nan')

    @property
    def recall(self) -> float:
        return self.matched_true / self.true if self.true else float('nan')


@dataclass
class ScanScore:
    per_material: dict[str, MaterialScore] = field(default_factory=lambda: defaultdict(MaterialScore))
    matches: dict[str, int] = field(default_factory=dict)  # registry id -> truth object id
    found_by_class: Counter = field(default_factory=Counter)  # (material, layer class) -> count
    true_by_class: Counter = field(default_factory=Counter)

    def total(self) -> MaterialScore:
        total = MaterialScore()
        for score in self.per_material.values():
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(score, name))
        return total


def truth_in_region(wafer: VirtualWafer, min_x: float, min_y: float, max_x: float, max_y: float,
                    min_area: float = 20e-12) -> list[TruthFlake]:
    """True flakes (and terraces/folds) lying wholly inside the region, at least ``min_area``."""
    truth = []
    for obj in wafer.objects_in_rect(min_x, min_y, max_x, max_y):
        if obj.kind not in TRUTH_KINDS or obj.area_m2 < min_area:
            continue
        x0, y0, x1, y1 = obj.bbox
        if x0 < min_x or y0 < min_y or x1 > max_x or y1 > max_y:
            continue
        truth.append(TruthFlake(obj.object_id, obj.kind, obj.material, obj.layers, layer_class(obj.layers),
                                obj.centre, obj.area_m2, obj.polygon, obj.z_order))
    return truth


def score_scan(found: list[FoundFlake], truth: list[TruthFlake],
               region: tuple[float, float, float, float] | None = None) -> ScanScore:
    """Match registry flakes to true flakes; the topmost true outline holding the centre wins.

    Registry flakes whose centre lies outside ``region`` are ignored (a scan sees a
    margin beyond the region it was asked for).
    """
    score = ScanScore()
    if region is not None:
        x0, y0, x1, y1 = region
        found = [f for f in found if x0 <= f.centre[0] <= x1 and y0 <= f.centre[1] <= y1]
    for t in truth:
        score.per_material[t.material].true += 1
        score.true_by_class[(t.material, t.layer_class)] += 1
    matched_truth: set[int] = set()
    by_id = {t.object_id: t for t in truth}
    for flake in found:
        candidates = [t for t in truth if t.contains(*flake.centre)]
        material = flake.material
        score.found_by_class[(material, flake.layer_class)] += 1
        if not candidates:
            score.per_material[material].found += 1
            continue
        best = max(candidates, key=lambda t: (t.z_order, -t.area))
        # A found flake counts under the true material, so precision is per real material.
        entry = score.per_material[best.material]
        entry.found += 1
        entry.matched_found += 1
        entry.material_correct += int(material == best.material)
        entry.layer_class_correct += int(flake.layer_class == best.layer_class)
        score.matches[flake.flake_id] = best.object_id
        matched_truth.add(best.object_id)
    for object_id in matched_truth:
        score.per_material[by_id[object_id].material].matched_true += 1
    return score
