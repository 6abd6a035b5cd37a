"""The lab web app in a real headless chromium: browse, label (one by one and from the keyboard grid),
correct and withdraw labels, release and mark used, download zips, zoom the chip map, plan and release stacks.

Screenshots of every page go to test-artifacts/web/; with FLAKE_WEB_DOC_SCREENSHOTS=1 they are also
written to docs/img/ as the pictures of docs/webapp.md. Chromium is Debian's package, installed by
tools/install_chromium.sh; without it these tests fail and say so.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
import zipfile

import cv2
import numpy as np
import pytest
from web_helpers import add_unknown_candidates, make_registry, serve, write_frames, write_mosaic

from flake_registry import labelling
from flake_registry.query import FlakeQuery
from flake_registry.web.app import create_app

CHROMIUM = Path('/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / 'test-artifacts' / 'web'
DOC_IMAGES = REPO / 'docs' / 'img'
WAIT_MS = 20_000


def shot(page, name: str, full_page: bool = True) -> None:
    """A screenshot in test-artifacts/web/, and in docs/img/ when the docs' pictures are being refreshed."""
    path = ARTIFACTS / f'{name}.png'
    page.screenshot(path=str(path), full_page=full_page)
    if os.environ.get('FLAKE_WEB_DOC_SCREENSHOTS') == '1':
        pixels = cv2.imread(str(path))
        cv2.imwrite(str(DOC_IMAGES / f'webapp_{name}.jpg'), pixels, [cv2.IMWRITE_JPEG_QUALITY, 82])


