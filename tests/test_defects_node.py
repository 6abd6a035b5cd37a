"""defect_analyzer_node over real rclpy: the service counts known defects of any 2H material, reads
microscope files from its folder only, decodes images off the executor; topic mode publishes reports."""

import threading

import numpy as np
import pytest
from rclpy.executors import SingleThreadedExecutor
from ros_helpers import spin_future, spin_until
from sensor_msgs.msg import Image

from flake_core.materials import stem_lattice
from flake_core.node_tools import IMAGE_PUBLISHER_QOS
from flake_core.ros_image import numpy_to_image
from flake_detector.defects import class_names
from flake_detector.defects.adf import AdfDetector
from flake_detector.defects.io import write_image
from flake_detector.defects.simulate import StemSimConfig, simulate, to_uint16
from flake_detector.nodes import defect_analyzer_node
from flake_detector.nodes.defect_analyzer_node import DefectAnalyzerNode
from flake_msgs.msg import DefectReport
from flake_msgs.srv import AnalyzeDefects

pytestmark = pytest.mark.ros

LATTICE_PX = 12.0
# A WSe2 frame with every class present, turned, at a pixel size of a real microscope; a dose at which the
# shipped networks read cells reliably (the bench measures accuracy across doses; this tests the node).
KNOWN = StemSimConfig(material='wse2', height=384, width=384, pixel_size=3.282e-10 / LATTICE_PX, dose=(80.0, 80.0),
                      rotation_deg=(-12.0, -12.0), detector_inner_mrad=(80.0, 80.0),
                      defect_probabilities=(0.0, 0.08, 0.04, 0.04, 0.02, 0.02))


@pytest.fixture(scope='module')
def graph(ros, tmp_path_factory):
    folder = tmp_path_factory.mktemp('stem_files')
    from rclpy.parameter import Parameter
    node = DefectAnalyzerNode(parameter_overrides=[Parameter('files_dir', value=str(folder)),
                                                   Parameter('material', value='mote2')])
    client = ros.create_node('defects_test_client')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    executor.add_node(client)
    yield node, client, executor, folder
    node.close()
    executor.shutdown()
    node.destroy_node()
    client.destroy_node()


def _call(graph, request, timeout=300.0):
    _, client, executor, _ = graph
    service = client.create_client(AnalyzeDefects, '/defects/analyze')
    assert spin_until(executor, service.service_is_ready, 20.0)
    try:
        return spin_future(executor, service.call_async(request), timeout)
    finally:
        client.destroy_client(service)


def test_service_counts_known_defects_of_wse2_and_says_what_it_assumed(graph, monkeypatch):
    sample = simulate(KNOWN, seed=2024)
    threads = []
    real = defect_analyzer_node.image_to_numpy
    monkeypatch.setattr(defect_analyzer_node, 'image_to_numpy',
                        lambda msg: threads.append(threading.current_thread().name) or real(msg))
    request = AnalyzeDefects.Request(image=numpy_to_image(to_uint16(sample.image), 'mono16'),
                                     pixel_size=sample.pixel_size, image_id='known', include_cells=True,
                                     material='WSe2', detector='haadf')
    response = _call(graph, request)
    assert response.success, response.message
    # The image was decoded by the analysis worker, not on the executor that serves the callbacks.
    assert threads == ['defect-analysis']
    report = response.report
    assert report.image_id == 'known' and list(report.class_names) == list(class_names('wse2'))
    assert report.material == 'wse2' and report.detector == 'HAADF 80-250 mrad'
    assert report.detector_source == 'request' and report.sublattice_basis == 'contrast'
    assert report.lattice_constant == pytest.approx(3.282e-10, rel=0.02)
    assert np.degrees(report.lattice_rotation) == pytest.approx(-12.0, abs=0.5)
    assert report.chalcogen_metal_ratio == pytest.approx(sample.params['chalcogen_metal_ratio'], rel=0.1)
    assert report.cells_total == len(report.cells) == sum(report.counts)
    truth = sample.class_counts
    assert abs(report.cells_total - len(sample.unit_classes)) <= 0.08 * len(sample.unit_classes)
    # Defects found in about their true numbers (cells at the frame edge are a matter of rounding).
    assert abs(sum(report.counts[1:]) - truth[1:].sum()) <= 0.15 * truth[1:].sum() + 2
    cell_area = stem_lattice('wse2').primitive_cell_area
    assert report.analysed_area == pytest.approx(report.cells_total * cell_area)
    area_cm2 = report.analysed_area * 1e4
    for k, count in enumerate(report.counts):
        assert report.concentration[k] == pytest.approx(count / area_cm2)
        assert report.concentration_low[k] <= report.concentration[k] <= report.concentration_high[k]
    cell = report.cells[0]
    assert len(cell.probabilities) == 6 and cell.confidence == pytest.approx(max(cell.probabilities))


