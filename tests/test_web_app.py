"""Lab web app over HTTP: filters, paging, validation errors, the token rule, stack reservations."""

from __future__ import annotations

import math
import re

import pytest
from web_helpers import SCAN_ID, make_registry, web_app, web_client

from flake_registry import labelling, stacks
from flake_registry.query import FlakeQuery
from flake_registry.stack_geometry import place_outline, stack_overlap
from flake_registry.store import Sighting
from flake_registry.web.app import is_loopback, main
from flake_registry.web.summaries import AREA_EDGES_UM2, THICKNESS_EDGES_NM, histogram


@pytest.fixture()
def registry(tmp_path):
    db_path, data_dir, store = make_registry(tmp_path, count=60)
    yield db_path, data_dir, store
    store.close()


@pytest.fixture()
def client(registry):
    db_path, data_dir, store = registry
    with web_client(web_app(db_path, data_dir, store)) as test_client:
        yield test_client


def card_ids(html: str) -> list[str]:
    return re.findall(r'data-flake="([^"]+)"', html)


def test_browser_filters_match_the_registry_query(client, registry):
    store = registry[2]
    response = client.get('/flakes', params=[('material', 'hbn'), ('layer_classes', 'few'), ('sort_by', 'area'),
                                             ('limit', '100')])
    assert response.status_code == 200
    expected = store.query(FlakeQuery(materials=('hbn',), layer_classes=(2,), sort_by='area', limit=100))
    assert expected.total > 0
    assert card_ids(response.text) == [f.id for f in expected.flakes]
    assert f'{expected.total} flake' in response.text


def test_browser_units_are_converted_to_si(client, registry):
    store = registry[2]
    response = client.get('/api/flakes', params={'area_min_um2': '300', 'sort_by': 'area', 'ascending': 'true',
                                                 'limit': '1000'})
    assert response.status_code == 200
    body = response.json()
    expected = store.query(FlakeQuery(area_min=300e-12, sort_by='area', ascending=True, limit=1000))
    assert [f['id'] for f in body['flakes']] == [f.id for f in expected.flakes]
    assert all(f['area'] >= 300e-12 for f in body['flakes'])
    assert 0 < body['total'] < 60


def test_paging_walks_every_flake_once(client):
    seen = []
    page = 1
    while True:
        response = client.get('/flakes', params={'limit': '25', 'page': str(page)})
        assert response.status_code == 200
        ids = card_ids(response.text)
        seen.extend(ids)
        if 'id="next-page"' not in response.text:
            break
        page += 1
    assert page == 3
    assert len(seen) == 60 and len(set(seen)) == 60
    assert 'page 3 of 3' in response.text


@pytest.mark.parametrize('params, code', [
    ({'material': 'unobtainium'}, 'INVALID_ARGUMENT'),
    ({'min_score': '1.5'}, 'INVALID_RANGE'),
    ({'limit': 'lots'}, 'INVALID_ARGUMENT'),
    ({'limit': '5000'}, 'INVALID_RANGE'),
    ({'page': '0'}, 'INVALID_RANGE'),
    ({'layers_min': '5', 'layers_max': '2'}, 'INVALID_RANGE'),
    ({'area_min_um2': 'big'}, 'INVALID_ARGUMENT'),
    ({'near_um': '1,2,3'}, 'INVALID_ARGUMENT'),
    ({'sort_by': 'colour'}, 'INVALID_ARGUMENT'),
    ({'drop_table': 'flakes'}, 'INVALID_ARGUMENT'),
])
def test_bad_filters_get_clear_errors(client, params, code):
    page = client.get('/flakes', params=params)
    assert page.status_code == 422
    assert 'text/html' in page.headers['content-type']
    assert code in page.text and 'Traceback' not in page.text
    api = client.get('/api/flakes', params=params)
    assert api.status_code == 422
    assert api.json()['error']['code'] == code


def test_unknown_things_are_404_pages_not_tracebacks(client):
    assert client.get('/flakes/F9999999').status_code == 404
    assert client.get('/api/flakes/F9999999').json()['error']['code'] == 'UNKNOWN_ID'
    assert client.get('/flakes/bad%20id!').status_code == 422
    assert client.get('/no/such/page').status_code == 404
    assert client.get('/?scan_id=nope').status_code == 404
    assert client.get('/api/chipmap', params={'scan_id': '../etc'}).status_code == 422
    assert client.get('/crops/../registry.sqlite').status_code in (404, 422)
    assert client.get('/defects/..%2F..').status_code in (404, 422)
    assert client.get('/api/stacks/not-a-recipe').json()['error']['code'] == 'INVALID_ARGUMENT'


