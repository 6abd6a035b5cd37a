"""Undo and control, downloads, pictures, units and colours of the web app, at the HTTP level."""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile

import cv2
import numpy as np
import pytest
from web_helpers import SCAN_ID, add_unknown_candidates, make_registry, web_app, web_client

from flake_core import materials
from flake_core.units import local_time, local_zone
from flake_registry import export, labelling
from flake_registry.query import FlakeQuery
from flake_registry.store import Sighting
from flake_registry.web import drawing
from flake_registry.web.rendering import contrast_text
from flake_registry.web.summaries import chip_scope, scan_scope


@pytest.fixture()
def registry(tmp_path):
    db_path, data_dir, store = make_registry(tmp_path, count=24)
    yield db_path, data_dir, store
    store.close()


@pytest.fixture()
def client(registry):
    db_path, data_dir, store = registry
    with web_client(web_app(db_path, data_dir, store)) as test_client:
        yield test_client


def png(response) -> np.ndarray:
    assert response.status_code == 200 and response.headers['content-type'] == 'image/png'
    return cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)


def longest_white_run(pixels: np.ndarray) -> int:
    """The longest horizontal run of pure white pixels (a scale bar) in the picture."""
    white = np.all(pixels == 255, axis=2)
    best = 0
    for row in white:
        run = 0
        for value in row:
            run = run + 1 if value else 0
            best = max(best, run)
    return best


# -- undo and control -----------------------------------------------------------------------------------


def test_release_goes_through_the_registry_and_is_recorded(client, registry):
    store = registry[2]
    store.reserve('F0000003', 'robot-1', 3600)
    released = client.post('/api/flakes/F0000003/release', json={'who': 'ada', 'note': 'reserved by mistake'})
    assert released.status_code == 200 and released.json()['released_from'] == 'robot-1'
    assert store.reservations('F0000003') == []
    assert [(r['robot_id'], r['outcome']) for r in store.reservations('F0000003', live_only=False)] == [
        ('robot-1', 'released')]
    again = client.post('/api/flakes/F0000003/release', json={'who': 'ada'})
    assert again.status_code == 409 and again.json()['error']['code'] == 'NOT_RESERVED'
    assert client.post('/api/flakes/F9999999/release', json={'who': 'ada'}).status_code == 404
    assert client.post('/api/flakes/F0000003/release', json={'who': ''}).status_code == 422
    page = client.get('/flakes/F0000003').text
    assert 'released' in page and 'robot-1' in page


def test_mark_used_of_an_available_and_of_a_reserved_flake(client, registry):
    store = registry[2]
    used = client.post('/api/flakes/F0000004/mark-used', json={'who': 'ada', 'note': 'into stack 7'})
    assert used.status_code == 200 and used.json()['used_by'] == 'web-ada'
    record = store.get_flake('F0000004').flake
    assert record.status == 3 and record.used_note == 'marked used in the web app by ada: into stack 7'
    assert store.reservations('F0000004') == []  # never left reserved
    store.reserve('F0000005', 'robot-2', 3600)
    assert client.post('/api/flakes/F0000005/mark-used', json={'who': 'bo'}).json()['used_by'] == 'robot-2'
    twice = client.post('/api/flakes/F0000004/mark-used', json={'who': 'ada'})
    assert twice.status_code == 409 and twice.json()['error']['code'] == 'ALREADY_USED'
    form = client.post('/flakes/F0000006/mark-used', data={'who': 'cy', 'note': ''}, follow_redirects=False)
    assert form.status_code == 303 and 'marked+used' in form.headers['location']


def test_a_stack_is_unreserved_with_the_tokens_it_holds(client, registry):
    store = registry[2]
    layers = [{'flake_id': f} for f in ('F0000002', 'F0000001', 'F0000006')]
    recipe = client.post('/api/stacks', json={'name': 'undo me', 'robot_id': 'arm-1', 'layers': layers}).json()
    assert sorted(r['flake_id'] for r in store.reservations()) == ['F0000001', 'F0000002', 'F0000006']
    store.mark_used('F0000001', recipe['layers'][1]['token'])  # the robot already placed the middle layer
    released = client.post(f'/api/stacks/{recipe["id"]}/release', json={'who': 'ada'})
    assert released.status_code == 200
    assert released.json()['released'] == ['F0000002', 'F0000006']
    assert [k['flake_id'] for k in released.json()['kept']] == ['F0000001']
    assert store.reservations() == []
    again = client.post(f'/api/stacks/{recipe["id"]}/release', json={'who': 'ada'})
    assert again.status_code == 409 and again.json()['error']['code'] == 'NOT_RESERVED'
    planner = client.get('/planner').text
    assert 'undo me' in planner and '0 of 3 held, 1 used' in planner


