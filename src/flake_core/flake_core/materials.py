"""The one vocabulary of materials: every package, picture and message takes its material
names, layer thicknesses, optical constants, layer classes, colours and COCO ids from here.

Adding a material is one entry in ``_MATERIALS`` (plus its measured calibration, if any, in
``flake_core/calibration/``); the simulator, the detectors, the registry, the web app and the
reports pick it up. ``tests/test_materials.py`` ties the vocabulary to ``flake_msgs/Flake``.

Optical constants are the in-plane (ordinary) complex refractive index n + ik at 450, 550 and
650 nm; the optics module interpolates between these anchors. Sources:
- graphene: Weber et al., Appl. Phys. Lett. 97, 091904 (2010);
- hBN: Lee et al., Phys. Status Solidi B (2018);
- MoS2: Hsu et al., Adv. Opt. Mater. (2019), monolayer;
- WTe2, WSe2, NbSe2, MoTe2, MoSe2, WS2: Munkhbat, Wrobel, Antosiewicz and Shegai, ACS Photonics
  9, 2398 (2022), multilayer flakes by spectroscopic ellipsometry (ordinary ray; WTe2 alpha axis).
Interlayer spacings are half the c lattice constant of the 2H polytypes (one layer for graphene
and hBN).

The 2H transition-metal dichalcogenides also carry a ``StemLattice``: what an annular dark-field
STEM image of a monolayer shows (lattice constant, metal and chalcogen columns, the point-defect
classes named for that material). In-plane lattice constants of the bulk 2H crystals from Wilson
and Yoffe (1969).
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any

# Layer classes of Masubuchi et al. (2020): mono = 1 layer, few = 2-10, thick = 11-40, bulk above.
# The numbers are flake_msgs/Flake's LAYER_* constants (a test holds them equal).
LAYER_UNKNOWN = 0
LAYER_MONO = 1
LAYER_FEW = 2
LAYER_THICK = 3
LAYER_BULK = 4
LAYER_CLASS_NAMES = {LAYER_UNKNOWN: 'unknown', LAYER_MONO: 'mono', LAYER_FEW: 'few',
                     LAYER_THICK: 'thick', LAYER_BULK: 'bulk'}
LAYER_CLASS_BY_NAME = {name: value for value, name in LAYER_CLASS_NAMES.items()}
# Largest layer count of each class (bulk is open-ended).
LAYER_CLASS_MAX_LAYERS = {LAYER_MONO: 1, LAYER_FEW: 10, LAYER_THICK: 40}
UNKNOWN = 'unknown'


def layer_class_of(layers: float) -> int:
    """The layer class (a LAYER_* value) of a flake of ``layers`` layers; LAYER_UNKNOWN when not a count."""
    if not math.isfinite(layers) or layers <= 0:
        return LAYER_UNKNOWN
    n = round(float(layers))
    for layer_class in (LAYER_MONO, LAYER_FEW, LAYER_THICK):
        if n <= LAYER_CLASS_MAX_LAYERS[layer_class]:
            return layer_class
    return LAYER_BULK


def layer_class_name(layers: float) -> str:
    return LAYER_CLASS_NAMES[layer_class_of(layers)]


@dataclass(frozen=True)
class StemLattice:
    """A 2H monolayer seen along c in STEM: a honeycomb of metal columns (one atom) and chalcogen
    columns (``chalcogens_per_column`` atoms stacked), lattice constant ``lattice_a`` [m].

    ``defect_classes`` names the unit-cell classes of Yang et al. (2024) for this material, in the
    order of flake_msgs/DefectCell's constants: perfect, one or both chalcogens of the column
    missing, the metal missing, and the metal with one or both chalcogens missing.
    """

    lattice_a: float
    metal: str
    metal_z: int
    chalcogen: str
    chalcogen_z: int
    chalcogens_per_column: int = 2
    lattice_source: str = 'Wilson and Yoffe 1969'

    @property
    def defect_classes(self) -> tuple[str, ...]:
        m, x = self.metal, self.chalcogen
        return ('Perfect', f'V_{x}', f'V_{x}2', f'V_{m}', f'V_{m}+V_{x}', f'V_{m}+V_{x}2')

    @property
    def primitive_cell_area(self) -> float:
        """[m^2] of one unit cell (one metal and one chalcogen column): sqrt(3)/2 a^2."""
        return math.sqrt(3.0) / 2.0 * self.lattice_a ** 2


@dataclass(frozen=True)
class Material:
    """A layered material the system hunts.

    ``refractive_index`` holds n + ik at 450, 550 and 650 nm; ``layer_range`` is the span of layer
    counts the learned models are trained on; ``colour`` is the one colour every picture draws the
    material in; ``coco_id`` its category id in COCO files the system writes.
    """

    name: str
    label: str
    layer_nm: float
    refractive_index: tuple[complex, complex, complex]
    index_source: str
    colour: str
    coco_id: int
    layer_range: tuple[int, int] = (1, 40)
    # Layer counts the optical detector reports for this material, and those it weighs a region
    # against so that a thick flake of one material is not taken for a thin one of another.
    optical_layers: range = range(1, 61)
    alternative_layers: range = range(1, 301)
    # Set for the 2H transition-metal dichalcogenides whose monolayers the STEM analyzer reads.
    stem: StemLattice | None = None

    @property
    def colour_bgr(self) -> tuple[int, int, int]:
        return hex_to_bgr(self.colour)


_MATERIALS = (
    Material('graphene', 'graphene', 0.335, (2.69 + 1.15j, 2.68 + 1.25j, 2.74 + 1.38j),
             'Weber et al. 2010', '#4fc3f7', 1, optical_layers=range(1, 41)),
    Material('hbn', 'hBN', 0.333, (2.18 + 0j, 2.14 + 0j, 2.12 + 0j),
             'Lee et al. 2018', '#ffb74d', 2, layer_range=(1, 300),
             # hBN is used 10-90 nm thick: every third layer count up to 300 nm.
             optical_layers=range(3, 901, 3), alternative_layers=range(3, 901, 3)),
    Material('mos2', 'MoS2', 0.65, (5.93 + 2.09j, 4.97 + 0.91j, 5.17 + 1.31j),
             'Hsu et al. 2019', '#ba68c8', 3, stem=StemLattice(3.160e-10, 'Mo', 42, 'S', 16)),
    Material('wte2', 'WTe2', 0.70, (3.27 + 1.64j, 3.40 + 1.45j, 3.42 + 1.34j),
             'Munkhbat et al. 2022', '#81c784', 4),
    Material('wse2', 'WSe2', 0.649, (4.50 + 2.03j, 4.66 + 1.44j, 4.79 + 0.53j),
             'Munkhbat et al. 2022', '#9575cd', 6, stem=StemLattice(3.282e-10, 'W', 74, 'Se', 34)),
    Material('nbse2', 'NbSe2', 0.627, (2.45 + 1.63j, 3.35 + 1.39j, 3.19 + 0.69j),
             'Munkhbat et al. 2022', '#f06292', 5, stem=StemLattice(3.445e-10, 'Nb', 41, 'Se', 34)),
    Material('mote2', 'MoTe2', 0.698, (3.92 + 2.67j, 4.52 + 1.85j, 4.52 + 2.02j),
             'Munkhbat et al. 2022', '#4db6ac', 7, stem=StemLattice(3.519e-10, 'Mo', 42, 'Te', 52)),
    Material('mose2', 'MoSe2', 0.646, (4.54 + 2.64j, 5.13 + 1.71j, 4.96 + 1.03j),
             'Munkhbat et al. 2022', '#ff8a65', 8, stem=StemLattice(3.288e-10, 'Mo', 42, 'Se', 34)),
    Material('ws2', 'WS2', 0.616, (4.63 + 2.33j, 4.82 + 0.51j, 4.99 + 0.21j),
             'Munkhbat et al. 2022', '#dce775', 9, stem=StemLattice(3.153e-10, 'W', 74, 'S', 16)),
)

MATERIALS: dict[str, Material] = {m.name: m for m in _MATERIALS}
# The materials whose monolayer point defects the STEM analyzer names and counts.
STEM_MATERIALS: tuple[str, ...] = tuple(m.name for m in _MATERIALS if m.stem is not None)
# The names a flake can carry: every material, then 'unknown' (a colour no calibration explains).
FLAKE_MATERIALS: tuple[str, ...] = tuple(MATERIALS)
MATERIAL_NAMES: tuple[str, ...] = FLAKE_MATERIALS + (UNKNOWN,)
UNKNOWN_COLOUR = '#b0bec5'
# Things on a chip that are not flakes, with their COCO ids (ids >= 100 are contaminants).
CONTAMINANT_CATEGORIES = {'residue': 101, 'dust': 102, 'bulk': 103}
CONTAMINANT_COCO_NAMES = {'residue': 'tape_residue', 'dust': 'dust', 'bulk': 'bulk_crystal'}
CONTAMINANT_CATEGORY_MIN = 100


def material(name: str) -> Material:
    """The material called ``name`` (any case); ValueError naming the known ones otherwise."""
    key = str(name).strip().lower()
    if key not in MATERIALS:
        raise ValueError(f'unknown material {name!r}; known: {", ".join(FLAKE_MATERIALS)}')
    return MATERIALS[key]


def check_material_name(name: str, allow_unknown: bool = True) -> str:
    """``name`` normalised to the vocabulary's spelling; ValueError for a name it does not know."""
    key = str(name).strip().lower()
    if allow_unknown and key == UNKNOWN:
        return key
    return material(key).name


