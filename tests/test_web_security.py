"""The web app's security suite: every probe of the hardening review, refused, over a real socket.

Traversal (raw and URL-encoded, as ``curl --path-as-is`` sends them, symbolic links, absolute
paths, registry rows pointing outside the data folder), registry files never served, reads and
writes behind the token, cross-site writes (null and missing Origin, DNS rebinding), request size
enforced while reading, failed tokens rate-limited, security headers on every answer, and
``flake-web`` refusing a mistyped registry path.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
import shutil
import socket

import cv2
import numpy as np
import pytest
from web_helpers import TEST_ORIGIN, make_registry, serve, web_app, web_client

from flake_registry.web.app import create_app, main
from flake_registry.web.security import AttemptLimiter

TOKEN = 'lab-token-0123'
SQLITE_MAGIC = b'SQLite format 3'
SECRET = b'secret outside the data folder'


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """A registry inside its data folder, a defect report, crops, symlinks out and image rows pointing out."""
    root = tmp_path_factory.mktemp('security')
    db_path, data_dir, store = make_registry(root, count=12)
    outside = root / 'outside'
    outside.mkdir()
    secret_png = outside / 'secret.png'
    cv2.imwrite(str(secret_png), np.full((8, 8, 3), 7, np.uint8))
    (outside / 'secret.txt').write_bytes(SECRET)
    report = data_dir / 'defects' / 'mote2-001'
    report.mkdir(parents=True)
    cv2.imwrite(str(report / 'overlay.png'), np.zeros((8, 8, 3), np.uint8))
    (report / 'mote2-001_report.json').write_text(json.dumps({'image_id': 'mote2-001'}))
    crops = data_dir / 'candidates'
    crops.mkdir()
    cv2.imwrite(str(crops / 'c0.png'), np.full((80, 80, 3), 90, np.uint8))
    (crops / 'registry_link.png').symlink_to(db_path)
    (crops / 'outside_link.png').symlink_to(secret_png)
    (report / 'db_link.json').symlink_to(db_path)
    shutil.copy(db_path, crops / 'copy_of_registry.png')           # a registry under an image name
    store.add_image('F0000002', 'crop', str(secret_png))           # absolute, outside
    store.add_image('F0000003', 'crop', '../outside/secret.png')   # relative, climbing out
    store.add_image('F0000004', 'crop', 'candidates/registry_link.png')
    yield db_path, data_dir, store, secret_png
    store.close()


@pytest.fixture(scope='module')
def open_server(site):
    db_path, data_dir, store, _ = site
    with serve(create_app(db_path, data_dir, store=store)) as base:
        yield base.rsplit(':', 1)[1]


@pytest.fixture(scope='module')
def token_server(site):
    db_path, data_dir, store, _ = site
    with serve(create_app(db_path, data_dir, token=TOKEN, store=store)) as base:
        yield base.rsplit(':', 1)[1]


def raw(port: str, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """One request with the path exactly as given (no normalisation, as curl --path-as-is)."""
    connection = http.client.HTTPConnection('127.0.0.1', int(port), timeout=30)
    try:
        connection.putrequest(method, path, skip_host='Host' in (headers or {}), skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            connection.putheader(key, value)
        if body is not None:
            connection.putheader('Content-Length', str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


TRAVERSALS = [
    '/defects/../files/registry.sqlite', '/defects/%2e%2e/files/registry.sqlite',
    '/defects/%2E%2E/files/registry.sqlite',
    '/defects/..%2f..%2f/files/registry.sqlite', '/defects/mote2-001/files/..%2f..%2fregistry.sqlite',
    '/defects/mote2-001/files/%2e%2e%2f%2e%2e%2fregistry.sqlite', '/defects/mote2-001/files/db_link.json',
    '/defects/mote2-001/files/%2e%2e', '/defects/%252e%252e/files/registry.sqlite',
    '/crops/../registry.sqlite', '/crops/%2e%2e/registry.sqlite', '/crops/candidates/..%2f..%2fregistry.sqlite',
    '/crops/registry.sqlite', '/crops/registry.sqlite-wal', '/crops/candidates/registry_link.png',
    '/crops/candidates/outside_link.png', '/crops/candidates/copy_of_registry.png', '/crops//etc/hostname',
    '/crops/%2fetc%2fhostname', '/crops/..%2foutside%2fsecret.png', '/crops/%2e%2e%2f%2e%2e%2foutside/secret.txt',
    '/static/../app.py', '/static/%2e%2e/app.py', '/static/..%2fapp.py', '/static/%2e%2e%2f%2e%2e%2fstore.py',
    '/scans/%2e%2e/mosaic.png', '/scans/../registry.sqlite', '/scans/..%2f..%2foutside/mosaic.png',
    '/images/0?flake_id=F0000002', '/images/0?flake_id=F0000003', '/images/0?flake_id=F0000004',
    '/flakes/F0000002/images/0.png', '/flakes/F0000003/images/0.png', '/flakes/F0000004/images/0.png',
]


@pytest.mark.parametrize('path', TRAVERSALS)
def test_traversal_and_outside_files_are_refused(open_server, token_server, path):
    for port, headers in ((open_server, {}), (token_server, {'X-Flake-Token': TOKEN})):
        status, _, body = raw(port, 'GET', path, headers)
        assert status in (400, 403, 404, 422), (path, status)
        assert SQLITE_MAGIC not in body and SECRET not in body, path
        assert b'Traceback' not in body


def test_registry_files_are_never_served_even_through_their_own_routes(site, open_server):
    db_path, data_dir, store, secret_png = site
    # The legitimate files beside them still are.
    assert raw(open_server, 'GET', '/defects/mote2-001/files/overlay.png')[0] == 200
    assert raw(open_server, 'GET', '/crops/candidates/c0.png')[0] == 200
    assert raw(open_server, 'GET', '/static/app.css')[0] == 200
    status, _, body = raw(open_server, 'GET', '/images/0?flake_id=F0000002')
    assert status == 403 and b'outside the folder' in body
    status, _, body = raw(open_server, 'GET', '/crops/candidates/copy_of_registry.png')
    assert status == 403 and b'registry file' in body


def test_with_a_token_reads_need_it_too(token_server):
    needs = ['/', '/flakes', '/api/flakes', '/flakes/F0000004', '/flakes/F0000004/thumb.png',
             '/api/chipmap?scan_id=scan-web-1', '/scans/scan-web-1/mosaic.png', '/defects',
             '/defects/mote2-001/files/overlay.png', '/crops/candidates/c0.png', '/api/stacks', '/labels', '/planner',
             '/api/docs', '/flakes/F0000004/download.zip', '/api/retrain']
    for path in needs:
        assert raw(token_server, 'GET', path)[0] == 401, path
        assert raw(token_server, 'GET', path, {'X-Flake-Token': TOKEN})[0] == 200, path
        assert raw(token_server, 'GET', path, {'Authorization': f'Bearer {TOKEN}'})[0] == 200, path
    # Nothing of the registry behind these: the login page and the app's own styles and scripts.
    for path in ('/login', '/static/app.css', '/static/chipmap.js', '/materials.css'):
        assert raw(token_server, 'GET', path)[0] == 200, path


def label_body(flake_id: str = 'F0000005') -> bytes:
    return json.dumps({'who': 'mallory', 'verdict': 'reject', 'material': 'graphene', 'layer_class': 'mono',
                       'flake_id': flake_id}).encode()


def test_cross_site_writes_and_dns_rebinding_are_refused(site, open_server):
    store = site[2]
    host = f'127.0.0.1:{open_server}'
    json_type = {'Content-Type': 'application/json'}
    refused = [
        ({}, 403),                                                             # no Origin
        ({'Origin': 'null'}, 403),                                             # sandboxed frame, data: URL
        ({'Origin': 'http://evil.example'}, 403),                              # another site
        ({'Origin': f'http://{host}', 'Sec-Fetch-Site': 'cross-site'}, 403),   # the browser says cross-site
        ({'Origin': f'ftp://{host}'}, 403),
        ({'Host': f'evil.example:{open_server}', 'Origin': f'http://evil.example:{open_server}'}, 400),  # rebinding
        ({'Host': f'localhost.evil.example:{open_server}',
          'Origin': f'http://localhost.evil.example:{open_server}'}, 400),
    ]
    for headers, expected in refused:
        status, _, body = raw(open_server, 'POST', '/api/labels', {**json_type, **headers}, label_body())
        assert status == expected, (headers, status, body)
    # A page on a rebinding name cannot read either.
    assert raw(open_server, 'GET', '/api/flakes', {'Host': f'evil.example:{open_server}'})[0] == 400
    assert store.labels('F0000005') == []
    status, _, _ = raw(open_server, 'POST', '/api/labels', {**json_type, 'Origin': f'http://{host}'}, label_body())
    assert status == 201
    assert [r['labelled_by'] for r in store.labels('F0000005')] == ['mallory']
    # Forms are writes too, and so is logging in (login CSRF).
    form = {'Content-Type': 'application/x-www-form-urlencoded'}
    assert raw(open_server, 'POST', '/flakes/F0000005/release', form, b'who=mallory')[0] == 403
    assert raw(open_server, 'POST', '/login', form, b'token=x')[0] == 403


def test_a_large_body_is_refused_before_it_is_read(open_server):
    # 60 MB declared: the answer comes after the headers alone; the body is never sent.
    with socket.create_connection(('127.0.0.1', int(open_server)), timeout=30) as connection:
        connection.sendall((f'POST /api/labels HTTP/1.1\r\nHost: 127.0.0.1:{open_server}\r\n'
                            f'Origin: http://127.0.0.1:{open_server}\r\nContent-Type: application/json\r\n'
                            f'Content-Length: {60 * 1024 * 1024}\r\n\r\n').encode())
        answer = b''
        while chunk := connection.recv(65536):   # the app closes the connection after its answer
            answer += chunk
    assert answer.startswith(b'HTTP/1.1 413'), answer[:200]
    assert b'PAYLOAD_TOO_LARGE' in answer and b'nothing of it was read' in answer


def test_a_chunked_body_is_counted_while_it_is_read(site):
    """Without a Content-Length, reading stops at the limit: of 60 MB offered, about 1 MiB is taken."""
    import asyncio

    db_path, data_dir, store, _ = site
    app = create_app(db_path, data_dir, store=store, allowed_hosts=('testserver',))
    chunk = b'x' * 65536
    offered = 60 * 1024 * 1024 // len(chunk)
    taken = 0
    sent: list[dict] = []

    async def receive():
        nonlocal taken
        taken += 1
        return {'type': 'http.request', 'body': chunk, 'more_body': taken < offered}

    async def send(message):
        sent.append(message)

    scope = {'type': 'http', 'asgi': {'version': '3.0'}, 'http_version': '1.1', 'method': 'POST', 'scheme': 'http',
             'path': '/api/labels', 'raw_path': b'/api/labels', 'query_string': b'', 'root_path': '',
             'headers': [(b'host', b'testserver'), (b'origin', TEST_ORIGIN.encode()),
                         (b'content-type', b'application/json'), (b'transfer-encoding', b'chunked')],
             'client': ('127.0.0.1', 5000), 'server': ('testserver', 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m['type'] == 'http.response.start')
    assert start['status'] == 413
    assert taken * len(chunk) <= 1024 * 1024 + len(chunk)
    assert taken < offered


def test_wrong_tokens_are_rate_limited(site):
    db_path, data_dir, store, _ = site
    now = [1000.0]
    limiter = AttemptLimiter(per_client=5, overall=30, window_s=60.0, clock=lambda: now[0])
    with web_client(web_app(db_path, data_dir, store, token=TOKEN, limiter=limiter)) as client:
        answers = [client.post('/login', data={'token': f'guess-{i}'}, follow_redirects=False).status_code
                   for i in range(200)]
        assert answers[:5] == [401] * 5 and set(answers[5:]) == {429}
        locked = client.post('/login', data={'token': TOKEN}, follow_redirects=False)
        assert locked.status_code == 429 and int(locked.headers['retry-after']) > 0   # even the right one
        assert client.get('/api/flakes', headers={'X-Flake-Token': TOKEN}).status_code == 429
        now[0] += 61.0
        assert client.post('/login', data={'token': TOKEN}, follow_redirects=False).status_code == 303
        assert client.get('/api/flakes').status_code == 200   # the session cookie
        assert TOKEN not in client.cookies.get('flake_session', '')   # the cookie holds a digest, not the token
        # Guessing through the header is counted the same way.
        headers = {'X-Flake-Token': 'wrong'}
        statuses = [client.get('/api/flakes', headers=headers).status_code for _ in range(7)]
        assert statuses[:5] == [401] * 5 and statuses[5:] == [429, 429]


def test_failures_from_many_clients_lock_everyone_for_a_while():
    now = [0.0]
    limiter = AttemptLimiter(per_client=5, overall=30, window_s=60.0, clock=lambda: now[0])
    for client in range(30):
        assert limiter.retry_after(f'10.0.0.{client}') == 0
        limiter.failed(f'10.0.0.{client}')
    assert limiter.retry_after('10.0.0.99') == pytest.approx(60.0)
    now[0] = 60.5
    assert limiter.retry_after('10.0.0.99') == 0


def test_every_answer_carries_the_security_headers(site, open_server):
    probes = [('GET', '/', None), ('GET', '/api/flakes', None), ('GET', '/flakes/F0000004/thumb.png', None),
              ('GET', '/static/app.css', None), ('GET', '/no/such/page', None), ('GET', '/crops/../x', None),
              ('POST', '/api/labels', b'{}'), ('GET', '/api/flakes', {'Host': 'evil.example'})]
    for method, path, extra in probes:
        headers = extra if isinstance(extra, dict) else {}
        status, answer, _ = raw(open_server, method, path, headers, extra if isinstance(extra, bytes) else None)
        policy = answer.get('content-security-policy', '')
        assert "frame-ancestors 'none'" in policy, (path, status, answer)
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy and "default-src 'self'" in policy
        assert answer.get('x-content-type-options') == 'nosniff' and answer.get('x-frame-options') == 'DENY', path


def test_flake_web_refuses_a_mistyped_or_foreign_database(site, tmp_path, capsys):
    db_path, data_dir, _, _ = site
    missing = tmp_path / 'regsitry.sqlite'
    with pytest.raises(SystemExit) as refused:
        main(['--db', str(missing), '--data-dir', str(data_dir)])
    assert refused.value.code == 2 and not missing.exists()
    assert 'no registry at' in capsys.readouterr().err
    text = tmp_path / 'notes.sqlite'
    text.write_text('not a database')
    with pytest.raises(SystemExit):
        main(['--db', str(text), '--data-dir', str(data_dir)])
    assert 'not an SQLite file' in capsys.readouterr().err
    import sqlite3
    other = tmp_path / 'other.sqlite'
    sqlite3.connect(other).execute('CREATE TABLE t (x)').connection.close()
    with pytest.raises(SystemExit):
        main(['--db', str(other), '--data-dir', str(data_dir)])
    assert 'not a flake registry' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['--db', str(db_path), '--data-dir', str(tmp_path / 'no-such-folder')])
    assert 'is not a folder' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.sqlite', 'other.sqlite']
    assert not Path(db_path).with_name('regsitry.sqlite').exists()


@pytest.mark.parametrize('target', ['//evil.example', '/\\evil.example', '/\t/evil.example', 'http://evil.example',
                                    'javascript:alert(1)'])
def test_redirects_stay_on_this_site(site, target):
    db_path, data_dir, store, _ = site
    with web_client(web_app(db_path, data_dir, store)) as client:
        login = client.post('/login', data={'token': 'x', 'next': target}, follow_redirects=False)
        assert login.status_code == 303 and login.headers['location'] == '/'
        label = client.post('/api/labels', json={'who': 'ada', 'verdict': 'accept', 'material': 'hbn',
                                                 'layer_class': 'few', 'flake_id': 'F0000006'}).json()['id']
        withdrawn = client.post(f'/labels/{label}/withdraw', data={'who': 'ada', 'back': target},
                                follow_redirects=False)
        assert withdrawn.status_code == 303 and withdrawn.headers['location'] == '/'
