"""The virtual chip: seeded generation, spatial index, mount, statistics."""

import math

import numpy as np
import pytest

from flake_core.geometry import WaferFrame
from flake_core.materials import layer_class_name
from flake_scanner.sim.wafer import VirtualWafer, WaferConfig


def small_chip(seed=1, **changes):
    return VirtualWafer.generate(WaferConfig(seed=seed, chip_width_m=2e-3, chip_height_m=2e-3, **changes))


def signature(wafer):
    return [(o.object_id, o.kind, o.material, o.layers, round(o.polygon.sum(), 12)) for o in wafer.all_objects()]


def test_same_seed_same_chip_whatever_order_cells_are_visited():
    first = small_chip(3)
    second = small_chip(3)
    second.objects_in_rect(1.5e-3, 1.5e-3, 1.6e-3, 1.6e-3)  # visit a far cell first
    assert signature(first) == signature(second)
    assert signature(first) != signature(small_chip(4))


def test_field_of_view_query_matches_brute_force():
    wafer = small_chip(2)
    everything = wafer.all_objects()
    box = (0.4e-3, 0.7e-3, 0.75e-3, 0.95e-3)
    expected = {o.object_id for o in everything
                if o.bbox[0] <= box[2] and o.bbox[2] >= box[0] and o.bbox[1] <= box[3] and o.bbox[3] >= box[1]}
    found = [o.object_id for o in wafer.objects_in_rect(*box)]
    assert set(found) == expected and len(found) == len(expected) > 0


def test_corners_recover_the_hidden_mount():
    wafer = small_chip(7)
    assert abs(wafer.mount_rotation_rad) > 0  # the seed hides a real rotation
    frame = WaferFrame.from_corners(wafer.corner_positions_stage())
    np.testing.assert_allclose(frame.stage_to_wafer.as_list(), wafer.stage_to_wafer.as_list(), atol=1e-12)
    noisy = WaferFrame.from_corners(wafer.corner_positions_stage(noise_m=2e-6, seed=1))
    assert abs(noisy.rotation - wafer.mount_rotation_rad) < math.radians(0.5)
    assert not np.allclose(noisy.stage_to_wafer.as_list(), frame.stage_to_wafer.as_list(), atol=1e-9)


def test_layer_statistics_thin_is_rare_and_device_hbn_is_common():
    wafer = VirtualWafer.generate(WaferConfig(seed=11, chip_width_m=4e-3, chip_height_m=4e-3,
                                              flake_density_per_mm2=60))
    flakes = wafer.flakes()
    assert len(flakes) > 500
    graphene = [f.layers for f in flakes if f.material == 'graphene']
    assert 0 < np.mean(np.array(graphene) <= 3) < 0.1
    hbn_nm = np.array([f.thickness_nm for f in flakes if f.material == 'hbn'])
    assert np.mean((hbn_nm >= 10) & (hbn_nm <= 90)) > 0.5
    assert hbn_nm.max() <= 300 * 0.333 + 1e-9 and hbn_nm.min() >= 0.333 - 1e-9
    enriched = small_chip(11, thin_fraction=1.0).flakes()
    assert all(1 <= f.layers <= 10 for f in enriched)


def test_regions_contaminants_and_crystal_edges():
    objs = VirtualWafer.generate(WaferConfig(seed=5, chip_width_m=3e-3, chip_height_m=3e-3)).all_objects()
    kinds = {o.kind for o in objs}
    assert {'flake', 'terrace', 'fold', 'residue', 'dust', 'bulk'} <= kinds
    by_id = {o.object_id: o for o in objs}
    for o in objs:
        assert o.is_contaminant == (o.kind in ('residue', 'dust', 'bulk'))
        if o.kind in ('terrace', 'fold'):
            parent = by_id[o.parent_id]
            assert parent.material == o.material
            assert o.layers < parent.layers if o.kind == 'terrace' else o.layers == 2 * parent.layers
    bulk = [o for o in objs if o.kind == 'bulk']
    assert min(o.thickness_nm for o in bulk) >= 300
    assert layer_class_name(1) == 'mono' and layer_class_name(10) == 'few' and layer_class_name(40) == 'thick'
    assert layer_class_name(41) == 'bulk'


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match='material_mix'):
        VirtualWafer.generate(WaferConfig(material_mix={'gold': 1.0}))
    with pytest.raises(ValueError, match='thin_fraction'):
        VirtualWafer.generate(WaferConfig(thin_fraction=2.0))
    with pytest.raises(ValueError, match='unknown material'):
        small_chip().add_object('flake', 'gold', [[0, 0], [1e-5, 0], [0, 1e-5]], layers=1)
