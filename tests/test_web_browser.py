"""The lab web app in a real headless chromium: filter -> flake page -> label, chip map, planner -> reserve.

Screenshots go to test-artifacts/web/. Chromium is Debian's package, installed by
tools/install_chromium.sh; without it these tests fail and say so.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
import socket
import threading
import time

import pytest
import uvicorn
from web_helpers import make_registry

from flake_registry.query import FlakeQuery
from flake_registry.web.app import create_app

CHROMIUM = Path('/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
ARTIFACTS = Path(__file__).resolve().parent.parent / 'test-artifacts' / 'web'
WAIT_MS = 20_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(app):
    """``app`` served by uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning', lifespan='off'))
    thread = threading.Thread(target=server.run, name='uvicorn', daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, 'uvicorn did not start'
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    """The app over a seeded registry."""
    db_path, data_dir, store = make_registry(tmp_path_factory.mktemp('web'), count=60)
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
    context = browser.new_context(viewport={'width': 1400, 'height': 900})
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on('pageerror', lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert errors == [], f'JavaScript errors: {errors}'


def test_filter_then_flake_page_then_label(served, page):
    base, store = served
    page.goto(f'{base}/flakes')
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
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].every(i => i.complete)")
    page.screenshot(path=str(ARTIFACTS / 'browser_filtered.png'), full_page=True)

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
    page.wait_for_function("() => document.getElementById('context-image').complete")
    page.screenshot(path=str(ARTIFACTS / 'flake_page_labelled.png'), full_page=True)
    labels = store.labels(first.id)
    assert [(r['label'], r['labelled_by']) for r in labels] == [('relabel:graphene:mono', 'ada lovelace')]


def test_chip_map_marker_opens_the_flake(served, page):
    base, store = served
    page.goto(f'{base}/')
    page.wait_for_function("() => document.querySelectorAll('#chipmap circle.marker').length === 60")
    assert page.inner_text('#chipmap-status') == '60 of 60 flakes shown'
    page.screenshot(path=str(ARTIFACTS / 'chip_map.png'))
    box_before = page.get_attribute('#chipmap', 'viewBox')
    page.hover('#chipmap')
    page.mouse.wheel(0, -400)
    page.wait_for_function(f"() => document.getElementById('chipmap').getAttribute('viewBox') !== '{box_before}'")
    width_before = float(box_before.split()[2])
    width_after = float(page.get_attribute('#chipmap', 'viewBox').split()[2])
    assert width_after < width_before  # zoomed in
    page.dblclick('#chipmap', position={'x': 5, 'y': 5})
    assert page.get_attribute('#chipmap', 'viewBox') == box_before
    flake_id = store.query(FlakeQuery(materials=('mos2',), limit=1)).flakes[0].id
    page.click(f'#chipmap circle[data-id="{flake_id}"]', force=True)
    page.wait_for_url(f'**/flakes/{flake_id}')
    assert page.inner_text('#flake-material') == 'mos2'


def test_chip_map_loads_the_visible_region_when_zoomed(tmp_path, page):
    db_path, data_dir, store = make_registry(tmp_path, count=60)
    with serve(create_app(db_path, data_dir, store=store, max_markers=12)) as base:
        page.goto(f'{base}/')
        page.wait_for_function("() => document.querySelectorAll('#chipmap circle.marker').length === 12")
        assert page.inner_text('#chipmap-status') == '12 of 60 flakes shown'
        box = page.locator('#chipmap').bounding_box()
        # The flakes lie in the mosaic's lower-left corner: zoom in there.
        page.mouse.move(box['x'] + box['width'] * 0.3, box['y'] + box['height'] * 0.9)
        for _ in range(6):
            page.mouse.wheel(0, -300)
        page.wait_for_function("() => document.getElementById('chipmap-status').textContent.includes('in view')")
        circles = page.locator('#chipmap circle.marker')
        assert 0 < circles.count() <= 12
        # Every marker now drawn lies inside the visible part of the map.
        box = page.locator('#chipmap').bounding_box()
        for i in range(circles.count()):
            centre = circles.nth(i).evaluate(
                "c => { const p = c.ownerSVGElement.createSVGPoint(); p.x = c.cx.baseVal.value;"
                " p.y = c.cy.baseVal.value; const s = p.matrixTransform(c.getScreenCTM()); return [s.x, s.y]; }")
            assert box['x'] <= centre[0] <= box['x'] + box['width']
            assert box['y'] <= centre[1] <= box['y'] + box['height']
        page.screenshot(path=str(ARTIFACTS / 'chip_map_zoomed.png'))
    store.close()


def test_planner_reserves_the_whole_stack(served, page):
    base, store = served
    page.goto(f'{base}/planner')
    chosen = []
    for material, layer in (('hbn', 'few'), ('graphene', 'mono'), ('hbn', 'few')):
        page.select_option('#search-material', material)
        page.select_option('#search-layer', layer)
        page.click('#search-button')
        page.wait_for_function(
            "(m) => { const rows = document.querySelectorAll('#candidates .row');"
            " return rows.length > 0 && [...rows].every(r => r.textContent.includes(m)); }", arg=material)
        rows = page.locator('#candidates .row')
        pick = next(rows.nth(i) for i in range(rows.count()) if rows.nth(i).get_attribute('data-flake') not in chosen)
        chosen.append(pick.get_attribute('data-flake'))
        pick.locator('button.add-layer').click()
        page.wait_for_function('(n) => document.querySelectorAll("#stack-svg polygon").length === n',
                               arg=len(chosen))
    rotation = page.locator('#stack-layers .row').nth(1).locator('input.rotation')
    rotation.fill('30')
    rotation.dispatch_event('change')
    page.wait_for_selector('#coverage tr:nth-child(4)')
    assert page.locator('#coverage tr').count() == 4  # header + one row per layer
    assert 'Area shared by every layer' in page.inner_text('#common-area')
    page.fill('#stack-name', 'hBN-G-hBN test')
    page.fill('#robot-id', 'arm-7')
    page.screenshot(path=str(ARTIFACTS / 'planner_overlay.png'), full_page=True)
    page.click('#reserve-button')
    page.wait_for_selector('#recipe-link')
    assert 'Reserved 3 flakes for arm-7' in page.inner_text('#planner-message')
    assert chosen[1] in page.inner_text('#recipes')
    page.screenshot(path=str(ARTIFACTS / 'planner_reserved.png'), full_page=True)
    live = {r['flake_id']: r['robot_id'] for r in store.reservations()}
    assert {fid: live.get(fid) for fid in chosen} == {fid: 'arm-7' for fid in chosen}

    # The same stack again: refused as a whole, with a clear message, nothing new reserved.
    page.click('#reserve-button')
    page.wait_for_selector('#planner-message.error-text')
    assert 'Nothing reserved' in page.inner_text('#planner-message')
    assert 'ALREADY_RESERVED' in page.inner_text('#planner-message')
    assert len(store.reservations()) == 3
    for fid in chosen:
        reservation = next(r for r in store.reservations() if r['flake_id'] == fid)
        store.release(fid, reservation['token'])


def test_bad_input_gets_an_error_page(served, page):
    base, _ = served
    response = page.goto(f'{base}/flakes?material=unobtainium&min_score=0.5')
    assert response.status == 422
    assert 'unknown material' in page.inner_text('#error')
    page.screenshot(path=str(ARTIFACTS / 'error_page.png'))
