"""flake-sim command line and the COCO export."""

import json

import cv2
import numpy as np
from pycocotools.coco import COCO
import pytest

from flake_core import materials
from flake_scanner.sim import cli
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.coco import FrameRecord, frames_to_coco
from flake_scanner.sim.wafer import VirtualWafer, WaferConfig


def test_coco_masks_decode_to_the_truth_areas(tmp_path):
    wafer = VirtualWafer.generate(WaferConfig(seed=9, chip_width_m=2e-3, chip_height_m=2e-3,
                                              flake_density_per_mm2=300))
    cam = CameraModel(wafer, CameraSettings(width=320, height=240, objective='10x'))
    poses = [wafer.wafer_to_stage.apply(0.6e-3 + 0.1e-3 * i, 1.0e-3) for i in range(3)]
    truths = [cam.ground_truth(x, y) for x, y in poses]
    path = tmp_path / 'annotations.json'
    path.write_text(json.dumps(frames_to_coco([FrameRecord(f'{i}.png', t) for i, t in enumerate(truths)])))
    coco = COCO(str(path))
    assert {c['name'] for c in coco.loadCats(coco.getCatIds())} >= {'graphene', 'hbn', 'mos2', 'wte2'}
    annotations = coco.loadAnns(coco.getAnnIds())
    assert len(annotations) == sum(len(t.objects) for t in truths) > 5
    expected = {(i + 1, o.object_id): o for i, t in enumerate(truths) for o in t.objects}
    for ann in annotations:
        obj = expected[(ann['image_id'], ann['attributes']['object_id'])]
        decoded = coco.annToMask(ann).astype(bool)
        assert np.array_equal(decoded, obj.mask)
        assert ann['area'] == obj.area_px
        if ann['is_contaminant']:
            assert ann['category_id'] == materials.CONTAMINANT_CATEGORIES[obj.kind]
        else:
            assert ann['category_id'] == materials.material(obj.material).coco_id
            assert ann['attributes']['layers'] == obj.layers
            assert ann['attributes']['layer_class'] in ('mono', 'few', 'thick', 'bulk')
    flakes_only = frames_to_coco([FrameRecord('0.png', truths[0])], include_contaminants=False)
    assert all(not a['is_contaminant'] for a in flakes_only['annotations'])


def test_dataset_command_writes_n_images_and_coco(tmp_path, capsys):
    out = tmp_path / 'set'
    assert cli.main(['dataset', '--seed', '4', '--frames', '5', '--width', '160', '--height', '128',
                     '--objective', '20x', '--thin-fraction', '0.5', '--out', str(out)]) == 0
    images = sorted((out / 'images').glob('*.png'))
    assert len(images) == 5
    coco = COCO(str(out / 'annotations.json'))
    assert len(coco.getImgIds()) == 5
    assert {img['file_name'] for img in coco.loadImgs(coco.getImgIds())} == {f'images/{p.name}' for p in images}
    flakes = [a for a in coco.loadAnns(coco.getAnnIds()) if not a['is_contaminant']]
    assert flakes, 'frames are placed where flakes are'
    assert '5/5 frames' in capsys.readouterr().err


def test_render_command_writes_image_and_truth(tmp_path):
    out, truth = tmp_path / 'frame.png', tmp_path / 'truth.json'
    assert cli.main(['render', '--seed', '2', '--x', '5', '--y', '5', '--wafer-frame', '--width', '128',
                     '--height', '96', '--out', str(out), '--truth', str(truth)]) == 0
    assert cv2.imread(str(out)).shape == (96, 128, 3)
    data = json.loads(truth.read_text())
    assert data['images'][0]['width'] == 128 and data['images'][0]['file_name'] == 'frame.png'


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(['render', '--x', '1', '--y', '1', '--objective', '7x', '--out', str(tmp_path / 'a.png')])
    assert exc.value.code == 2 and 'unknown objective' in capsys.readouterr().err
    with pytest.raises(SystemExit, match='off the 10 x 10 mm chip'):
        cli.main(['render', '--x', '50', '--y', '1', '--out', str(tmp_path / 'a.png')])
    with pytest.raises(SystemExit) as exc:
        cli.main(['dataset', '--frames', '0', '--out', str(tmp_path)])
    assert exc.value.code == 2


def test_dataset_killed_half_way_keeps_annotations_for_written_images(tmp_path, monkeypatch):
    real_render = CameraModel.render
    calls = {'n': 0}

    def failing_render(self, *args, **kwargs):
        calls['n'] += 1
        if calls['n'] > 3:
            raise RuntimeError('injected crash')
        return real_render(self, *args, **kwargs)

    monkeypatch.setattr(CameraModel, 'render', failing_render)
    out = tmp_path / 'set'
    with pytest.raises(RuntimeError, match='injected crash'):
        cli.main(['dataset', '--seed', '1', '--frames', '6', '--width', '96', '--height', '96', '--out', str(out)])
    coco = json.loads((out / 'annotations.json').read_text())
    assert len(coco['images']) == 3
    assert all((out / image['file_name']).exists() for image in coco['images'])
