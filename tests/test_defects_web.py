"""The web app's defect report page shows the material and detector the analysis assumed."""

from __future__ import annotations

import json

import pytest
from web_helpers import make_registry, web_app, web_client


@pytest.fixture()
def registry(tmp_path):
    db_path, data_dir, store = make_registry(tmp_path, count=4, pictures=False)
    yield db_path, data_dir, store
    store.close()


def write_report_folder(data_dir, name: str, summary: dict) -> None:
    folder = data_dir / 'defects' / name
    folder.mkdir(parents=True)
    (folder / f'{name}_report.json').write_text(json.dumps({'image_id': name, **summary}))


def test_report_page_names_material_detector_and_warnings(registry):
    db_path, data_dir, store = registry
    # The keys flake_detector.defects.analyze.DefectAnalysis.summary writes.
    write_report_folder(data_dir, 'wse2-frame', {
        'material': 'wse2', 'material_label': 'WSe2', 'detector': 'HAADF 80-250 mrad', 'detector_source': 'file',
        'lattice_constant_m': 3.29e-10, 'lattice_constant_expected_m': 3.282e-10, 'chalcogen_metal_ratio': 0.41,
        'sublattice_basis': 'half-filled columns', 'warnings': ['sublattices assumed from the expected contrast'],
        'classes': []})
    write_report_folder(data_dir, 'old-frame', {'cells_total': 10, 'classes': []})
    with web_client(web_app(db_path, data_dir, store)) as client:
        page = client.get('/defects/wse2-frame').text
        old = client.get('/defects/old-frame').text
    assert 'id="report-material">WSe2<' in page
    assert 'id="report-detector">HAADF 80-250 mrad' in page and '(from file)' in page
    assert '0.329 nm' in page and '(expected 0.328 nm)' in page
    assert '0.41' in page and 'metal found by half-filled columns' in page
    assert 'sublattices assumed from the expected contrast' in page
    # A report without them says so rather than leaving the reader to guess.
    assert 'id="report-material">not recorded<' in old and 'id="report-detector">not recorded<' in old


def test_registry_report_list_names_material_and_detector(registry):
    db_path, data_dir, store = registry
    store.add_defect_report({'image_id': 'stem-wse2', 'material': 'wse2', 'detector': 'HAADF 80-250 mrad',
                             'detector_source': 'request', 'warnings': ['few unit cells analysed'],
                             'class_names': ['Perfect', 'V_Se'], 'counts': [99, 1], 'concentration': [1e15, 1e13]})
    store.add_defect_report({'image_id': 'stem-before', 'class_names': ['Perfect'], 'counts': [10]})
    with web_client(web_app(db_path, data_dir, store)) as client:
        listing = client.get('/defects').text
    recorded, unrecorded = listing.split('stem-wse2')[1].split('stem-before')
    assert 'class="stored-material">WSe2<' in recorded
    assert 'class="stored-detector">HAADF 80-250 mrad' in recorded and '(from request)' in recorded
    assert 'few unit cells analysed' in recorded
    # A report stored without them (or before the registry kept them) says so.
    assert 'class="stored-material">not recorded<' in unrecorded
    assert 'class="stored-detector">not recorded<' in unrecorded
