"""The thin flakes people hunt, first: monolayers, then few-layer flakes, per material."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from flake_core.materials import FLAKE_MATERIALS, LAYER_FEW, LAYER_MONO
from flake_registry.query import FlakeQuery
from flake_registry.store import FlakeRecord, FlakeStore

# Thin flakes are rare; up to this many are read in one query and counted here.
THIN_READ_LIMIT = 1000


@dataclass
class ThinSummary:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)   # material -> {'mono': n, 'few': n}
    leading: list[FlakeRecord] = field(default_factory=list)           # thinnest first, best score among equals
    total: int = 0
    exact: bool = True

    @property
    def materials(self) -> list[str]:
        """Materials with thin flakes, most monolayers first."""
        return sorted(self.counts, key=lambda m: (-self.counts[m]['mono'], -self.counts[m]['few'], m))


def thin_summary(store: FlakeStore, *, scan_id: str = '', chip_id: str = '', leading: int = 12) -> ThinSummary:
    """Mono- and few-layer flakes of a scan (or chip, or the registry), counted per material.

    ``leading`` flakes are kept, monolayers first (then by layer count, then score).
    """
    query = FlakeQuery(scan_id=scan_id, chip_id=chip_id, layer_classes=(LAYER_MONO, LAYER_FEW), sort_by='layers',
                       ascending=True, limit=THIN_READ_LIMIT)
    result = store.query(query, contours=False)
    summary = ThinSummary(total=result.total, exact=result.total <= THIN_READ_LIMIT)
    if summary.exact:
        counts = Counter((f.material, f.layer_class) for f in result.flakes)
    else:
        counts = Counter()
        for material in FLAKE_MATERIALS:
            for layer_class in (LAYER_MONO, LAYER_FEW):
                counts[material, layer_class] = store.query(FlakeQuery(
                    scan_id=scan_id, chip_id=chip_id, materials=(material,), layer_classes=(layer_class,),
                    limit=1), contours=False).total
    for (material, layer_class), count in counts.items():
        if count:
            entry = summary.counts.setdefault(material, {'mono': 0, 'few': 0})
            entry['mono' if layer_class == LAYER_MONO else 'few'] += count
    ranked = sorted(result.flakes, key=lambda f: (f.layer_class, round(f.layers), -f.score))
    summary.leading = ranked[:leading]
    return summary
