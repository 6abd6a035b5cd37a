"""Property-based tests of every form and JSON body the web app accepts (hypothesis, derandomised).

Whatever is typed or sent, the app answers with a result or a 4xx that names the problem with
one of the registry's codes, never a 500 or a traceback; a refused write changes nothing; what
it accepts is what it was asked for (units converted, filters obeyed, crops only from the data
folder, stacks reserved whole or not at all).
"""

from __future__ import annotations

import math
import string
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest
from web_helpers import make_registry, web_app, web_client

from flake_core.materials import MATERIAL_NAMES
from flake_core.units import AREA, LENGTH, THICKNESS, UnitError, parse_point, parse_quantity
from flake_registry import labelling
from flake_registry.query import LAYER_NAMES, STATUS_NAMES, FlakeQuery, RegistryError
from flake_registry.retrain import RetrainOptions

CODES = {'INVALID_ARGUMENT', 'INVALID_RANGE', 'UNKNOWN_ID', 'ALREADY_RESERVED', 'ALREADY_USED', 'NOT_RESERVED',
         'WRONG_TOKEN', 'LEASE_EXPIRED', 'FORBIDDEN', 'BUSY', 'UNAUTHORISED', 'TOO_MANY_ATTEMPTS',
         'PAYLOAD_TOO_LARGE', 'METHOD_NOT_ALLOWED', 'NOT_FOUND', 'BAD_REQUEST'}
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Text a person might type, or an attacker send: numbers, units, separators, paths, markup, control characters.
PIECES = ['', '0', '1', '-1', '0.5', '1e3', '1e309', 'nan', 'inf', '12.5', ' ', ',', ';', 'mm', 'um', 'µm', 'nm', 'm',
          'kg', 'um2', 'mm^2', 'µm²', '..', '/', '%2e', '\\', '<script>', "'", '"', '\x00', 'é', 'hbn', 'graphene',
          'mono', 'few', 'F0000001', 'candidates/c0.png', '../../etc/passwd', '/etc/hostname']
typed = st.lists(st.sampled_from(PIECES), max_size=4).map(''.join) | st.text(max_size=12)
FILTER_KEYS = ['material', 'materials', 'layer_classes', 'statuses', 'layers_min', 'layers_max', 'thickness_nm_min',
               'thickness_nm_max', 'area_min_um2', 'area_max_um2', 'min_score', 'min_homogeneity', 'chip_id',
               'scan_id', 'near_um', 'max_distance_um', 'sort_by', 'ascending', 'limit', 'page', 'colour']
known_flake = st.sampled_from([f'F{i:07d}' for i in range(1, 13)])
flake_ids = known_flake | typed
names = st.sampled_from(['ada', 'grace hopper', 'lab-3', 'a@b.c']) | typed


@pytest.fixture(scope='module')
def app_parts(tmp_path_factory):
    db_path, data_dir, store = make_registry(tmp_path_factory.mktemp('forms'), count=12)
    crops = data_dir / 'candidates'
    crops.mkdir()
    import cv2
    import numpy as np
    cv2.imwrite(str(crops / 'c0.png'), np.full((80, 80, 3), 90, np.uint8))
    app = web_app(db_path, data_dir, store, retrain_options=RetrainOptions(min_labels=10 ** 9))
    with web_client(app) as client:
        yield client, store, data_dir
    store.close()


def clean(response, allowed: set[int]) -> dict | None:
    """The answer is one of ``allowed``; a JSON error carries a known code; never a traceback."""
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    assert response.status_code < 500 and 'Traceback' not in response.text
    if response.status_code >= 400 and response.headers.get('content-type', '').startswith('application/json'):
        assert response.json()['error']['code'] in CODES
    return response.json() if response.headers.get('content-type', '').startswith('application/json') else None


# -- typed units --------------------------------------------------------------------------------------


@SETTINGS
@given(value=st.floats(min_value=0, max_value=1e6, allow_nan=False),
       unit=st.sampled_from([('nm', 1e-3), ('um', 1.0), ('µm', 1.0), ('mm', 1e3), ('', 1.0), (' mm', 1e3)]))
def test_lengths_typed_with_a_unit_are_read_in_micrometres(value, unit):
    text = f'{value!r}{unit[0]}'
    assert parse_quantity(text, LENGTH, 'near') == pytest.approx(value * unit[1], rel=1e-12)


