"""Labels from the web app retrain the cascade; the model card records how many labels it used."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from web_helpers import make_registry

from flake_registry import labelling
from flake_registry.web.app import main as flake_web


def synthetic_crop(rng: np.random.Generator, good: bool) -> np.ndarray:
    """Violet substrate; a good crop has a brighter polygon (a flake) in the middle."""
    crop = np.clip(rng.normal((120, 70, 90), 4, (80, 80, 3)), 0, 255).astype(np.uint8)
    if good:
        points = (np.array([[25, 30], [52, 22], [58, 50], [30, 58]]) + rng.integers(-4, 5, (4, 2))).astype(np.int32)
        cv2.fillPoly(crop, [points], (150, 95, 120))
    return crop


def test_retrain_from_labels_records_the_label_count(tmp_path):
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
