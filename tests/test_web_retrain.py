"""Labels from the web app retrain the cascade; the model card records how many labels it used."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from web_helpers import make_registry, web_app, web_client

from flake_registry import labelling
from flake_registry.retrain import RetrainOptions
from flake_registry.web.app import main as flake_web


def synthetic_crop(rng: np.random.Generator, good: bool) -> np.ndarray:
    """Violet substrate; a good crop has a brighter polygon (a flake) in the middle."""
    crop = np.clip(rng.normal((120, 70, 90), 4, (80, 80, 3)), 0, 255).astype(np.uint8)
    if good:
        points = (np.array([[25, 30], [52, 22], [58, 50], [30, 58]]) + rng.integers(-4, 5, (4, 2))).astype(np.int32)
        cv2.fillPoly(crop, [points], (150, 95, 120))
    return crop


def labelled_registry(tmp_path):
    """A registry whose graphene flakes are accepted (with crops) and eight candidate crops rejected."""
    db_path, data_dir, store = make_registry(tmp_path, count=24)
    rng = np.random.default_rng(5)
    graphene = [f.id for f in store.iter_flakes() if f.material == 'graphene']
    others = [f.id for f in store.iter_flakes() if f.material != 'graphene']
    for flake_id in graphene:
        path = data_dir / 'crops' / f'{flake_id}.png'
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), synthetic_crop(rng, good=True))
        store.add_image(flake_id, 'crop', str(path.relative_to(data_dir)))
        labelling.label_flake(store, flake_id, labelling.make_label('accept', 'graphene', 'mono'), 'ada')
    for index in range(8):
        path = data_dir / 'candidates' / f'c{index}.png'
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), synthetic_crop(rng, good=False))
        labelling.label_crop(store, data_dir, f'candidates/c{index}.png',
                             labelling.make_label('reject', 'unknown', 'unknown'), 'bo')
    # Accepted flakes of another material are not examples for a graphene target.
    labelling.label_flake(store, others[0], labelling.make_label('accept', 'hbn', 'few'), 'ada')
    return db_path, data_dir, store, graphene


def test_retrain_from_labels_records_the_label_count(tmp_path):
    db_path, data_dir, store, graphene = labelled_registry(tmp_path)
    store.close()
    out = tmp_path / 'model' / 'cascade.pt'
    status = flake_web(['retrain', '--db', str(db_path), '--data-dir', str(data_dir), '--target', 'graphene-1-10L',
                        '--out', str(out), '--crops-dir', str(tmp_path / 'crops'), '--nets', '1', '--batch', '8',
                        '--max-steps', '2', '--width', '0.25', '--threads', '1', '--min-labels', '10'])
    assert status == 0
    card = json.loads(out.with_suffix('.json').read_text())
    assert card['labels']['used'] == len(graphene) + 8
    assert (card['labels']['good'], card['labels']['bad']) == (len(graphene), 8)
    assert card['labels']['labelled_by'] == ['ada', 'bo']
    assert card['data']['crops'] == [str(tmp_path / 'crops')]
    assert len(list((tmp_path / 'crops' / 'good').glob('*.png'))) == len(graphene)


def test_retrain_from_the_labelling_page(tmp_path):
    """The page's Retrain button calls flake_registry.retrain.retrain in the background and reports on it."""
    db_path, data_dir, store, graphene = labelled_registry(tmp_path)
    out = tmp_path / 'model' / 'web_cascade.pt'
    options = RetrainOptions(out=out, crops_dir=tmp_path / 'web_crops', nets=1, batch=8, max_steps=2, width=0.25)
    app = web_app(db_path, data_dir, store, retrain_options=options)
    with web_client(app) as client:
        assert client.post('/api/retrain', json={'who': 'ada', 'target': 'no-such-target'}).status_code == 422
        started = client.post('/api/retrain', json={'who': 'ada', 'target': 'graphene-1-10L'})
        assert started.status_code == 202 and started.json()['state'] == 'running'
        assert app.state.web.retrain.wait(timeout=600)
        status = client.get('/api/retrain').json()
        assert status['state'] == 'done', status
        assert status['labels_used'] == len(graphene) + 8 and status['started_by'] == 'ada'
        assert any('exported' in line for line in status['log'])
        assert 'done: trained on' in client.get('/labels').text
    card = json.loads(out.with_suffix('.json').read_text())
    assert card['labels']['used'] == len(graphene) + 8
    store.close()


def test_retrain_refuses_too_few_labels(tmp_path, capsys):
    db_path, data_dir, store = make_registry(tmp_path, count=4)
    store.close()
    status = flake_web(['retrain', '--db', str(db_path), '--data-dir', str(data_dir), '--out',
                        str(tmp_path / 'm.pt'), '--crops-dir', str(tmp_path / 'crops')])
    assert status == 2
    assert 'only 0 labelled crops' in capsys.readouterr().err
    assert not (tmp_path / 'm.pt').exists()
    with pytest.raises(SystemExit):
        flake_web(['retrain', '--db', str(tmp_path / 'missing.sqlite'), '--data-dir', str(data_dir)])


def test_candidate_crops_are_cut_and_offered_for_labelling(tmp_path):
    db_path, data_dir, store = make_registry(tmp_path, count=4)
    rng = np.random.default_rng(9)
    frame = np.clip(rng.normal((120, 70, 90), 3, (400, 600, 3)), 0, 255).astype(np.uint8)
    for x, y in ((100, 100), (300, 250), (500, 120)):
        cv2.circle(frame, (x, y), 15, (160, 110, 130), -1)
    image = tmp_path / 'frame 7.png'
    cv2.imwrite(str(image), frame)
    assert flake_web(['candidates', str(image), '--data-dir', str(data_dir), '--limit', '5']) == 0
    crops = sorted((data_dir / 'candidates' / 'frame_7').glob('*.png'))
    assert len(crops) == 5  # the finder is loose on purpose (Greplova et al. (2020)): more candidates than flakes
    assert all(cv2.imread(str(c)).shape == (80, 80, 3) for c in crops)
    with web_client(web_app(db_path, data_dir, store)) as client:
        page = client.get('/labels').text
        assert page.count('data-crop="') == len(crops)
        first = 'candidates/frame_7/c0000.png'
        reply = client.post('/labels/crop', data={'crop_path': first, 'who': 'ada', 'verdict': 'accept',
                                                  'material': 'graphene', 'layer_class': 'few'},
                            follow_redirects=False)
        assert reply.status_code == 303
        assert client.get('/labels').text.count('data-crop="') == len(crops) - 1
    assert [(r['crop_path'], r['label']) for r in store.labels()] == [(first, 'accept:graphene:few')]
    store.close()
    assert flake_web(['candidates', str(tmp_path / 'missing.png'), '--data-dir', str(data_dir)]) == 2