def test_chip_map_markers_sit_on_the_mosaic(client, registry):
    store = registry[2]
    body = client.get('/api/chipmap', params={'scan_id': SCAN_ID}).json()
    assert body['total'] == 60 and len(body['markers']) == 60
    assert body['mosaic'] == {'url': f'/scans/{SCAN_ID}/mosaic.png', 'width': 200, 'height': 200,
                              'metres_per_pixel': 10e-6}
    flake = store.get_flake(body['markers'][0]['id']).flake
    marker = body['markers'][0]
    assert marker['u'] == pytest.approx(flake.x / 10e-6, abs=0.01)
    assert marker['v'] == pytest.approx(200 - flake.y / 10e-6, abs=0.01)
    assert marker['colour'] == '#4fc3f7' if flake.material == 'graphene' else marker['colour'].startswith('#')
    png = client.get(body['mosaic']['url'])
    assert png.status_code == 200 and png.content[:4] == b'\x89PNG'


def test_chip_map_draws_the_scans_thickness_and_area_distributions(client, registry):
    store = registry[2]
    flakes = list(store.iter_flakes(scan_id=SCAN_ID))
    html = client.get('/', params={'scan_id': SCAN_ID}).text
    assert 'id="scan-distributions"' in html and f'{len(flakes)} flakes' in html
    for material in {f.material for f in flakes}:
        mine = [f for f in flakes if f.material == material]
        expected_thickness = histogram([f.thickness_nm for f in mine], THICKNESS_EDGES_NM, 'nm').counts
        expected_area = histogram([f.area * 1e12 for f in mine], AREA_EDGES_UM2, 'um2').counts
        for chart, expected in ((f'thickness-{material}', expected_thickness), (f'area-{material}', expected_area)):
            svg = re.search(rf'<svg class="histogram" id="{chart}".*?</svg>', html, re.S).group(0)
            assert [int(n) for n in re.findall(r'data-count="(\d+)"', svg)] == expected
        assert sum(expected_thickness) == len(mine)


def test_histogram_bins_are_half_open_and_catch_the_extremes():
    counts = histogram([0.0, 0.99, 1.0, 4.9, 250.0, -1.0], THICKNESS_EDGES_NM, 'nm')
    assert counts.counts == [3, 1, 1, 0, 0, 0, 0, 1]
    assert counts.labels[0] == '0–1' and counts.labels[-1] == '> 100 nm'


def test_flake_page_shows_thickness_observations_and_history(client, registry):
    store = registry[2]
    flake = store.query(FlakeQuery(materials=('graphene',), limit=1)).flakes[0]
    reservation = store.reserve(flake.id, 'robot-7', 60)
    store.release(flake.id, reservation.token)
    html = client.get(f'/flakes/{flake.id}').text
    assert f'{flake.thickness_nm:.2f} ± {flake.thickness_nm_std:.2f} nm' in html
    assert 'robot-7' in html and 'released' in html
    assert SCAN_ID in html  # the observation row
    assert client.get(f'/flakes/{flake.id}/context.png').content[:4] == b'\x89PNG'
    assert client.get(f'/flakes/{flake.id}/thumb.png').content[:4] == b'\x89PNG'


def test_labels_are_stored_with_who_and_when(client, registry):
    store = registry[2]
    response = client.post('/flakes/F0000003/labels', data={'who': 'ada', 'verdict': 'relabel', 'material': 'hbn',
                                                             'layer_class': 'thick'}, follow_redirects=False)
    assert response.status_code == 303
    rows = store.labels('F0000003')
    assert len(rows) == 1
    assert rows[0]['label'] == 'relabel:hbn:thick' and rows[0]['labelled_by'] == 'ada' and rows[0]['created'] > 0
    bad = client.post('/flakes/F0000003/labels', data={'who': 'ada', 'verdict': 'maybe', 'material': 'hbn',
                                                        'layer_class': 'thick'})
    assert bad.status_code == 422 and 'verdict must be one of' in bad.text
    missing = client.post('/api/labels', json={'who': 'ada', 'verdict': 'accept', 'material': 'hbn',
                                               'layer_class': 'mono'})
    assert missing.status_code == 422
    assert len(store.labels('F0000003')) == 1