@SETTINGS
@given(text=typed)
def test_any_typed_quantity_is_read_or_refused_by_name(text):
    for kind in (LENGTH, AREA, THICKNESS):
        try:
            value = parse_quantity(text, kind, 'the field')
        except UnitError as refused:
            assert refused.field == 'the field' and refused.message.startswith('the field: ')
            continue
        assert value is None or math.isfinite(value)
        if value is None:
            assert not text.strip()
    try:
        point = parse_point(text, 'near')
    except UnitError as refused:
        assert refused.field == 'near'
    else:
        assert point is None or len(point) == 2


# -- the flake browser's filters --------------------------------------------------------------------


@SETTINGS
@given(params=st.dictionaries(st.sampled_from(FILTER_KEYS), typed, max_size=5))
def test_browser_filters_answer_or_refuse(app_parts, params):
    client, _, _ = app_parts
    body = clean(client.get('/api/flakes', params=params), {200, 422})
    clean(client.get('/flakes', params=params), {200, 422})
    if body is not None and 'flakes' in body:
        material = (params.get('material') or '').strip().lower()
        if material:
            assert all(f['material'] == material for f in body['flakes'])


@SETTINGS
@given(low=st.floats(min_value=0, max_value=2000, allow_nan=False), high=st.floats(min_value=0, max_value=2000),
       unit=st.sampled_from([('', 1.0), ('um2', 1.0), ('mm2', 1e6), ('nm^2', 1e-6)]))
def test_area_filters_in_any_unit_match_the_registry(app_parts, low, high, unit):
    client, store, _ = app_parts
    response = client.get('/api/flakes', params={'area_min_um2': f'{low}{unit[0]}', 'area_max_um2': f'{high}{unit[0]}',
                                                 'limit': '1000'})
    if low > high:
        assert response.status_code == 422 and response.json()['error']['code'] == 'INVALID_RANGE'
        assert 'µm²' in response.json()['error']['message']   # in the unit the person typed, not m²
        return
    expected = store.query(FlakeQuery(area_min=low * unit[1] * 1e-12, area_max=high * unit[1] * 1e-12, limit=1000))
    assert [f['id'] for f in clean(response, {200})['flakes']] == [f.id for f in expected.flakes]


# -- labels ------------------------------------------------------------------------------------------


@SETTINGS
@given(flake_id=flake_ids, who=names, verdict=st.sampled_from(['accept', 'reject', 'relabel']) | typed,
       material=st.sampled_from(MATERIAL_NAMES) | typed, layer=st.sampled_from(LAYER_NAMES) | typed)
def test_label_forms_store_exactly_what_was_valid(app_parts, flake_id, who, verdict, material, layer):
    client, store, _ = app_parts
    before = len(store.labels())
    fields = {'who': who, 'verdict': verdict, 'material': material, 'layer_class': layer}
    form = client.post(f'/flakes/{quote(flake_id, safe="")}/labels', data=fields, follow_redirects=False)
    clean(form, {303, 404, 405, 422})
    api = client.post('/api/labels', json={'who': who, 'verdict': verdict, 'material': material,
                                           'layer_class': layer, 'flake_id': flake_id})
    clean(api, {201, 404, 422})
    stored = store.labels()[before:]
    assert len(stored) == (form.status_code == 303) + (api.status_code == 201)
    for row in stored:
        assert row['flake_id'] == flake_id and labelling.decode_label(row['label']) is not None


@SETTINGS
@given(crop_path=st.sampled_from(['candidates/c0.png', '../registry.sqlite', 'candidates/../registry.sqlite',
                                  'registry.sqlite', '/etc/hostname', 'candidates/%2e%2e/x.png']) | typed,
       who=names)
def test_crop_labels_only_name_crops_inside_the_data_folder(app_parts, crop_path, who):
    client, store, data_dir = app_parts
    before = len(store.labels())
    clean(client.post('/labels/crop', data={'crop_path': crop_path, 'who': who, 'verdict': 'reject'},
                      follow_redirects=False), {303, 403, 404, 422})
    clean(client.post('/api/labels/batch', json={'who': who, 'items': [
        {'verdict': 'reject', 'material': 'unknown', 'layer_class': 'unknown', 'crop_path': crop_path}]}),
        {201, 403, 404, 422})
    for row in store.labels()[before:]:
        assert row['crop_path'] == 'candidates/c0.png'


@SETTINGS
@given(items=st.lists(st.fixed_dictionaries({
    'verdict': st.sampled_from(['accept', 'reject', 'maybe']), 'material': st.sampled_from(['hbn', 'graphene', 'x']),
    'layer_class': st.sampled_from(['mono', 'few', 7, 'thin']), 'flake_id': flake_ids}), min_size=1, max_size=6))