def test_labels_are_corrected_and_withdrawn_with_their_history(client, registry):
    store = registry[2]
    first = client.post('/api/labels', json={'who': 'ada', 'verdict': 'accept', 'material': 'hbn',
                                             'layer_class': 'few', 'flake_id': 'F0000002'}).json()['id']
    second = client.post('/api/labels', json={'who': 'bo', 'verdict': 'relabel', 'material': 'graphene',
                                              'layer_class': 'mono', 'flake_id': 'F0000002'}).json()['id']
    assert {r['flake_id']: r['label'] for r in labelling.latest_labels(store)}['F0000002'] == 'relabel:graphene:mono'
    assert client.post(f'/api/labels/{second}/withdraw', json={'who': 'ada'}).status_code == 200
    assert {r['flake_id']: r['label'] for r in labelling.latest_labels(store)}['F0000002'] == 'accept:hbn:few'
    refused = client.post(f'/api/labels/{second}/withdraw', json={'who': 'ada'})
    assert refused.status_code == 422 and 'already withdrawn' in refused.json()['error']['message']
    assert client.post('/api/labels/99999/withdraw', json={'who': 'ada'}).status_code == 404
    assert client.post(f'/api/labels/{first}/withdraw', json={'who': 'ada'}).status_code == 200
    assert 'F0000002' not in {r['flake_id'] for r in labelling.latest_labels(store)}
    history = [(r['label'], r['labelled_by']) for r in store.labels('F0000002')]
    assert history == [('accept:hbn:few', 'ada'), ('relabel:graphene:mono', 'bo'), (f'withdrawn:{second}', 'ada'),
                       (f'withdrawn:{first}', 'ada')]
    page = client.get('/flakes/F0000002').text
    assert page.count('class="withdrawn"') == 2 and 'withdrawn by ada' in page


def test_labelling_page_puts_thin_flakes_first_and_remembers_the_labeller(client, registry):
    store = registry[2]
    response = client.post('/api/labels/batch', json={'who': 'grace', 'items': [
        {'verdict': 'reject', 'material': 'hbn', 'layer_class': 'few', 'flake_id': 'F0000002'},
        {'verdict': 'accept', 'material': 'graphene', 'layer_class': 'mono', 'flake_id': 'F0000001'}]})
    assert response.status_code == 201 and response.json()['count'] == 2
    assert 'labeller=grace' in response.headers['set-cookie']
    page = client.get('/labels').text
    assert 'value="grace"' in page
    queued = re.findall(r'data-flake="([^"]+)" data-material="[^"]+" data-layer="([^"]+)"', page)
    layers = [layer for _, layer in queued]
    assert layers[:layers.index('thick')] and set(layers[:layers.index('thick')]) <= {'mono', 'few'}
    assert 'F0000001' not in [flake for flake, _ in queued]
    bad = client.post('/api/labels/batch', json={'who': 'grace', 'items': [
        {'verdict': 'accept', 'material': 'hbn', 'layer_class': 'few', 'flake_id': 'F0000003'},
        {'verdict': 'accept', 'material': 'hbn', 'layer_class': 'few', 'flake_id': 'F9999999'}]})
    assert bad.status_code == 404 and store.labels('F0000003') == []  # nothing stored of a refused batch


# -- downloads --------------------------------------------------------------------------------------------


def test_flake_zip_holds_record_outline_frame_and_revisit(client, registry):
    store = registry[2]
    flake = store.get_flake('F0000001').flake
    response = client.get('/flakes/F0000001/download.zip')
    assert response.headers['content-disposition'] == 'attachment; filename="flake_F0000001.zip"'
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = set(archive.namelist())
        assert {'flake.json', 'outline.csv', 'outline.png', 'frame_tile00000.png', 'frame_flake.png',
                'revisit_0.png', 'revisit_0_annotated.png', 'README.txt'} == names
        record = json.loads(archive.read('flake.json'))
        assert record['x_um'] == pytest.approx(flake.x * 1e6, abs=0.01)
        assert record['thickness_nm'] == pytest.approx(flake.thickness_nm, abs=1e-3)
        assert 'micrometres' in archive.read('README.txt').decode()
        frame = cv2.imdecode(np.frombuffer(archive.read('frame_tile00000.png'), np.uint8), cv2.IMREAD_COLOR)
        assert frame.shape == (400, 400, 3)   # the frame as stored, full resolution
        assert longest_white_run(cv2.imdecode(np.frombuffer(archive.read('revisit_0_annotated.png'), np.uint8),
                                              cv2.IMREAD_COLOR)) > 20