def test_crop_labels_stay_inside_the_data_folder(client, registry):
    _, data_dir, store = registry
    crop = data_dir / 'candidates' / 'frame1' / 'c0001.png'
    crop.parent.mkdir(parents=True)
    import cv2
    import numpy as np
    cv2.imwrite(str(crop), np.full((80, 80, 3), 100, np.uint8))
    ok = client.post('/api/labels', json={'who': 'bo', 'verdict': 'reject', 'material': 'unknown',
                                          'layer_class': 'unknown', 'crop_path': 'candidates/frame1/c0001.png'})
    assert ok.status_code == 201
    outside = client.post('/api/labels', json={'who': 'bo', 'verdict': 'reject', 'material': 'unknown',
                                               'layer_class': 'unknown', 'crop_path': '../../etc/passwd'})
    assert outside.status_code == 403 and outside.json()['error']['code'] == 'FORBIDDEN'
    assert 'climbs out of its folder' in outside.json()['error']['message']
    (data_dir / 'candidates' / 'link.png').symlink_to('/etc/hostname')
    linked = client.post('/api/labels', json={'who': 'bo', 'verdict': 'reject', 'material': 'unknown',
                                              'layer_class': 'unknown', 'crop_path': 'candidates/link.png'})
    assert linked.status_code == 403 and 'outside the folder' in linked.json()['error']['message']
    assert [r['crop_path'] for r in store.labels()] == ['candidates/frame1/c0001.png']


def test_export_of_labelled_crops_counts_good_and_bad(registry, tmp_path):
    _, data_dir, store = registry
    crop = data_dir / 'candidates' / 'c1.png'
    crop.parent.mkdir(parents=True)
    import cv2
    import numpy as np
    cv2.imwrite(str(crop), np.full((64, 64, 3), 90, np.uint8))
    store.add_image('F0000001', 'crop', str(crop))
    labelling.label_flake(store, 'F0000001', labelling.make_label('accept', 'graphene', 'mono'), 'ada')
    labelling.label_crop(store, data_dir, 'candidates/c1.png', labelling.make_label('reject', 'unknown', 0), 'ada')
    # A flake without a stored crop is cut from the frame it was detected in.
    labelling.label_flake(store, 'F0000002', labelling.make_label('accept', 'hbn', 'few'), 'ada')
    # A flake with no image at all (its tile was never recorded) is reported, not silently dropped.
    lost = store.ingest([Sighting(chip_id='chip-web', scan_id='scan-web-1', x=1.5e-3, y=1.5e-3, material='hbn',
                                  tile_index=7777, contour=[(1.5e-3, 1.5e-3), (1.51e-3, 1.5e-3), (1.5e-3, 1.51e-3)],
                                  area=5e-11, score=0.9)])[0].flake_id
    labelling.label_flake(store, lost, labelling.make_label('accept', 'hbn', 'few'), 'ada')
    summary = labelling.export_labelled_crops(store, data_dir, tmp_path / 'crops')
    assert (summary.good, summary.bad, summary.skipped) == (2, 1, [lost])
    good = sorted((tmp_path / 'crops' / 'good').glob('*.png'))
    assert len(good) == 2 and all(cv2.imread(str(g)).shape == (80, 80, 3) for g in good)
    assert (tmp_path / 'crops' / 'labels.csv').read_text().count('\n') == 4


def test_token_rule(registry):
    db_path, data_dir, store = registry
    with web_client(web_app(db_path, data_dir, store, token='s3cret-token')) as guarded:
        label = {'who': 'ada', 'verdict': 'accept', 'material': 'graphene', 'layer_class': 'mono',
                 'flake_id': 'F0000001'}
        assert guarded.get('/api/flakes').status_code == 401  # with a token, reading needs it too
        assert guarded.get('/flakes').status_code == 401 and 'id="login-form"' in guarded.get('/flakes').text
        assert guarded.get('/api/flakes', headers={'X-Flake-Token': 's3cret-token'}).status_code == 200
        refused = guarded.post('/api/labels', json=label)
        assert refused.status_code == 401 and refused.json()['error']['code'] == 'UNAUTHORISED'
        assert guarded.post('/api/labels', json=label, headers={'X-Flake-Token': 'wrong'}).status_code == 401
        assert guarded.post('/api/labels', json=label, headers={'X-Flake-Token': 's3cret-token'}).status_code == 201
        assert guarded.post('/login', data={'token': 'nope'}).status_code == 401
        logged_in = guarded.post('/login', data={'token': 's3cret-token'}, follow_redirects=False)
        assert logged_in.status_code == 303
        assert guarded.post('/api/labels', json=label).status_code == 201  # cookie from /login
    assert len(store.labels('F0000001')) == 2
    assert is_loopback('127.0.0.1') and is_loopback('::1') and is_loopback('localhost')
    assert not is_loopback('0.0.0.0') and not is_loopback('192.168.1.5')
    with pytest.raises(SystemExit) as refused_start:
        main(['--host', '0.0.0.0', '--db', str(db_path), '--data-dir', str(data_dir)])
    assert refused_start.value.code == 2


