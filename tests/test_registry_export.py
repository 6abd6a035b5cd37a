"""COCO export names only pictures that exist: kept frames of an imported scan, or a scan's mosaic."""

import json
from pathlib import Path

import cv2
from detector_synth import make_frame
import numpy as np
from pycocotools.coco import COCO

from flake_registry.cli import main as registry_main
from flake_registry.export import build_coco
from flake_registry.image_import import main as import_main
from flake_registry.store import FlakeStore, Sighting

UM = 1e-6


def test_coco_of_an_imported_scan_names_frames_that_exist(tmp_path, capsys):
    folder = tmp_path / 'micrographs'
    folder.mkdir()
    truths = []
    for k in range(2):
        image, flakes = make_frame(20 + k, 320, flakes=[('graphene', 1), ('graphene', 2)], clutter=False,
                                   radius=(25, 40))
        cv2.imwrite(str(folder / f'field_{k}.png'), image)
        truths.append(flakes)
    data = tmp_path / 'data'
    assert import_main([str(folder), '--chip', 'chip-E', '--scan', 'lab-E', '--pixel-size', '0.5um', '--data-dir',
                        str(data), '--param', 'materials=graphene', '--param', 'calibration=model',
                        '--param', 'max_layers=10']) == 0
    target = tmp_path / 'exports' / 'lab-E.coco.json'
    assert registry_main(['--db', str(data / 'registry.sqlite'), 'export', '--scan', 'lab-E', '--format', 'coco',
                          '-o', str(target)]) == 0
    assert 'wrote 4 annotations' in capsys.readouterr().err
    coco = json.loads(target.read_text())
    # Relative to the COCO file, as COCO readers (and flake-detect --coco) expect.
    for image in coco['images']:
        assert (target.parent / image['file_name']).is_file(), image['file_name']
        assert not Path(image['file_name']).is_absolute()
    assert coco['info']['left_out_observations'] == 0
    api = COCO(str(target))
    assert len(api.getImgIds()) == 2 and len(api.getAnnIds()) == 4
    # Outlines land on the true flakes in the frame's own pixels.
    for image in api.loadImgs(api.getImgIds()):
        index = int(Path(image['file_name']).name.split('_')[0])
        truth = truths[index]
        for annotation in api.loadAnns(api.getAnnIds(imgIds=[image['id']])):
            mask = api.annToMask(annotation).astype(bool)
            best = max((mask & t.mask).sum() / (mask | t.mask).sum() for t in truth)
            assert best > 0.7


def test_scans_without_kept_frames_use_their_mosaic_or_are_counted(tmp_path):
    with FlakeStore(tmp_path / 'registry.sqlite') as store:
        square = [(-10 * UM, -10 * UM), (10 * UM, -10 * UM), (10 * UM, 10 * UM), (-10 * UM, 10 * UM)]
        store.ingest([Sighting('chip-M', 'scan-M', x=0.0, y=0.0, material='hbn', layer_class=2, score=0.7,
                               contour=square, area=4e-10),
                      Sighting('chip-M', 'scan-M', x=1e-3, y=0.0, material='hbn', layer_class=2, score=0.6,
                               tile_index=3, contour=[(x + 1e-3, y) for x, y in square], area=4e-10)])
        assert build_coco(store, scan_id='scan-M')['info']['left_out_observations'] == 2
        # The scan's mosaic: 1 px = 2 um, wafer (-100 um, +100 um) at pixel (0, 0).
        mosaic_dir = tmp_path / 'scans' / 'scan-M'
        mosaic_dir.mkdir(parents=True)
        cv2.imwrite(str(mosaic_dir / 'mosaic.png'), np.zeros((100, 700, 3), np.uint8))
        (mosaic_dir / 'mosaic.json').write_text(json.dumps({'wafer_to_mosaic': [5e5, 0, 50, 0, -5e5, 50]}))
        coco = build_coco(store, scan_id='scan-M')
    assert coco['info']['left_out_observations'] == 0
    assert [Path(i['file_name']) for i in coco['images']] == [(mosaic_dir / 'mosaic.png').resolve()]
    assert coco['images'][0]['width'] == 700 and coco['images'][0]['height'] == 100
    first = coco['annotations'][0]
    assert first['bbox'] == [45.0, 45.0, 10.0, 10.0] and first['area'] == 100.0
