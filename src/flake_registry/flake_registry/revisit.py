"""Which flakes the scanner looks at again at high magnification, and in what order.

A lab hunts thin flakes: monolayers first, then few-layer ones, each the larger and the
more isolated the better. A ``RevisitPolicy`` says what is wanted (layer classes per
material) and how candidates are ranked; ``FlakeStore.revisit_list`` applies it to the
available flakes that were not revisited yet, and ``registry_node`` builds it from its
``revisit_*`` parameters.

Thick flakes are wanted by default too, ranked after the thin ones: at 10x a small
monolayer beside a flake of 6-20 layers is often not resolved on its own (docs/system.md,
"Monolayers first"), and the 50x revisit of the thick flake finds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
import math
from typing import TYPE_CHECKING

from flake_core.materials import LAYER_CLASS_BY_NAME, UNKNOWN, check_material_name
from flake_registry.records import FlakeRecord

if TYPE_CHECKING:
    from flake_registry.store import FlakeStore

ANY_MATERIAL = '*'
DEFAULT_WANTED = '*: mono, few, thick; unknown: unknown'
DEFAULT_ORDER = 'thinnest, largest, most_isolated'
DEFAULT_MIN_AREA = 20e-12  # [m^2] the smallest flake a lab would pick up at 10x
# What a request naming a material the policy does not list gets.
THIN_AND_THICK = (LAYER_CLASS_BY_NAME['mono'], LAYER_CLASS_BY_NAME['few'], LAYER_CLASS_BY_NAME['thick'])

# Rank keys: each maps a flake to a number, smaller first.
RANK_KEYS: dict[str, Callable[[FlakeRecord], float]] = {
    'thinnest': lambda f: round(f.layers) if f.layers > 0 and math.isfinite(f.layers) else math.inf,
    'thickest': lambda f: -f.layers if math.isfinite(f.layers) else math.inf,
    'largest': lambda f: -f.area,
    'smallest': lambda f: f.area,
    'most_isolated': lambda f: -f.isolation_distance,
    'best_score': lambda f: -f.score,
    'most_homogeneous': lambda f: -f.homogeneity,
}
# The registry's sort key that gives candidates in the order of a first rank key.
SQL_ORDER = {'thinnest': ('layers', True), 'thickest': ('layers', False), 'largest': ('area', False),
             'smallest': ('area', True), 'best_score': ('score', False)}


def parse_wanted(text: str) -> dict[str, tuple[int, ...]]:
    """``'*: mono, few; hbn: few, thick'`` -> {material or '*': layer classes}.

    Entries are separated by ``;``, each ``materials: layer classes`` with both lists comma
    separated (material names of ``flake_core.materials``, ``unknown`` for candidates whose colour
    fits no material, ``*`` for any material). A material named later overrides ``*`` for that
    material. Raises ValueError.
    """
    wanted: dict[str, tuple[int, ...]] = {}
    for entry in filter(None, (part.strip() for part in text.split(';'))):
        names, colon, classes = entry.partition(':')
        if not colon:
            raise ValueError(f'revisit entry {entry!r} needs "materials: layer classes", e.g. "*: mono, few"')
        chosen = []
        for name in filter(None, (c.strip().lower() for c in classes.split(','))):
            if name not in LAYER_CLASS_BY_NAME:
                raise ValueError(f'unknown layer class {name!r} in {entry!r}; one of {sorted(LAYER_CLASS_BY_NAME)}')
            chosen.append(LAYER_CLASS_BY_NAME[name])
        if not chosen:
            raise ValueError(f'revisit entry {entry!r} names no layer class')
        keys = [ANY_MATERIAL if name.strip() == ANY_MATERIAL else check_material_name(name)
                for name in names.split(',') if name.strip()]
        if not keys:
            raise ValueError(f'revisit entry {entry!r} names no material')
        for key in keys:
            wanted[key] = tuple(dict.fromkeys(chosen))
    if not wanted:
        raise ValueError('the revisit policy wants nothing; e.g. "*: mono, few"')
    return wanted


def parse_order(text: str) -> tuple[str, ...]:
    """``'thinnest, largest, most_isolated'`` -> the rank keys in order. Raises ValueError."""
    keys = tuple(k.strip().lower() for k in text.split(',') if k.strip())
    unknown = [k for k in keys if k not in RANK_KEYS]
    if unknown or not keys:
        raise ValueError(f'revisit order {text!r}: rank keys are a comma-separated list of {list(RANK_KEYS)}')
    return keys


@dataclass(frozen=True)
class RevisitPolicy:
    """What the lab asks to see again (layer classes per material) and the order of the list.

    Ties of every key are broken by the detector score, best first.
    """

    wanted: dict[str, tuple[int, ...]] = field(default_factory=lambda: parse_wanted(DEFAULT_WANTED))
    order: tuple[str, ...] = field(default_factory=lambda: parse_order(DEFAULT_ORDER))
    min_area: float = DEFAULT_MIN_AREA      # [m^2]

    @classmethod
    def parse(cls, wanted: str = DEFAULT_WANTED, order: str = DEFAULT_ORDER,
              min_area: float = DEFAULT_MIN_AREA) -> RevisitPolicy:
        if not (math.isfinite(min_area) and min_area >= 0):
            raise ValueError(f'revisit min_area must be >= 0 m^2, got {min_area}')
        return cls(parse_wanted(wanted), parse_order(order), float(min_area))

    def restricted(self, materials: Iterable[str] = (), layer_classes: Iterable[int] = ()) -> RevisitPolicy:
        """This policy asked for only ``materials`` and/or ``layer_classes`` (a request's own filters)."""
        materials = tuple(str(m).strip().lower() for m in materials)
        layer_classes = tuple(dict.fromkeys(int(c) for c in layer_classes))
        if not materials and not layer_classes:
            return self
        wanted = {key: layer_classes or self.classes_of(key) or THIN_AND_THICK
                  for key in (materials or tuple(self.wanted))}
        return RevisitPolicy(wanted, self.order, self.min_area)

    def classes_of(self, material: str) -> tuple[int, ...]:
        """The layer classes wanted of ``material`` (its own entry, else the entry for any material)."""
        if material in self.wanted:
            return self.wanted[material]
        if material == UNKNOWN:
            return ()
        return self.wanted.get(ANY_MATERIAL, ())

    def materials(self) -> tuple[str, ...]:
        """Materials to ask the registry for; empty when any material may be wanted."""
        return () if ANY_MATERIAL in self.wanted else tuple(self.wanted)

    def layer_classes(self) -> tuple[int, ...]:
        """Every layer class wanted of some material."""
        return tuple(sorted({c for classes in self.wanted.values() for c in classes}))

    def wants(self, flake: FlakeRecord) -> bool:
        return flake.layer_class in self.classes_of(flake.material) and flake.area >= self.min_area

    def sql_order(self) -> tuple[str, bool]:
        """(sort key, ascending) for the registry query that fetches the candidates."""
        return SQL_ORDER.get(self.order[0], ('score', False))

    def rank(self, flakes: Iterable[FlakeRecord]) -> list[FlakeRecord]:
        """The wanted flakes of ``flakes`` in the policy's order."""
        keys = [RANK_KEYS[name] for name in self.order]
        return sorted((f for f in flakes if self.wants(f)),
                      key=lambda f: (*(key(f) for key in keys), -f.score, f.id))

    def describe(self) -> str:
        wanted = '; '.join(f'{material}: {", ".join(_class_name(c) for c in classes)}'
                           for material, classes in self.wanted.items())
        return f'{wanted} (at least {self.min_area * 1e12:g} um^2), {", ".join(self.order)}'


def _class_name(value: int) -> str:
    return next(name for name, number in LAYER_CLASS_BY_NAME.items() if number == value)


# Candidates read for one list: a scan's thin and thick flakes fit many times over.
MAX_CANDIDATES = 5000


def revisit_list(store: FlakeStore, policy: RevisitPolicy, *, chip_id: str = '', scan_id: str = '',
                 min_score: float = 0.8, min_homogeneity: float = 0.0, include_revisited: bool = False,
                 limit: int = 50) -> list[FlakeRecord]:
    """Available flakes of ``store`` wanted by ``policy`` and good enough, in its order (at most ``limit``)."""
    from flake_registry.query import INVALID_RANGE, MAX_LIMIT, STATUS_AVAILABLE, FlakeQuery, RegistryError

    if not 1 <= limit <= MAX_LIMIT:
        raise RegistryError(INVALID_RANGE, f'limit must be in 1..{MAX_LIMIT}, got {limit}')
    sort_by, ascending = policy.sql_order()
    base = FlakeQuery(chip_id=chip_id, scan_id=scan_id, materials=policy.materials(),
                      layer_classes=policy.layer_classes(), min_score=min_score, min_homogeneity=min_homogeneity,
                      area_min=policy.min_area or None, statuses=(STATUS_AVAILABLE,),
                      revisited=None if include_revisited else False, sort_by=sort_by, ascending=ascending,
                      limit=MAX_LIMIT)
    candidates: list[FlakeRecord] = []
    while len(candidates) < MAX_CANDIDATES:
        page = store.query(replace(base, offset=len(candidates)), contours=False).flakes
        candidates += page
        if len(page) < MAX_LIMIT:
            break
    ranked = policy.rank(candidates)[:limit]
    if not ranked:
        return []
    # The answer carries the outlines (the scanner centres its revisit on them).
    full = {f.id: f for f in store.query(FlakeQuery(flake_ids=tuple(f.id for f in ranked), limit=len(ranked))).flakes}
    return [full[f.id] for f in ranked if f.id in full]
