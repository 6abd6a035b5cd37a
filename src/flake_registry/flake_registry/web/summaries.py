"""The thin flakes people hunt, first: monolayers, then few-layer flakes, per material.

Every count and list here is a query on one material and one layer class, which the
registry answers from its (material, layer class, score) index in well under a
millisecond at 100 000 flakes, so the pages that lead with thin flakes stay fast.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
import math

from flake_core.materials import LAYER_FEW, LAYER_MONO, MATERIAL_NAMES
from flake_registry.query import FlakeQuery
from flake_registry.store import FlakeRecord, FlakeStore

THIN_CLASSES = (LAYER_MONO, LAYER_FEW)
# A scan of a chip scanned several times is filtered through its observations: one read of
# at most this many thin flakes, counted here (the counts are lower bounds beyond it).
SCAN_READ_LIMIT = 1000


def scan_scope(store: FlakeStore, scan_id: str, scans: list[dict] | None = None) -> dict[str, str]:
    """The filter that selects exactly a scan's flakes fastest.

    A scan filter joins the scan's observations in every query (~0.4 s at 100 000 flakes).
    A scan that saw every flake of the registry needs no filter; one that saw every flake
    of its chip is selected by the chip. ``scans`` is ``store.scans()`` when already read.
    """
    if not scan_id:
        return {}
    scans = store.scans() if scans is None else scans
    row = next((s for s in scans if s['id'] == scan_id), None)
    if row is None:
        return {'scan_id': scan_id}
    if row['flakes'] == store.count():
        return {}
    if sum(1 for s in scans if s['chip_id'] == row['chip_id']) == 1:
        chip = next((c for c in store.chips() if c['id'] == row['chip_id']), None)
        if chip is not None and chip['flakes'] == row['flakes']:
            return {'chip_id': row['chip_id']}
    return {'scan_id': scan_id}


def chip_scope(store: FlakeStore, chip_id: str) -> dict[str, str]:
    """The filter for a chip's flakes: none when the registry holds no other chip's."""
    chip = next((c for c in store.chips() if c['id'] == chip_id), None)
    return {} if chip is not None and chip['flakes'] == store.count() else {'chip_id': chip_id}


@dataclass
class ThinSummary:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)   # material -> {'mono': n, 'few': n}
    leading: list[FlakeRecord] = field(default_factory=list)           # monolayers first, best score first
    exact: bool = True                                                 # False: counts are lower bounds

    @property
    def materials(self) -> list[str]:
        """Materials with thin flakes, most monolayers first."""
        return sorted(self.counts, key=lambda m: (-self.counts[m]['mono'], -self.counts[m]['few'], m))


def thin_first(store: FlakeStore, limit: int, scope: dict[str, str] | None = None) -> list[FlakeRecord]:
    """Up to ``limit`` thin flakes: every material's monolayers (best score first), then few-layer ones."""
    chosen: list[FlakeRecord] = []
    for layer_class in THIN_CLASSES:
        found = []
        for material in MATERIAL_NAMES:
            found += store.query(FlakeQuery(materials=(material,), layer_classes=(layer_class,), limit=limit,
                                            **(scope or {})), contours=False).flakes
        chosen += sorted(found, key=lambda f: -f.score)[:limit - len(chosen)]
        if len(chosen) >= limit:
            break
    return chosen


def thin_summary(store: FlakeStore, *, scan_id: str = '', leading: int = 12,
                 scans: list[dict] | None = None) -> ThinSummary:
    """Mono- and few-layer flakes of a scan (or of the registry), counted per material, and the leading ones."""
    scope = scan_scope(store, scan_id, scans)
    summary = ThinSummary()
    if 'scan_id' in scope:
        result = store.query(FlakeQuery(layer_classes=THIN_CLASSES, limit=SCAN_READ_LIMIT, **scope), contours=False)
        summary.exact = result.total <= SCAN_READ_LIMIT
        counted = Counter((f.material, f.layer_class) for f in result.flakes)
        for material in sorted({f.material for f in result.flakes}):
            summary.counts[material] = {'mono': counted[material, LAYER_MONO], 'few': counted[material, LAYER_FEW]}
        summary.leading = sorted(result.flakes, key=lambda f: (f.layer_class, -f.score))[:leading]
        return summary
    for material in MATERIAL_NAMES:
        counts = {name: store.query(FlakeQuery(materials=(material,), layer_classes=(layer_class,), limit=1,
                                               **scope), contours=False).total
                  for name, layer_class in (('mono', LAYER_MONO), ('few', LAYER_FEW))}
        if counts['mono'] or counts['few']:
            summary.counts[material] = counts
    summary.leading = thin_first(store, leading, scope) if summary.counts else []
    return summary


# Bin edges people read at a glance: thickness [nm] and area [um^2], one decade in two or three steps.
THICKNESS_EDGES_NM = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, math.inf)
AREA_EDGES_UM2 = (0.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, math.inf)

@dataclass
class Histogram:
    labels: list[str]
    counts: list[int]

    @property
    def peak(self) -> int:
        return max(self.counts, default=0)


@dataclass
class ScanDistributions:
    """Thickness and area histograms of a scan's flakes, per material."""

    thickness: dict[str, Histogram] = field(default_factory=dict)
    area: dict[str, Histogram] = field(default_factory=dict)
    flakes: int = 0           # flakes counted: every flake of the scan

    @property
    def materials(self) -> list[str]:
        return sorted(self.thickness, key=lambda m: (-sum(self.thickness[m].counts), m))


def _edge_labels(edges: tuple[float, ...], unit: str) -> list[str]:
    def text(v: float) -> str:
        return f'{v:g}'
    labels = [f'{text(lo)}–{text(hi)}' for lo, hi in zip(edges[:-2], edges[1:-1], strict=True)]
    return labels + [f'> {text(edges[-2])} {unit}']


def histogram(values: list[float], edges: tuple[float, ...], unit: str) -> Histogram:
    """Counts of ``values`` in [edges[i], edges[i+1]); values below the first edge count in the first bin."""
    counts = [0] * (len(edges) - 1)
    for value in values:
        index = bisect.bisect_right(edges, value) - 1
        counts[min(max(index, 0), len(counts) - 1)] += 1
    return Histogram(_edge_labels(edges, unit), counts)


def scan_distributions(store: FlakeStore, scan_id: str, scans: list[dict] | None = None) -> ScanDistributions:
    """Thickness [nm] and area [um^2] histograms of every flake of a scan, per material (the
    flakes whose material is unknown included), counted by the registry in one statement."""
    counts = store.histograms(FlakeQuery(**scan_scope(store, scan_id, scans)),
                              {'thickness_nm': THICKNESS_EDGES_NM,
                               'area': tuple(edge * 1e-12 for edge in AREA_EDGES_UM2)})
    out = ScanDistributions(flakes=sum(sum(c['thickness_nm']) for c in counts.values()))
    for material, material_counts in counts.items():
        out.thickness[material] = Histogram(_edge_labels(THICKNESS_EDGES_NM, 'nm'), material_counts['thickness_nm'])
        out.area[material] = Histogram(_edge_labels(AREA_EDGES_UM2, 'µm²'), material_counts['area'])
    return out
