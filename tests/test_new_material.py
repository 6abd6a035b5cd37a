"""A material added to flake_core.materials (NbSe2, with the optical constants of Munkhbat et al.
2022) works end to end with no other edit: simulated, detected, stored, queried and drawn."""

import numpy as np

from flake_core import materials
from flake_core.geometry import Affine2D
from flake_registry.image_import import sightings_of
from flake_registry.query import FlakeQuery
from flake_registry.store import FlakeStore
from flake_scanner.demo.report import ReportFlake, annotate_mosaic
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

FRAMES = 5
MIN_AREA_PX = 200


def nbse2_frames():
    """Seeded 20x frames centred on thin NbSe2 flakes, with the simulator's truth."""
    wafer = VirtualWafer.generate(WaferConfig(
        seed=3, chip_width_m=2e-3, chip_height_m=2e-3, material_mix={'nbse2': 1.0}, thin_fraction=1.0,
        flake_density_per_mm2=40, residue_line_density_per_mm2=0, residue_network_density_per_mm2=0,
        dust_density_per_mm2=0, bulk_density_per_mm2=0, mount_offset_m=(0.0, 0.0), mount_rotation_rad=0.0))
    camera = CameraModel(wafer, CameraSettings(width=512, height=512, objective='20x'))
    rng = np.random.default_rng(0)
    for _ in range(FRAMES):
        x, y = camera.flake_corner_in_view(rng, 0.3e-3, 1.7e-3)
        truth = [o for o in camera.ground_truth(x, y).objects if o.kind == 'flake' and o.area_px >= MIN_AREA_PX]
        yield camera.render(x, y), truth, camera.pixel_to_wafer(x, y)


def test_nbse2_is_simulated_detected_stored_queried_and_drawn(tmp_path):
    from flake_detector.detection import make_detector

    assert 'nbse2' in materials.FLAKE_MATERIALS
    detector = make_detector('contrast', materials='nbse2')
    store = FlakeStore(tmp_path / 'registry.sqlite')
    true_flakes, found, exact_layers = 0, 0, 0
    for index, (image, truth, to_wafer) in enumerate(nbse2_frames()):
        detections = detector.detect(image).detections
        assert {d.material for d in detections} <= {'nbse2'}
        for flake in truth:
            assert flake.material == 'nbse2'
            true_flakes += 1
            hits = [d for d in detections if (d.full_mask(image.shape) & flake.mask).sum() > 0.5 * d.area_px]
            found += bool(hits)
            exact_layers += any(round(d.layers) == flake.layers for d in hits)
        store.ingest(sightings_of(detections, to_wafer, image.shape[:2], chip_id='nb-chip', scan_id='nb-scan',
                                  tile_index=index, stamp=0.0, backend='contrast'))
    assert true_flakes >= 4
    assert found >= true_flakes - 1 and exact_layers >= true_flakes - 1

    stored = store.query(FlakeQuery(materials=('nbse2',), chip_id='nb-chip').validated()).flakes
    assert len(stored) >= true_flakes - 1
    assert store.query(FlakeQuery(materials=('graphene',)).validated()).flakes == []

    flake = stored[0]
    drawn = annotate_mosaic(np.zeros((240, 240, 3), np.uint8), Affine2D(1e5, 0.0, 0.0, 0.0, 1e5, 0.0), [
        ReportFlake(flake.id, flake.material, materials.layer_class_name(flake.layers), flake.layers,
                    flake.thickness_nm, flake.thickness_nm_std, flake.area, flake.score, (1.2e-3, 1.2e-3), 0,
                    flake.bbox_px)])
    colour = materials.colour_bgr('nbse2')
    assert np.any(np.all(drawn == colour, axis=-1)), 'the flake is drawn in the colour of NbSe2'