def test_service_reads_a_microscope_file_from_its_folder_only(graph):
    _, _, _, folder = graph
    sample = simulate(KNOWN, seed=7)
    write_image(folder / 'frame.emd', to_uint16(sample.image), sample.pixel_size,
                detector=AdfDetector(70.0, 200.0, 'HAADF'))
    response = _call(graph, AnalyzeDefects.Request(file='frame.emd', material='wse2'))
    assert response.success, response.message
    assert response.report.detector == 'HAADF 70-200 mrad' and response.report.detector_source == 'file'
    assert response.report.pixel_size == pytest.approx(sample.pixel_size, rel=1e-5)
    assert response.report.image_id == 'frame.emd' and response.report.cells_total > 500
    for name in ('../frame.emd', '/etc/passwd', 'frame.txt'):
        refused = _call(graph, AnalyzeDefects.Request(file=name), timeout=60.0)
        assert not refused.success and refused.error_code == 'INVALID_ARGUMENT'
    missing = _call(graph, AnalyzeDefects.Request(file='missing.dm4'), timeout=60.0)
    assert not missing.success and missing.error_code == 'INVALID_IMAGE' and 'no such image file' in missing.message


@pytest.mark.parametrize('make_image, pixel_size, material, code', [
    (lambda: Image(encoding='mono8', height=0, width=0, step=0), 0.0, '', 'INVALID_IMAGE'),
    (lambda: numpy_to_image(np.full((40, 40), 9, np.uint8), 'mono8'), 0.0, '', 'INVALID_IMAGE'),
    (lambda: Image(encoding='yuv422', height=2, width=2, step=4, data=bytes(8)), 0.0, '', 'INVALID_IMAGE'),
    (lambda: Image(encoding='mono16', height=9000, width=10, step=20, data=bytes(8)), 0.0, '', 'INVALID_IMAGE'),
    (lambda: numpy_to_image(np.zeros((600, 600), np.uint8), 'mono8'), -1.0, '', 'INVALID_ARGUMENT'),
    (lambda: numpy_to_image(np.zeros((600, 600), np.uint8), 'mono8'), 0.0, 'graphene', 'INVALID_ARGUMENT'),
])
def test_bad_requests_get_error_codes(graph, make_image, pixel_size, material, code):
    response = _call(graph, AnalyzeDefects.Request(image=make_image(), pixel_size=pixel_size, material=material),
                     timeout=60.0)
    assert not response.success
    assert response.error_code == code and response.message


def test_topic_mode_publishes_a_report_with_the_default_material(graph):
    node, client, executor, _ = graph
    reports = []
    subscription = client.create_subscription(DefectReport, '/defects/report', reports.append, 10)
    publisher = client.create_publisher(Image, '/stem/image_raw', IMAGE_PUBLISHER_QOS)
    sample = simulate(StemSimConfig(height=768, width=768), seed=77)   # MoTe2 at the default pixel size
    frame = numpy_to_image(to_uint16(sample.image), 'mono16')
    frame.header.frame_id = 'stem_frame_77'
    assert spin_until(executor, lambda: publisher.get_subscription_count() > 0, 20.0)
    publisher.publish(frame)
    assert spin_until(executor, lambda: len(reports) > 0, 300.0)
    report = reports[0]
    assert report.image_id == 'stem_frame_77' and not report.cells and report.material == 'mote2'
    assert report.detector_source == 'default'
    assert abs(report.cells_total - len(sample.unit_boxes)) <= 0.15 * len(sample.unit_boxes)
    client.destroy_subscription(subscription)
    client.destroy_publisher(publisher)