def test_scan_and_chip_zips_carry_units_in_their_headers(client, registry):
    store = registry[2]
    for url in (f'/scans/{SCAN_ID}/download.zip', '/chips/chip-web/download.zip'):
        with zipfile.ZipFile(io.BytesIO(client.get(url).content)) as archive:
            rows = list(csv.DictReader(io.StringIO(archive.read('flakes.csv').decode())))
            assert len(rows) == 24
            header = list(rows[0])
            assert header == list(export.CSV_COLUMNS)    # the rows of flake-registry export
            assert {'area_um2', 'x_um', 'y_um', 'thickness_nm', 'thickness_std_nm', 'isolation_um',
                    'detected_local_time'} <= set(header)
            assert not {'area', 'x', 'y', 'created'} & set(header)
            flake = store.get_flake(rows[0]['id']).flake
            assert float(rows[0]['area_um2']) == pytest.approx(flake.area * 1e12, abs=0.01)
            assert json.loads(archive.read('flakes.json'))['flakes'][0]['outline_um']
            assert {f'mosaic_{SCAN_ID}.png', f'mosaic_{SCAN_ID}_annotated.png'} <= set(archive.namelist())
    assert client.get('/scans/no-such-scan/download.zip').status_code == 404
    assert client.get('/chips/..%2F/download.zip').status_code in (404, 422)


# -- pictures, colours, units ------------------------------------------------------------------------------


def test_scale_bar_is_a_round_length_at_the_pictures_scale():
    canvas = np.zeros((300, 400, 3), np.uint8)
    drawn = drawing.annotate(canvas, 1e-6, [('#4fc3f7', 'graphene · mono · 0.34 nm')])
    assert longest_white_run(drawn) == 50      # 22 % of 400 µm is 88 µm: the bar shows 50 µm
    assert drawing.nice_length(88e-6) == pytest.approx(50e-6) and drawing.nice_length(1.9e-7) == pytest.approx(1e-7)
    swatch = drawn[5:18, 5:18].reshape(-1, 3)
    assert any(tuple(int(v) for v in p) == materials.colour_bgr('graphene') for p in swatch)


@pytest.mark.parametrize('path', ['thumb.png', 'outline.png', 'frame.png', 'context.png', 'images/0.png'])
def test_every_flake_picture_has_a_scale_bar(client, path):
    pixels = png(client.get(f'/flakes/F0000001/{path}'))
    assert longest_white_run(pixels) >= 8, path


def test_the_frame_is_shown_at_full_resolution(client, registry):
    store = registry[2]
    flake = store.get_flake('F0000001').flake
    frame = png(client.get('/flakes/F0000001/frame.png'))
    whole = png(client.get('/flakes/F0000001/frame.png', params={'whole': 'true'}))
    assert whole.shape == (400, 400, 3)
    assert flake.tile_index == 0
    # Each camera pixel is shown as a whole block of screen pixels, never interpolated: inside the
    # flake (away from the drawn outline) every aligned k x k block is one colour.
    assert frame.shape[0] >= 360

    def blocks_uniform(k: int) -> bool:
        centre = frame.shape[0] // 2 // k * k
        region = frame[centre - 4 * k:centre + 4 * k, centre - 4 * k:centre + 4 * k].astype(int)
        tiles = region.reshape(8, k, 8, k, 3)
        return bool(np.all(tiles == tiles[:, :1, :, :1, :]))

    factor = next(k for k in range(6, 0, -1) if frame.shape[0] % k == 0 and blocks_uniform(k))
    assert factor >= 2


def test_colours_come_from_the_materials_vocabulary(client, registry):
    sheet = client.get('/materials.css').text
    for name in materials.MATERIAL_NAMES:
        assert f'.mat-{name} {{ color: {materials.colour(name)}; }}' in sheet
    body = client.get('/api/chipmap', params={'scan_id': SCAN_ID}).json()
    assert all(m['colour'] == materials.colour(m['material']) for m in body['markers'])
    preview = client.post('/api/stacks/preview', json={'layers': [{'flake_id': 'F0000002'}, {'flake_id': 'F0000001'},
                                                                  {'flake_id': 'F0000006'}]}).json()
    colours = [layer['colour'] for layer in preview['layers']]
    assert colours[0] == materials.colour('hbn') and colours[1] == materials.colour('graphene')
    assert len(set(colours)) == 3 and preview['layers'][2]['dash']   # the second hBN layer stands apart
    assert 'style=' not in client.get('/flakes').text   # no inline styles: the CSP allows none