def parse_materials(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Materials from a comma-separated string (the syntax every CLI and parameter uses)."""
    items = text.split(',') if isinstance(text, str) else list(text)
    names = tuple(check_material_name(item, allow_unknown=False) for item in items if str(item).strip())
    if not names:
        raise ValueError('no material given')
    return names


def colour(name: str) -> str:
    """The '#rrggbb' colour of a material; unknown names get the grey of 'unknown'."""
    entry = MATERIALS.get(str(name).lower())
    return entry.colour if entry is not None else UNKNOWN_COLOUR


def colour_bgr(name: str) -> tuple[int, int, int]:
    return hex_to_bgr(colour(name))


def label(name: str) -> str:
    entry = MATERIALS.get(str(name).lower())
    return entry.label if entry is not None else UNKNOWN


def hex_to_bgr(value: str) -> tuple[int, int, int]:
    value = value.lstrip('#')
    red, green, blue = (int(value[i:i + 2], 16) for i in (0, 2, 4))
    return blue, green, red


def coco_categories() -> list[dict[str, Any]]:
    """COCO categories of flakes and contaminants, as the simulator's datasets name them."""
    flakes = [{'id': m.coco_id, 'name': m.name, 'supercategory': 'flake'} for m in _MATERIALS]
    others = [{'id': cid, 'name': CONTAMINANT_COCO_NAMES[kind], 'supercategory': 'contaminant'}
              for kind, cid in CONTAMINANT_CATEGORIES.items()]
    return flakes + others


def material_of_coco_id(category_id: int) -> str | None:
    for entry in _MATERIALS:
        if entry.coco_id == int(category_id):
            return entry.name
    return None


def stem_lattice(name: str) -> StemLattice:
    """The STEM lattice of material ``name``; ValueError naming the materials that have one."""
    entry = material(name)
    if entry.stem is None:
        raise ValueError(f'{entry.label} has no 2H monolayer lattice for STEM defect analysis; '
                         f'known: {", ".join(STEM_MATERIALS)}')
    return entry.stem
