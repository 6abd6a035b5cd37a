"""Wafer-level scoring of a scan against the simulator's ground truth (pure core).

A registry flake matches a true flake when its wafer-frame centre lies inside the
true outline. The targets are the flakes a lab hunts: 1-40 layers (Masubuchi et al.'s mono,
few and thick classes; bulk crystals are not reported) and large enough to be
useful. Precision counts registry flakes that match a target; recall counts targets
that some registry flake matched. A registry flake on a true flake of target
thickness that is merely too small is neither right nor wrong, and is left out.

The flakes people hunt get their own recall: a true monolayer counts as found when a
registry flake on it says "mono" of its material (a monolayer called few-layer, or of
another material, is not what a hunter looks for), a true thin flake (1-10 layers) when a
registry flake on it says mono or few of its material.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import cv2
import numpy as np

from flake_core.materials import layer_class_name
from flake_scanner.sim.wafer import VirtualWafer

TRUTH_KINDS = ('flake', 'terrace', 'fold')
TARGET_MAX_LAYERS = 40
THIN_MAX_LAYERS = 10  # the flakes labs stack: mono and few-layer
THIN_CLASSES = ('mono', 'few')
MIN_TARGET_AREA = 20e-12  # [m^2]
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
    thin_true: int = 0
    thin_matched: int = 0       # thin targets some registry flake lies on, whatever its class
    thin_right: int = 0         # ... one that calls it mono or few
    mono_true: int = 0
    mono_matched: int = 0
    mono_right: int = 0         # true monolayers a registry flake calls mono

    @property
    def precision(self) -> float:
        return self.matched_found / self.found if self.found else float('nan')

    @property
    def recall(self) -> float:
        return self.matched_true / self.true if self.true else float('nan')

    @property
    def mono_recall(self) -> float:
        return self.mono_right / self.mono_true if self.mono_true else float('nan')

    @property
    def thin_recall(self) -> float:
        return self.thin_right / self.thin_true if self.thin_true else float('nan')


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
                    min_area: float = MIN_TARGET_AREA, max_layers: float = float('inf')) -> list[TruthFlake]:
    """True flakes (and terraces/folds) lying wholly inside the region, at least ``min_area``
    and at most ``max_layers`` thick."""
    truth = []
    for obj in wafer.objects_in_rect(min_x, min_y, max_x, max_y):
        if obj.kind not in TRUTH_KINDS or obj.area_m2 < min_area or obj.layers > max_layers:
            continue
        x0, y0, x1, y1 = obj.bbox
        if x0 < min_x or y0 < min_y or x1 > max_x or y1 > max_y:
            continue
        truth.append(TruthFlake(obj.object_id, obj.kind, obj.material, obj.layers, layer_class_name(obj.layers),
                                obj.centre, obj.area_m2, obj.polygon, obj.z_order))
    return truth


def targets_in_region(wafer: VirtualWafer, min_x: float, min_y: float, max_x: float, max_y: float
                      ) -> tuple[list[TruthFlake], list[TruthFlake]]:
    """(targets, ignored): the flakes a scan should find, and those of target thickness too small to count."""
    every = truth_in_region(wafer, min_x, min_y, max_x, max_y, min_area=0.0, max_layers=TARGET_MAX_LAYERS)
    return ([t for t in every if t.area >= MIN_TARGET_AREA], [t for t in every if t.area < MIN_TARGET_AREA])


def score_scan(found: list[FoundFlake], truth: list[TruthFlake],
               region: tuple[float, float, float, float] | None = None,
               ignored: list[TruthFlake] = ()) -> ScanScore:
    """Match registry flakes to true flakes; the topmost true outline holding the centre wins.

    Registry flakes whose centre lies outside ``region`` are left out (a scan sees a
    margin beyond the region it was asked for), and so are those whose topmost true
    outline is one of ``ignored``.
    """
    score = ScanScore()
    if region is not None:
        x0, y0, x1, y1 = region
        found = [f for f in found if x0 <= f.centre[0] <= x1 and y0 <= f.centre[1] <= y1]
    for t in truth:
        score.per_material[t.material].true += 1
        score.per_material[t.material].thin_true += int(t.layers <= THIN_MAX_LAYERS)
        score.per_material[t.material].mono_true += int(t.layers == 1)
        score.true_by_class[(t.material, t.layer_class)] += 1
    matched_truth: dict[int, set[tuple[str, str]]] = {}  # truth id -> (material, layer class) the registry gave it
    by_id = {t.object_id: t for t in truth}
    ignored_ids = {t.object_id for t in ignored}
    for flake in found:
        candidates = [t for t in (*truth, *ignored) if t.contains(*flake.centre)]
        if candidates and max(candidates, key=lambda t: (t.z_order, -t.area)).object_id in ignored_ids:
            continue
        candidates = [t for t in candidates if t.object_id not in ignored_ids]
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
        matched_truth.setdefault(best.object_id, set()).add((material, flake.layer_class))
    for object_id, called in matched_truth.items():
        target = by_id[object_id]
        entry = score.per_material[target.material]
        entry.matched_true += 1
        classes = {layer_class for material, layer_class in called if material == target.material}
        if target.layers <= THIN_MAX_LAYERS:
            entry.thin_matched += 1
            entry.thin_right += int(bool(classes & set(THIN_CLASSES)))
        if target.layers == 1:
            entry.mono_matched += 1
            entry.mono_right += int('mono' in classes)
    return score
