"""flake-import: a folder of micrographs (with stage positions) becomes a scan in the registry."""

import math

import cv2
from detector_synth import make_frame
import pytest

from flake_core.geometry import Affine2D, pixel_to_wafer
from flake_core.materials import LAYER_FEW, LAYER_MONO
from flake_registry.image_import import compile_name_pattern, main, position_from_name, positions_from_csv
from flake_registry.query import RegistryError
from flake_registry.store import FlakeStore

UM = 1e-6
PIXEL = 0.5 * UM
DETECTOR = ['--param', 'materials=graphene', '--param', 'calibration=model', '--param', 'max_layers=10']


@pytest.fixture(scope='module')
def lab_folder(tmp_path_factory):
    """Two micrographs with two graphene flakes each (1 and 3 layers), their stage positions and
    one file that is not an image."""
    folder = tmp_path_factory.mktemp('micrographs')
    truths = {}
    for name, seed, stage in (('a.png', 7, (2.0e-3, 1.0e-3)), ('b.png', 8, (2.5e-3, 1.0e-3))):
        image, flakes = make_frame(seed, 384, flakes=[('graphene', 1), ('graphene', 3)], clutter=False,
                                   radius=(30, 45))
        cv2.imwrite(str(folder / name), image)
        to_wafer = pixel_to_wafer(*stage, PIXEL, 384, 384, Affine2D())
        truths[name] = [(to_wafer.apply(*f.centre), f.layers) for f in flakes]
    (folder / 'broken.png').write_bytes(b'not a picture')
    (folder / 'stage.csv').write_text('file,x_mm,y_mm\na.png,2.0,1.0\nb.png,2.5,1.0\nbroken.png,3.0,1.0\n')
    return folder, truths


def test_an_imported_folder_appears_in_the_registry(lab_folder, tmp_path, capsys):
    folder, truths = lab_folder
    data = tmp_path / 'data'
    assert main([str(folder), '--chip', 'chip-L', '--scan', 'lab-1', '--pixel-size', '0.5um', '--objective', '50x',
                 '--positions', str(folder / 'stage.csv'), '--data-dir', str(data), *DETECTOR]) == 0
    printed = capsys.readouterr().out
    assert 'broken.png: not a readable image, left out' in printed
    assert 'scan lab-1: 2 of 3 image(s) imported' in printed

    with FlakeStore(data / 'registry.sqlite') as store:
        assert [(s['id'], s['chip_id']) for s in store.scans()] == [('lab-1', 'chip-L')]
        flakes = list(store.iter_flakes(chip_id='chip-L'))
        # Every true flake is in the registry where the stage positions put it, with its layer class.
        for name, expected in truths.items():
            for (x, y), layers in expected:
                near = [f for f in flakes if math.hypot(f.x - x, f.y - y) < 5 * UM]
                assert len(near) == 1, (name, x, y)
                assert near[0].layer_class == (LAYER_MONO if layers == 1 else LAYER_FEW)
                assert near[0].scan_id == 'lab-1' and near[0].material == 'graphene'
        # The images are kept in the data folder as the scan's frames, each flake has a crop.
        frames = store.frames('lab-1')
        assert sorted(frames) == [0, 1]
        for frame in frames.values():
            assert (data / frame['path']).is_file() and frame['path'].startswith('scans/lab-1/frames/')
            assert (frame['width'], frame['height'], frame['pixel_size']) == (384, 384, PIXEL)
        for flake in flakes:
            crops = [i for i in store.get_flake(flake.id).images if i.role == 'crop']
            assert len(crops) == 1 and (data / crops[0].path).is_file() and crops[0].objective == '50x'
        count = store.count()

    # Run again with the same scan id: nothing is imported twice.
    assert main([str(folder), '--chip', 'chip-L', '--scan', 'lab-1', '--pixel-size', '0.5um',
                 '--positions', str(folder / 'stage.csv'), '--data-dir', str(data), *DETECTOR]) == 0
    assert '2 already imported' in capsys.readouterr().out
    with FlakeStore(data / 'registry.sqlite') as store:
        assert store.count() == count
        assert all(f.n_observations == 1 for f in store.iter_flakes(chip_id='chip-L'))


def test_positions_from_file_names_and_side_by_side(lab_folder, tmp_path, capsys):
    folder, _ = lab_folder
    named = tmp_path / 'named'
    named.mkdir()
    (named / 'tile_X2000_Y1000.png').write_bytes((folder / 'a.png').read_bytes())
    (named / 'overview.png').write_bytes((folder / 'b.png').read_bytes())
    data = tmp_path / 'data'
    assert main([str(named), '--chip', 'chip-N', '--scan', 'names', '--pixel-size', '500nm', '--data-dir',
                 str(data), '--name-pattern', r'X(?P<x_um>-?[0-9.]+)_Y(?P<y_um>-?[0-9.]+)', *DETECTOR]) == 0
    assert 'overview.png: no stage position, left out' in capsys.readouterr().out
    assert main([str(named), '--chip', 'chip-S', '--scan', 'row', '--pixel-size', '0.5', '--data-dir', str(data),
                 *DETECTOR]) == 0
    assert 'images laid side by side' in capsys.readouterr().out
    with FlakeStore(data / 'registry.sqlite') as store:
        from_names = list(store.iter_flakes(chip_id='chip-N'))
        assert from_names and all(abs(f.x - 2e-3) < 100 * UM and abs(f.y - 1e-3) < 100 * UM for f in from_names)
        row = store.frames('row')
        # Laid side by side: the second image starts beyond the first one's right edge.
        first_right = row[0]['pixel_to_wafer'][0] * 383 + row[0]['pixel_to_wafer'][2]
        second_left = row[1]['pixel_to_wafer'][2]
        assert second_left - first_right >= 100 * UM


def test_position_sources_refuse_what_they_cannot_read(tmp_path):
    bad = tmp_path / 'bad.csv'
    bad.write_text('name,x,y\na.png,1,2\n')
    with pytest.raises(RegistryError, match='x_um, y_um'):
        positions_from_csv(bad)
    bad.write_text('file,x_um,y_um\na.png,one,2\n')
    with pytest.raises(RegistryError, match='line 2'):
        positions_from_csv(bad)
    with pytest.raises(RegistryError, match='named groups'):
        compile_name_pattern(r'X(\d+)_Y(\d+)')
    pattern = compile_name_pattern(r'X(?P<x_mm>[-0-9.]+)_Y(?P<y_mm>[-0-9.]+)')
    assert position_from_name(pattern, 'scan_X1.5_Y-0.25.tif').x == pytest.approx(1.5e-3)
    assert position_from_name(pattern, 'overview.tif') is None


def test_cli_errors_are_one_line_without_a_traceback(tmp_path, capsys):
    assert main([str(tmp_path / 'missing'), '--chip', 'c', '--pixel-size', '1um']) == 2
    assert 'is not a folder' in capsys.readouterr().err
    (tmp_path / 'x.png').write_bytes(b'')
    assert main([str(tmp_path), '--chip', 'c', '--pixel-size', '1um', '--param', 'materials=gold']) == 2
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: detector 'contrast'")
    with pytest.raises(SystemExit):
        main([str(tmp_path), '--chip', 'c', '--pixel-size=-1um'])
    assert '--pixel-size must be a positive length' in capsys.readouterr().err