def test_a_label_batch_is_stored_whole_or_not_at_all(app_parts, items):
    client, store, _ = app_parts
    before = len(store.labels())
    answer = clean(client.post('/api/labels/batch', json={'who': 'ada', 'items': items}), {201, 404, 422})
    added = len(store.labels()) - before
    assert added == (len(items) if answer and 'ids' in answer else 0)


@SETTINGS
@given(label_id=st.integers(min_value=-5, max_value=10 ** 12) | st.sampled_from([1, 2, 3]), who=names)
def test_withdrawing_labels_answers_or_refuses(app_parts, label_id, who):
    client, _, _ = app_parts
    clean(client.post(f'/api/labels/{label_id}/withdraw', json={'who': who}), {200, 404, 422})
    clean(client.post(f'/labels/{label_id}/withdraw', data={'who': who}, follow_redirects=False), {303, 404, 422})


# -- control, stacks, chip map, log-in, retraining ---------------------------------------------------------


@SETTINGS
@given(flake_id=flake_ids, who=names, note=typed, reserve_first=st.booleans())
def test_release_and_mark_used_go_through_the_registry_checks(app_parts, flake_id, who, note, reserve_first):
    client, store, _ = app_parts
    if reserve_first and flake_id.startswith('F000000'):
        try:
            store.reserve(flake_id, 'robot-p', 60)
        except RegistryError:
            pass
    segment = quote(flake_id, safe='')
    clean(client.post(f'/api/flakes/{segment}/release', json={'who': who}), {200, 404, 409, 422})
    clean(client.post(f'/flakes/{segment}/mark-used', data={'who': who, 'note': note}, follow_redirects=False),
          {303, 404, 405, 409, 422})
    for row in store.reservations():
        assert row['robot_id'] in ('robot-p', 'arm-p')  # nothing left reserved by the web app itself


layer = st.fixed_dictionaries({'flake_id': flake_ids},
                              optional={'rotation_deg': st.floats(allow_nan=False, allow_infinity=False) | typed,
                                        'offset_x_um': st.floats(min_value=-5000, max_value=5000)})


@SETTINGS
@given(layers=st.lists(layer, max_size=14), name=typed | st.just('stack'), robot=names | st.just('arm-p'),
       lease=st.floats(min_value=-10, max_value=1e7) | typed)
def test_stacks_are_reserved_whole_or_not_at_all(app_parts, layers, name, robot, lease):
    client, store, _ = app_parts
    clean(client.post('/api/stacks/preview', json={'layers': layers}), {200, 404, 422})
    before = {r['flake_id'] for r in store.reservations()}
    response = client.post('/api/stacks', json={'name': name, 'robot_id': robot, 'lease_s': lease, 'layers': layers})
    body = clean(response, {201, 404, 409, 422})
    after = {r['flake_id'] for r in store.reservations()}
    if response.status_code == 201:
        assert after - before == {entry['flake_id'] for entry in body['layers']}
        for entry in body['layers']:
            store.release(entry['flake_id'], entry['token'])
    else:
        assert after == before


@SETTINGS
@given(scan_id=st.sampled_from(['scan-web-1']) | typed, region=typed | st.just('0,0,1e-3,1e-3'),
       outlines=st.sampled_from(['true', 'false', 'x', '']))
def test_chip_map_requests_answer_or_refuse(app_parts, scan_id, region, outlines):
    client, _, _ = app_parts
    clean(client.get('/api/chipmap', params={'scan_id': scan_id, 'region': region, 'outlines': outlines}),
          {200, 404, 422})
    clean(client.get('/', params={'scan_id': scan_id}), {200, 404, 422})


@SETTINGS
@given(token=typed, target=st.text(alphabet=string.ascii_letters + '-_', max_size=20), who=names)
def test_login_and_retraining_forms_answer_or_refuse(app_parts, token, target, who):
    client, _, _ = app_parts
    clean(client.post('/login', data={'token': token}, follow_redirects=False), {303, 422})
    clean(client.post('/api/retrain', json={'who': who, 'target': target}), {202, 409, 422})
    clean(client.get('/api/retrain'), {200})


@SETTINGS
@given(status=st.sampled_from(STATUS_NAMES) | typed, page=typed)
def test_paging_and_status_filters(app_parts, status, page):
    client, _, _ = app_parts
    clean(client.get('/flakes', params={'statuses': status, 'page': page}), {200, 422})