def test_pages_speak_micrometres_nanometres_and_local_time(client, registry):
    store = registry[2]
    page = client.get('/flakes/F0000001').text
    flake = store.get_flake('F0000001').flake
    assert f'{flake.area * 1e12:.1f} µm²' in page and f'x {flake.x * 1e6:.1f} µm' in page
    assert ' nm' in page and f'When ({local_zone()})' in page and local_time(flake.detected_at) in page
    near = client.get('/api/flakes', params={'near_um': f'{flake.x * 1e3} mm, {flake.y * 1e3} mm',
                                             'max_distance_um': '0.001 mm'}).json()
    assert [f['id'] for f in near['flakes']] == ['F0000001']
    wrong = client.get('/api/flakes', params={'near_um': '1.2 kg, 3'})
    assert wrong.status_code == 422 and "'kg' in '1.2 kg' is not a unit of length" in wrong.json()['error']['message']
    bare = client.get('/api/flakes', params={'max_distance_um': '5'})
    assert bare.status_code == 422 and 'needs a point' in bare.json()['error']['message']


def test_thin_flakes_lead_the_browser_and_the_chip_map(client, registry):
    store = registry[2]
    page = client.get('/flakes').text
    assert page.index('id="thin-flakes"') < page.index('id="gallery"')
    thin_ids = re.findall(r'data-flake="([^"]+)"', page[page.index('id="thin-gallery"'):page.index('id="gallery"')])
    assert thin_ids and store.get_flake(thin_ids[0]).flake.layer_class == 1
    monolayers = store.query(FlakeQuery(materials=('graphene',), layer_classes=(1,), limit=1)).total
    chip_map = client.get('/').text
    assert re.search(rf'graphene</span></td>\s*<td><a [^>]+>{monolayers}</a>', chip_map)


def test_unknown_material_candidates_are_shown_apart(client, registry):
    store = registry[2]
    ids = add_unknown_candidates(store)
    page = client.get('/flakes', params={'material': 'unknown'}).text
    assert page.count('unknown-material') == 2 and 'contrast not recorded' in page
    assert 'colour fits no calibration' in client.get(f'/flakes/{ids[0]}').text

    class WithContrast:
        contrast = (0.12, -0.05, 0.2)

    assert contrast_text(WithContrast()) == 'contrast R +0.120, G -0.050, B +0.200'


def test_api_docs_page_lists_the_json_api(client):
    page = client.get('/api/docs').text
    for path in ('/api/flakes', '/api/labels/batch', '/api/flakes/{flake_id}/release',
                 '/api/stacks/{recipe_id}/release', '/api/retrain'):
        assert path in page


def test_a_scan_is_selected_by_the_fastest_exact_filter(registry):
    store = registry[2]

    def ids(**scope):
        return sorted(f.id for f in store.iter_flakes(**scope))

    assert scan_scope(store, SCAN_ID) == {}                      # the scan saw every flake of the registry
    assert chip_scope(store, 'chip-web') == {}
    contour = [(1.9e-3, 1.9e-3), (1.91e-3, 1.9e-3), (1.9e-3, 1.91e-3)]
    store.ingest([Sighting(chip_id='chip-2', scan_id='scan-2', x=1.9e-3, y=1.9e-3, material='hbn',
                           contour=contour, area=5e-11, score=0.5)])
    assert scan_scope(store, SCAN_ID) == {'chip_id': 'chip-web'}  # its chip's only scan
    assert chip_scope(store, 'chip-web') == {'chip_id': 'chip-web'}
    store.ingest([Sighting(chip_id='chip-web', scan_id='scan-web-2', x=1.5e-3, y=1.5e-3, material='hbn',
                           contour=[(x - 4e-4, y - 4e-4) for x, y in contour], area=5e-11, score=0.5)])
    assert scan_scope(store, SCAN_ID) == {'scan_id': SCAN_ID}     # the chip was scanned again
    for scan in (SCAN_ID, 'scan-2', 'scan-web-2'):
        assert ids(**scan_scope(store, scan)) == ids(scan_id=scan)