def images_loaded(page) -> None:
    """Every picture of the page decoded (lazy ones are asked for now, for full-page screenshots)."""
    page.evaluate("() => document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    """The app over a seeded registry with frames, revisits, two unknown-material candidates and a defect report."""
    db_path, data_dir, store = make_registry(tmp_path_factory.mktemp('web'), count=60)
    add_unknown_candidates(store)
    write_mosaic(data_dir, store)
    write_frames(data_dir, store, revisits=0)
    report = data_dir / 'defects' / 'mote2-001'
    report.mkdir(parents=True)
    overlay = np.full((160, 160, 3), 40, np.uint8)
    cv2.circle(overlay, (80, 80), 30, (80, 200, 255), 2)
    cv2.imwrite(str(report / 'mote2-001_overlay.png'), overlay)
    (report / 'mote2-001_report.json').write_text(json.dumps({
        'image_id': 'mote2-001', 'cells_total': 1200, 'analysed_area_nm2': 25000.0, 'pixel_size_m': 2e-11,
        'classes': [{'name': 'V_Te1', 'count': 10, 'concentration_cm2': 4.0e12, 'concentration_low_cm2': 1.9e12,
                     'concentration_high_cm2': 7.4e12}]}))
    with serve(create_app(db_path, data_dir, store=store)) as base:
        yield base, store
    store.close()


@pytest.fixture(scope='module')
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f'{CHROMIUM} is missing: run tools/install_chromium.sh (as root) to install Debian chromium '
                    'for the browser tests')
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={'width': 1400, 'height': 900}, accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on('pageerror', lambda exc: errors.append(str(exc)))
    # A Content-Security-Policy violation is reported on the console: none may happen.
    tab.on('console', lambda message: errors.append(message.text)
           if message.type == 'error' and 'Content Security Policy' in message.text else None)
    yield tab
    context.close()
    assert errors == [], f'JavaScript errors: {errors}'


def test_filter_then_flake_page_then_label(served, page):
    base, store = served
    page.goto(f'{base}/flakes')
    assert page.locator('#thin-flakes .card').first.get_attribute('data-flake')  # thin flakes lead the page
    images_loaded(page)
    shot(page, 'browser_thin_first', full_page=False)
    page.select_option('#f-material', 'hbn')
    page.check('input[name=layer_classes][value=few]')
    page.select_option('#f-sort', 'area')
    page.click('#apply-filters')
    page.wait_for_url('**/flakes?*material=hbn*')
    expected = store.query(FlakeQuery(materials=('hbn',), layer_classes=(2,), sort_by='area', limit=50))
    cards = page.locator('#gallery .card')
    assert cards.count() == len(expected.flakes) > 0
    assert [cards.nth(i).get_attribute('data-flake') for i in range(cards.count())] == [f.id for f in
                                                                                        expected.flakes]
    images_loaded(page)
    shot(page, 'browser_filtered')

    first = expected.flakes[0]
    cards.first.click()
    page.wait_for_url(f'**/flakes/{first.id}')
    assert page.inner_text('#flake-material') == 'hbn'
    assert f'{first.thickness_nm:.2f} ± {first.thickness_nm_std:.2f} nm' in page.inner_text('#flake-thickness')
    page.fill('#label-who', 'ada lovelace')
    page.select_option('#label-verdict', 'relabel')
    page.select_option('#label-material', 'graphene')
    page.select_option('#label-layer-class', 'mono')
    page.click('#label-submit')
    page.wait_for_selector('#labels-table td:has-text("ada lovelace")')
    row = page.inner_text('#labels-table')
    assert 'relabel' in row and 'graphene' in row and 'mono' in row
    labels = store.labels(first.id)
    assert [(r['label'], r['labelled_by']) for r in labels] == [('relabel:graphene:mono', 'ada lovelace')]


def test_typed_units_are_read_or_refused(served, page):
    base, store = served
    near = store.query(FlakeQuery(limit=1)).flakes[0]
    page.goto(f'{base}/flakes')
    # Millimetres typed into the micrometre fields are read as millimetres, not as 0 or as micrometres.
    page.fill('input[name=near_um]', f'{near.x * 1e3:.4f} mm, {near.y * 1e3:.4f} mm')
    page.fill('input[name=max_distance_um]', '0.002 mm')
    page.click('#apply-filters')
    page.wait_for_selector('#summary')
    assert [page.locator('#gallery .card').nth(i).get_attribute('data-flake')
            for i in range(page.locator('#gallery .card').count())] == [near.id]
    page.goto(f'{base}/flakes')
    page.fill('input[name=area_min_um2]', '1.2 kg')
    page.click('#apply-filters')
    page.wait_for_selector('#error')
    assert "'kg' in '1.2 kg' is not a unit of area" in page.inner_text('#error')


def test_release_and_mark_used_from_the_flake_page(served, page):
    base, store = served
    flake = store.query(FlakeQuery(materials=('mos2',), statuses=(1,), limit=1)).flakes[0]
    store.reserve(flake.id, 'robot-3', 3600)
    page.goto(f'{base}/flakes/{flake.id}')
    assert page.inner_text('#flake-status') == 'reserved'
    page.fill('#control-who', 'grace')
    page.click('#release-button')
    page.wait_for_selector('#done-message')
    assert 'released (was reserved by robot-3)' in page.inner_text('#done-message')
    assert page.inner_text('#flake-status') == 'available'
    assert 'released' in page.inner_text('#history-table')
    assert store.reservations(flake.id) == []
    assert [r['outcome'] for r in store.reservations(flake.id, live_only=False)] == ['released']

    page.fill('#control-who', 'grace')
    page.fill('#control-note', 'picked by hand for the test stack')
    page.click('#mark-used-button')
    page.wait_for_selector('#flake-used')
    assert page.inner_text('#flake-status') == 'used'
    used = store.get_flake(flake.id).flake
    assert used.used_by == 'web-grace'
    assert used.used_note == 'marked used in the web app by grace: picked by hand for the test stack'
    assert page.locator('#mark-used-button').count() == 0
    images_loaded(page)
    shot(page, 'flake_page_used')


def test_label_correction_and_withdrawal(served, page):
    base, store = served
    flake = store.query(FlakeQuery(materials=('wte2',), limit=1)).flakes[0]
    page.goto(f'{base}/flakes/{flake.id}')
    page.fill('#label-who', 'lise')
    page.select_option('#label-verdict', 'accept')
    page.click('#label-submit')
    page.wait_for_selector('#current-label')
    # Correct it: a newer label wins.
    page.select_option('#label-verdict', 'relabel')
    page.select_option('#label-material', 'hbn')
    page.select_option('#label-layer-class', 'few')
    page.click('#label-submit')
    page.wait_for_selector('#current-label:has-text("relabel")')
    assert 'hbn · few' in page.inner_text('#current-label')
    latest = {r['flake_id']: r['label'] for r in labelling.latest_labels(store)}
    assert latest[flake.id] == 'relabel:hbn:few'
    # Withdraw the correction: the first label counts again, and the history keeps both.
    page.locator('#labels-table tr:not(.withdrawn) .withdraw-button').last.click()
    page.wait_for_selector('#labels-table tr.withdrawn')
    assert 'withdrawn by lise' in page.inner_text('#labels-table')
    assert 'accept' in page.inner_text('#current-label')
    latest = {r['flake_id']: r['label'] for r in labelling.latest_labels(store)}
    assert latest[flake.id] == f'accept:wte2:{page.inner_text("#flake-layer-class")}'
    assert [r['label'].split(':')[0] for r in store.labels(flake.id)] == ['accept', 'relabel', 'withdrawn']
    shot(page, 'flake_page_labels')


def test_keyboard_labelling_grid_remembers_the_labeller(served, page):
    base, store = served
    page.goto(f'{base}/labels')
    page.fill('#labeller', 'marie')
    cards = page.locator('#label-grid .grid-card')
    ids = [cards.nth(i).get_attribute('data-flake') for i in range(3)]
    page.focus('#label-grid')
    page.keyboard.press('a')                       # accept the first
    page.wait_for_selector(f'.grid-card[data-flake="{ids[0]}"].labelled')
    page.keyboard.press('r')                       # reject the next
    page.wait_for_selector(f'.grid-card[data-flake="{ids[1]}"].labelled')
    page.keyboard.press('2')                       # relabel the third as few-layer
    page.wait_for_selector(f'.grid-card[data-flake="{ids[2]}"].labelled')
    verdicts = {r['flake_id']: (r['label'], r['labelled_by']) for r in labelling.latest_labels(store)}
    first = store.get_flake(ids[0]).flake
    layer_names = ('unknown', 'mono', 'few', 'thick', 'bulk')
    assert verdicts[ids[0]] == (f'accept:{first.material}:{layer_names[first.layer_class]}', 'marie')
    assert verdicts[ids[1]][0].startswith('reject:') and verdicts[ids[2]][0].endswith(':few')
    page.keyboard.press('u')                       # undo the last one
    page.wait_for_selector(f'.grid-card[data-flake="{ids[2]}"]:not(.labelled)')
    undone = page.locator(f'.grid-card[data-flake="{ids[2]}"]')
    assert undone.get_attribute('data-layer') == undone.locator('.card-layer').inner_text() != 'few'
    assert ids[2] not in {r['flake_id'] for r in labelling.latest_labels(store)}
    # Select two with the space bar, then reject both at once.
    page.keyboard.press('ArrowRight')
    page.keyboard.press(' ')
    page.keyboard.press('ArrowRight')
    page.keyboard.press(' ')
    page.keyboard.press('r')
    page.wait_for_function("() => document.getElementById('grid-message').textContent.startsWith('2 labels')")
    images_loaded(page)
    page.evaluate('() => window.scrollTo(0, 0)')
    shot(page, 'labelling_grid', full_page=False)
    # The labeller is remembered on the next visit.
    page.goto(f'{base}/labels')
    assert page.input_value('#labeller') == 'marie'
    assert ids[0] not in [page.locator('#label-grid .grid-card').nth(i).get_attribute('data-flake')
                          for i in range(3)]


def test_zip_downloads_of_a_flake_and_a_scan(served, page, tmp_path):
    base, store = served
    flake = next(f for f in store.iter_flakes() if f.layer_class == 1 and store.get_flake(f.id).images)
    page.goto(f'{base}/flakes/{flake.id}')
    images_loaded(page)
    shot(page, 'flake_page')
    with page.expect_download() as download:
        page.click('#flake-zip')
    path = tmp_path / 'flake.zip'
    download.value.save_as(path)
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        assert {'flake.json', 'outline.csv', 'outline.png', 'frame_flake.png', 'README.txt', 'revisit_0.png',
                'revisit_0_annotated.png'} <= names
        assert any(n.startswith('frame_tile') for n in names)
        record = json.loads(archive.read('flake.json'))
        assert record['id'] == flake.id and record['area_um2'] == pytest.approx(flake.area * 1e12, abs=0.01)
        assert record['outline_um'][0] == pytest.approx([v * 1e6 for v in flake.contour[0]], abs=1e-3)
        assert archive.read('outline.csv').decode().splitlines()[0] == 'x_um,y_um'
    page.goto(f'{base}/')
    with page.expect_download() as download:
        page.click('#scan-zip')
    download.value.save_as(tmp_path / 'scan.zip')
    with zipfile.ZipFile(tmp_path / 'scan.zip') as archive:
        rows = list(csv.DictReader(io.StringIO(archive.read('flakes.csv').decode())))
        assert len(rows) == store.query(FlakeQuery(scan_id='scan-web-1', limit=1)).total
        assert {'area_um2', 'x_um', 'y_um', 'thickness_nm', 'detected_local_time'} <= set(rows[0])
        assert {'mosaic_scan-web-1.png', 'mosaic_scan-web-1_annotated.png'} <= set(archive.namelist())


def test_chip_map_outlines_flakes_when_zoomed(served, page):
    base, store = served
    page.goto(f'{base}/')
    total = store.query(FlakeQuery(scan_id='scan-web-1', limit=1)).total
    page.wait_for_function(f"() => document.querySelectorAll('#chipmap circle.marker').length === {total}")
    assert page.inner_text('#chipmap-status') == f'{total} of {total} flakes shown'
    assert page.inner_text('#chipmap-scale-text').endswith(('µm', 'mm'))
    images_loaded(page)
    shot(page, 'chip_map')
    box_before = page.get_attribute('#chipmap', 'viewBox')
    box = page.locator('#chipmap').bounding_box()
    # The flakes lie in the mosaic's lower-left corner: zoom in there until they are outlined.
    page.mouse.move(box['x'] + box['width'] * 0.32, box['y'] + box['height'] * 0.88)
    for _ in range(9):
        page.mouse.wheel(0, -300)
    page.wait_for_function("() => document.getElementById('chipmap-status').textContent.includes('outlined')")
    outlined = page.locator('#chipmap .marker.outlined')
    assert outlined.count() > 0
    # Zoomed in, no marker covers its flake: every one is an outline with a transparent inside.
    assert page.evaluate("() => [...document.querySelectorAll('#chipmap .marker')]"
                         ".every(m => m.classList.contains('outlined') && m.getAttribute('fill-opacity') === '0')")
    flake_id = outlined.first.get_attribute('data-id')
    outline = store.get_flake(flake_id).flake.contour
    assert outlined.first.evaluate('m => m.tagName') == 'polygon'
    assert len(outlined.first.get_attribute('points').split()) == len(outline)
    shot(page, 'chip_map_zoomed', full_page=False)
    page.dblclick('#chipmap', position={'x': 5, 'y': 5})
    assert page.get_attribute('#chipmap', 'viewBox') == box_before
    page.wait_for_function("(n) => document.querySelectorAll('#chipmap circle.marker:not(.outlined)').length === n",
                           arg=total)
    mos2 = store.query(FlakeQuery(materials=('mos2',), limit=1)).flakes[0].id
    page.click(f'#chipmap circle[data-id="{mos2}"]', force=True)
    page.wait_for_url(f'**/flakes/{mos2}')


def test_chip_map_loads_the_visible_region_when_truncated(tmp_path, page):
    db_path, data_dir, store = make_registry(tmp_path, count=60, pictures=False)
    with serve(create_app(db_path, data_dir, store=store, max_markers=12)) as base:
        page.goto(f'{base}/')
        page.wait_for_function("() => document.querySelectorAll('#chipmap circle.marker').length === 12")
        assert page.inner_text('#chipmap-status') == '12 of 60 flakes shown'
        box = page.locator('#chipmap').bounding_box()
        page.mouse.move(box['x'] + box['width'] * 0.3, box['y'] + box['height'] * 0.9)
        page.mouse.wheel(0, -300)
        page.wait_for_function("() => document.getElementById('chipmap-status').textContent.includes('in view')")
        markers = page.locator('#chipmap .marker')
        assert 0 < markers.count() <= 12
        box = page.locator('#chipmap').bounding_box()
        for i in range(markers.count()):
            centre = markers.nth(i).evaluate(
                "c => { const b = c.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; }")
            assert box['x'] <= centre[0] <= box['x'] + box['width']
            assert box['y'] <= centre[1] <= box['y'] + box['height']
    store.close()


def test_planner_reserves_and_releases_the_whole_stack(served, page):
    base, store = served
    page.goto(f'{base}/planner')
    chosen = []
    for material, layer, thickness in (('hbn', 'few', ('1', '5 nm')), ('graphene', 'mono', ('', '')),
                                       ('hbn', 'few', ('1', '0.005 um'))):
        page.select_option('#search-material', material)
        page.select_option('#search-layer', layer)
        page.fill('#search-thickness-min', thickness[0])
        page.fill('#search-thickness-max', thickness[1])
        page.click('#search-button')
        page.wait_for_function(
            "(m) => { const rows = document.querySelectorAll('#candidates .row');"
            " return rows.length > 0 && [...rows].every(r => r.textContent.includes(m)); }", arg=material)
        rows = page.locator('#candidates .row')
        summary = page.inner_text('#search-summary')
        total, shown = int(summary.split()[0]), int(summary.split('showing ')[1].split()[0])
        assert shown == rows.count() == min(total, 30)
        if material == 'hbn':
            assert total > 10  # more than the ten results the planner used to show
        pick = next(rows.nth(i) for i in range(rows.count()) if rows.nth(i).get_attribute('data-flake') not in chosen)
        chosen.append(pick.get_attribute('data-flake'))
        pick.locator('button.add-layer').click()
        page.wait_for_function('(n) => document.querySelectorAll("#stack-svg polygon").length === n',
                               arg=len(chosen))
    # Each layer its own colour, even the two hBN layers.
    fills = [page.locator('#stack-svg polygon').nth(i).get_attribute('fill') for i in range(3)]
    assert len(set(fills)) == 3
    assert page.inner_text('#stack-scale-text').endswith(('µm', 'mm'))
    rotation = page.locator('#stack-layers .row').nth(1).locator('input.rotation')
    rotation.fill('30')
    rotation.dispatch_event('change')
    page.wait_for_selector('#coverage tr:nth-child(4)')
    assert 'Area shared by every layer' in page.inner_text('#common-area')
    page.fill('#stack-name', 'hBN-G-hBN test')
    page.fill('#robot-id', 'arm-7')
    images_loaded(page)
    shot(page, 'planner_overlay')
    page.click('#reserve-button')
    page.wait_for_selector('#recipe-link')
    assert 'Reserved 3 flakes for arm-7' in page.inner_text('#planner-message')
    live = {r['flake_id']: r['robot_id'] for r in store.reservations()}
    assert {fid: live.get(fid) for fid in chosen} == {fid: 'arm-7' for fid in chosen}
    page.click('#reserve-button')  # the same stack again: refused as a whole
    page.wait_for_selector('#planner-message.error-text')
    assert 'Nothing reserved' in page.inner_text('#planner-message')
    assert 'ALREADY_RESERVED' in page.inner_text('#planner-message')
    # Unreserve the stack from the saved recipes.
    page.goto(f'{base}/planner')
    page.fill('#recipe-who', 'grace')
    page.locator('#recipes tr', has_text='hBN-G-hBN test').locator('button.release-stack').click()
    page.wait_for_selector('#done-message')
    assert 'released 3 layer(s)' in page.inner_text('#done-message')
    assert not {r['flake_id'] for r in store.reservations()} & set(chosen)
    shot(page, 'planner_released')


def test_unknown_material_candidates_stand_apart(served, page):
    base, store = served
    unknown = store.query(FlakeQuery(materials=('unknown',), limit=10)).flakes
    assert len(unknown) == 2
    page.goto(f'{base}/flakes?material=unknown')
    cards = page.locator('#gallery .card.unknown-material')
    assert cards.count() == 2
    assert 'unknown material' in cards.first.inner_text()
    page.goto(f'{base}/flakes/{unknown[0].id}')
    assert 'colour fits no calibration' in page.inner_text('#unknown-banner')


def test_other_pages_and_errors(served, page):
    base, _ = served
    page.goto(f'{base}/defects/mote2-001')
    assert 'V_Te1' in page.inner_text('#concentrations')
    images_loaded(page)
    shot(page, 'defect_report')
    response = page.goto(f'{base}/flakes?material=unobtainium&min_score=0.5')
    assert response.status == 422
    assert 'unknown material' in page.inner_text('#error')
    shot(page, 'error_page')
    response = page.goto(f'{base}/api/docs')
    assert response.status == 200 and '/api/flakes' in page.inner_text('#api-table')
