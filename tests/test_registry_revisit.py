"""The revisit list: what the lab asks for, monolayers first (flake_registry.revisit, FlakeStore.revisit_list)."""

import pytest

from flake_core.materials import LAYER_BULK, LAYER_FEW, LAYER_MONO, LAYER_THICK, LAYER_UNKNOWN
from flake_core.parameters import check_overrides
from flake_registry.parameters import RegistryNodeParameters
from flake_registry.query import RegistryError
from flake_registry.records import Sighting
from flake_registry.revisit import RevisitPolicy, parse_order, parse_wanted
from flake_registry.store import FlakeStore

UM = 1e-6


def sighting(x, material, layers, layer_class, side_um, score=0.9, isolation_um=50.0):
    half = side_um * UM / 2
    x *= UM
    return Sighting(chip_id='chip-R', scan_id='scan-R', x=x, y=0.0, material=material, layers=float(layers),
                    layer_class=layer_class, thickness_nm=0.34 * layers, score=score, area=(side_um * UM) ** 2,
                    isolation_distance=isolation_um * UM,
                    contour=[(x - half, -half), (x + half, -half), (x + half, half), (x - half, half)])


@pytest.fixture
def store(tmp_path):
    store = FlakeStore(tmp_path / 'registry.sqlite')
    flakes = {
        'thick-big': sighting(0, 'graphene', 15, LAYER_THICK, 30),
        'few-small': sighting(100, 'graphene', 3, LAYER_FEW, 6),
        'few-big': sighting(200, 'hbn', 3, LAYER_FEW, 20),
        'mono-small': sighting(300, 'mos2', 1, LAYER_MONO, 5),
        'mono-big-crowded': sighting(400, 'graphene', 1, LAYER_MONO, 12, isolation_um=2.0),
        'mono-big-alone': sighting(500, 'wte2', 1, LAYER_MONO, 12, isolation_um=80.0),
        'mono-tiny': sighting(600, 'graphene', 1, LAYER_MONO, 3),            # 9 um^2: too small to pick up
        'bulk': sighting(700, 'graphene', 80, LAYER_BULK, 40),
        'unknown-colour': sighting(800, 'unknown', 0, LAYER_UNKNOWN, 10, score=0.5),
        'doubtful-mono': sighting(900, 'graphene', 1, LAYER_MONO, 10, score=0.3),
    }
    outcomes = store.ingest(list(flakes.values()))
    names = {o.flake_id: name for o, name in zip(outcomes, flakes, strict=True)}
    yield store, names
    store.close()


def test_the_default_lists_monolayers_first_then_larger_then_more_isolated(store):
    store, names = store
    listed = [names[f.id] for f in store.revisit_list(min_score=0.4)]
    assert listed == ['mono-big-alone', 'mono-big-crowded', 'mono-small', 'few-big', 'few-small', 'thick-big',
                      'unknown-colour']
    assert len(store.revisit_list(min_score=0.4, limit=2)) == 2


def test_the_lab_asks_per_material_and_layer_class_and_for_its_own_order(store):
    store, names = store
    policy = RevisitPolicy.parse('*: mono; hbn: few, thick', 'largest, thinnest', min_area=0.0)
    listed = [names[f.id] for f in store.revisit_list(min_score=0.4, policy=policy)]
    # Equal in area and layers: the better score, then the earlier flake.
    assert listed == ['few-big', 'mono-big-crowded', 'mono-big-alone', 'mono-small', 'mono-tiny']
    only_graphene = [names[f.id] for f in store.revisit_list(min_score=0.4, policy=policy, materials=['graphene'])]
    assert only_graphene == ['mono-big-crowded', 'mono-tiny']
    # A request naming a class narrows every material to it.
    assert [names[f.id] for f in store.revisit_list(min_score=0.4, layer_classes=[LAYER_FEW])] == [
        'few-big', 'few-small']
    assert [names[f.id] for f in store.revisit_list(min_score=0.2, materials=['graphene'],
                                                    layer_classes=[LAYER_MONO])] == [
        'mono-big-crowded', 'doubtful-mono']


def test_revisited_reserved_and_unknown_materials(store):
    store, names = store
    ids = {name: flake_id for flake_id, name in names.items()}
    store.add_image(ids['mono-big-alone'], 'revisit', 'images/r.png', objective='50x', pixel_size=110e-9)
    store.reserve(ids['mono-big-crowded'], 'robot-a')
    listed = [names[f.id] for f in store.revisit_list(min_score=0.4)]
    assert 'mono-big-alone' not in listed and 'mono-big-crowded' not in listed
    assert 'mono-big-alone' in [names[f.id] for f in store.revisit_list(min_score=0.4, include_revisited=True)]
    with pytest.raises(RegistryError) as refused:
        store.revisit_list(materials=['unobtainium'])
    assert refused.value.code == 'INVALID_ARGUMENT'


def test_the_answer_carries_outlines(store):
    store, _ = store
    assert all(len(f.contour) == 4 for f in store.revisit_list(min_score=0.4))


@pytest.mark.parametrize('text, words', [
    ('mono, few', 'needs "materials: layer classes"'), ('*: giant', "unknown layer class 'giant'"),
    ('gold: mono', "unknown material 'gold'"), ('*:', 'names no layer class'), ('', 'wants nothing')])
def test_a_bad_policy_is_refused_with_the_reason(text, words):
    with pytest.raises(ValueError, match=words):
        parse_wanted(text)


def test_order_keys_and_the_node_parameters_validate():
    assert parse_order('thinnest , largest') == ('thinnest', 'largest')
    with pytest.raises(ValueError, match='rank keys'):
        parse_order('thinnest, shiniest')
    assert check_overrides(RegistryNodeParameters, {'revisit_wanted': '*: mono, few; hbn: thick',
                                                    'revisit_order': 'largest'}) == []
    refused = check_overrides(RegistryNodeParameters, {'revisit_wanted': '*: huge', 'revisit_order': 'shiniest'})
    assert len(refused) == 2 and 'unknown layer class' in refused[0] and 'rank keys' in refused[1]
    assert RevisitPolicy.parse().describe().startswith('*: mono, few, thick; unknown: unknown')