def test_stack_reservation_is_all_or_none(client, registry):
    store = registry[2]
    ids = ['F0000002', 'F0000001', 'F0000006']  # hBN / graphene / hBN
    blocker = store.reserve('F0000006', 'other-robot', 600)
    layers = [{'flake_id': i, 'rotation_deg': 30.0 * k} for k, i in enumerate(ids)]
    refused = client.post('/api/stacks', json={'name': 'hBN/G/hBN', 'robot_id': 'arm-1', 'lease_s': 600,
                                               'layers': layers})
    assert refused.status_code == 409
    assert refused.json()['error']['code'] == 'ALREADY_RESERVED'
    assert refused.json()['error']['flake_id'] == 'F0000006'
    # Nothing of the stack was reserved: the first two flakes are still free.
    assert [r['flake_id'] for r in store.reservations()] == ['F0000006']
    recipe_id = refused.json()['recipe']['id']
    store.release('F0000006', blocker.token)
    reserved = client.post(f'/api/stacks/{recipe_id}/reserve', params={'robot_id': 'arm-1', 'lease_s': 600})
    assert reserved.status_code == 200
    body = reserved.json()
    assert [layer['flake_id'] for layer in body['layers']] == ids
    assert all(layer['token'] for layer in body['layers'])
    assert sorted(r['flake_id'] for r in store.reservations()) == sorted(ids)
    assert {r['robot_id'] for r in store.reservations()} == {'arm-1'}
    # The robot can use the tokens kept in the recipe.
    store.mark_used('F0000001', body['layers'][1]['token'])
    exported = client.get(f'/api/stacks/{recipe_id}', params={'download': 'true'})
    assert exported.headers['content-disposition'].endswith(f'{recipe_id}.json"')
    recipe = exported.json()
    assert recipe['order'] == 'bottom_first'
    assert [layer['rotation_deg'] for layer in recipe['layers']] == pytest.approx([0.0, 30.0, 60.0])
    flake = store.get_flake('F0000002').flake
    assert recipe['layers'][0]['wafer_position_m'] == pytest.approx([flake.x, flake.y])
    assert 'token' not in recipe['layers'][0]  # tokens only go to whoever reserved
    again = client.post(f'/api/stacks/{recipe_id}/reserve', params={'robot_id': 'arm-2'})
    assert again.status_code == 409


@pytest.mark.parametrize('body', [
    {'name': 'x', 'robot_id': 'arm', 'layers': []},
    {'name': 'x', 'robot_id': 'arm', 'layers': [{'flake_id': 'F0000001', 'rotation_deg': 1000}]},
    {'name': 'x', 'robot_id': 'arm', 'layers': [{'flake_id': 'F0000001'}, {'flake_id': 'F0000001'}]},
    {'name': 'x', 'robot_id': 'a b', 'layers': [{'flake_id': 'F0000001'}]},
    {'name': 'x', 'robot_id': 'arm', 'layers': [{'flake_id': 'F0000001', 'colour': 'red'}]},
    {'name': 'x', 'robot_id': 'arm', 'layers': [{'flake_id': 'F9999999'}]},
    {'name': '', 'robot_id': 'arm', 'layers': [{'flake_id': 'F0000001'}]},
])
def test_bad_stacks_are_refused_with_json_errors(client, registry, body):
    response = client.post('/api/stacks', json=body)
    assert response.status_code in (404, 422)
    assert response.json()['error']['code'] in ('INVALID_ARGUMENT', 'UNKNOWN_ID')
    assert registry[2].reservations() == []


def test_a_stack_takes_the_robot_ids_a_single_reservation_takes(client, registry):
    store = registry[2]
    recipe = client.post('/api/stacks', json={'name': 'pair', 'reserve': False,
                                              'layers': [{'flake_id': 'F0000001'}, {'flake_id': 'F0000002'}]}).json()
    refused = client.post(f'/api/stacks/{recipe["id"]}/reserve', params={'robot_id': 'arm 1'})
    assert refused.status_code == 422 and 'without spaces' in refused.json()['error']['message']
    single = store.reserve('F0000003', 'lab#2/arm', 60)      # a robot id the registry takes for one flake ...
    store.release('F0000003', single.token)
    reserved = client.post(f'/api/stacks/{recipe["id"]}/reserve', params={'robot_id': 'lab#2/arm'})
    assert reserved.status_code == 200                       # ... it takes for a stack too
    assert {r['robot_id'] for r in store.reservations()} == {'lab#2/arm'}


def test_stack_preview_coverage(client, registry):
    store = registry[2]
    body = client.post('/api/stacks/preview', json={'layers': [{'flake_id': 'F0000002'},
                                                               {'flake_id': 'F0000001', 'rotation_deg': 45}]}).json()
    assert len(body['layers']) == 2
    covered = body['overlap']['covered']
    areas = body['overlap']['areas']
    # Covered area is shared: share_i * area_i == share_j * area_j (to raster precision).
    assert covered[0][1] * areas[0] == pytest.approx(covered[1][0] * areas[1], rel=0.03)
    flake = store.get_flake('F0000001').flake
    centroid = [sum(p[i] for p in body['layers'][1]['outline']) / len(flake.contour) for i in (0, 1)]
    expected = place_outline(flake.contour, (flake.x, flake.y), math.radians(45))
    assert centroid == pytest.approx(expected.mean(axis=0).tolist(), abs=1e-12)


def test_stack_overlap_of_known_squares():
    big = place_outline([(0, 0), (4, 0), (4, 4), (0, 4)], (2, 2), 0.0)
    small = place_outline([(0, 0), (2, 0), (2, 2), (0, 2)], (1, 1), math.pi / 4)
    shifted = place_outline([(0, 0), (2, 0), (2, 2), (0, 2)], (1, 1), 0.0, offset=(2.0, 0.0))
    overlap = stack_overlap([big, small, shifted])
    assert overlap.areas == pytest.approx([16.0, 4.0, 4.0])
    assert overlap.covered[1][0] == pytest.approx(1.0, abs=0.01)   # rotated small square inside the big one
    assert overlap.covered[0][1] == pytest.approx(0.25, abs=0.01)
    assert overlap.covered[2][0] == pytest.approx(0.5, abs=0.01)   # half of the shifted square sticks out
    assert overlap.common_area == pytest.approx(overlap.covered[2][1] * 4.0, rel=0.05)
    with pytest.raises(ValueError):
        place_outline([(0, 0), (1, 1)], (0, 0), 0.0)


def test_recipes_keep_order_and_survive_reopening(registry):
    db_path, _, store = registry
    layers = [stacks.StackLayer('F0000006', rotation=0.1), stacks.StackLayer('F0000001', rotation=-0.2)]
    recipe = stacks.save_recipe(store, 'two', layers, created_by='ada')
    from flake_registry.store import FlakeStore
    with FlakeStore(db_path) as other:
        again = stacks.get_recipe(other, recipe.id)
    assert [layer.flake_id for layer in again.layers] == ['F0000006', 'F0000001']
    assert [layer.rotation for layer in again.layers] == pytest.approx([0.1, -0.2])
    assert again.layers[0].material == store.get_flake('F0000006').flake.material


def test_defect_reports_show_overlay_and_concentrations(client, registry):
    _, data_dir, store = registry
    import json

    import cv2
    import numpy as np
    folder = data_dir / 'defects' / 'mote2-001'
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / 'mote2-001_overlay.png'), np.zeros((32, 32, 3), np.uint8))
    (folder / 'mote2-001_cells.csv').write_text('cell,class_id,class,confidence\n0,1,V_Te1,0.9\n')
    (folder / 'mote2-001_report.json').write_text(json.dumps({
        'image_id': 'mote2-001', 'cells_total': 1200, 'analysed_area_nm2': 25000.0, 'pixel_size_m': 2e-11,
        'model_version': 'defects-test',
        'classes': [{'name': 'Perfect', 'count': 1190, 'concentration_cm2': 4.76e15, 'concentration_low_cm2': 4.5e15,
                     'concentration_high_cm2': 5.0e15},
                    {'name': 'V_Te1', 'count': 10, 'concentration_cm2': 4.0e12, 'concentration_low_cm2': 1.9e12,
                     'concentration_high_cm2': 7.4e12}]}))
    listing = client.get('/defects').text
    assert 'href="/defects/mote2-001"' in listing
    page = client.get('/defects/mote2-001')
    assert page.status_code == 200
    assert '/defects/mote2-001/files/mote2-001_overlay.png' in page.text
    assert 'V_Te1' in page.text and '4e+12' in page.text and '1.9e+12 – 7.4e+12' in page.text
    assert client.get('/defects/mote2-001/files/mote2-001_overlay.png').content[:4] == b'\x89PNG'
    assert client.get('/defects/mote2-001/files/secret.txt').status_code == 404
    store.add_defect_report({'image_id': 'stem-7', 'cells_total': 50, 'class_names': ['Perfect', 'V_Mo'],
                             'counts': [48, 2], 'concentration': [1e15, 3.5e13]}, flake_id='F0000003')
    stored = client.get('/defects').text
    assert 'stem-7' in stored and 'V_Mo: 3.5e+13' in stored and 'href="/flakes/F0000003"' in stored


def test_internal_failures_give_a_page_without_traceback(registry, monkeypatch):
    db_path, data_dir, store = registry

    def broken(query):
        raise RuntimeError('disk on fire at /secret/path')

    monkeypatch.setattr(store, 'query', broken)
    with web_client(web_app(db_path, data_dir, store), raise_server_exceptions=False) as failing:
        page = failing.get('/flakes')
        assert page.status_code == 500
        assert 'INTERNAL_ERROR' in page.text and 'RuntimeError' in page.text
        assert '/secret/path' not in page.text and 'Traceback' not in page.text
        api = failing.get('/api/flakes')
        assert api.status_code == 500 and api.json()['error']['code'] == 'INTERNAL_ERROR'


def test_writes_from_another_site_are_refused(client, registry):
    label = {'who': 'mallory', 'verdict': 'reject', 'material': 'graphene', 'layer_class': 'mono'}
    cross = client.post('/flakes/F0000001/labels', data=label, headers={'Origin': 'http://evil.example'})
    assert cross.status_code == 403 and 'another site' in cross.text
    same = client.post('/flakes/F0000001/labels', data=label, headers={'Origin': 'http://testserver'},
                       follow_redirects=False)
    assert same.status_code == 303
    assert [r['labelled_by'] for r in registry[2].labels('F0000001')] == ['mallory']


def test_chip_map_region_returns_only_flakes_inside(client, registry):
    store = registry[2]
    region = (40e-6, 40e-6, 140e-6, 100e-6)
    body = client.get('/api/chipmap', params={'scan_id': SCAN_ID, 'region': ','.join(map(str, region))}).json()
    inside = {f.id for f in store.iter_flakes() if region[0] <= f.x <= region[2] and region[1] <= f.y <= region[3]}
    assert 0 < len(inside) < 60
    assert {m['id'] for m in body['markers']} == inside and body['total'] == len(inside)
    assert body['to_view'] == pytest.approx([1e5, 0, 0, 0, -1e5, 200])
    bad = client.get('/api/chipmap', params={'scan_id': SCAN_ID, 'region': '1,2,0,0'})
    assert bad.status_code == 422 and bad.json()['error']['code'] == 'INVALID_RANGE'


def test_thumbnail_prefers_the_stored_crop(client, registry):
    _, data_dir, store = registry
    import cv2
    import numpy as np
    crop = data_dir / 'crops' / 'F0000004.png'
    crop.parent.mkdir(parents=True)
    cv2.imwrite(str(crop), np.full((80, 80, 3), (10, 200, 30), np.uint8))
    store.add_image('F0000004', 'crop', 'crops/F0000004.png', objective='10x', pixel_size=1e-6)
    thumb = cv2.imdecode(np.frombuffer(client.get('/flakes/F0000004/thumb.png').content, np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape == (150, 150, 3) and tuple(int(v) for v in thumb[75, 75]) == (10, 200, 30)
    page = client.get('/flakes/F0000004').text
    assert '/images/0?flake_id=F0000004' in page and 'Crop · 10x' in page
    assert '/flakes/F0000004/images/0.png' in page
    assert client.get('/images/0', params={'flake_id': 'F0000004'}).content[:4] == b'\x89PNG'
    assert client.get('/images/1', params={'flake_id': 'F0000004'}).status_code == 404
