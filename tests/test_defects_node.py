"""defect_analyzer_node over real rclpy: the service counts known defects; topic mode publishes reports."""

import numpy as np
import pytest
from rclpy.executors import SingleThreadedExecutor
from ros_helpers import spin_future, spin_until
from sensor_msgs.msg import Image

from flake_core.node_tools import IMAGE_PUBLISHER_QOS
from flake_core.ros_image import numpy_to_image
from flake_detector.defects.casting import match_accuracy
from flake_detector.defects.simulate import PRIMITIVE_CELL_AREA, StemSimConfig, simulate, to_uint16
from flake_detector.nodes.defect_analyzer_node import DefectAnalyzerNode
from flake_msgs.msg import DefectReport
from flake_msgs.srv import AnalyzeDefects

pytestmark = pytest.mark.ros

# A frame with a known set of defects: every class present, seed 003 dose range.
KNOWN = StemSimConfig(height=1024, width=1024, dose=(12.0, 20.0),
                      defect_probabilities=(0.0, 0.12, 0.06, 0.06, 0.04, 0.04))
KNOWN_SEED = 2024


@pytest.fixture(scope='module')
def graph(ros):
    node = DefectAnalyzerNode()
    client = ros.create_node('defects_test_client')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    executor.add_node(client)
    yield node, client, executor
    node.close()
    executor.shutdown()
    node.destroy_node()
    client.destroy_node()


def _call(graph, request, timeout=240.0):
    _, client, executor = graph
    service = client.create_client(AnalyzeDefects, '/defects/analyze')
    assert spin_until(executor, service.service_is_ready, 20.0)
    try:
        return spin_future(executor, service.call_async(request), timeout)
    finally:
        client.destroy_client(service)


def test_service_counts_known_defects(graph):
    sample = simulate(KNOWN, seed=KNOWN_SEED)
    request = AnalyzeDefects.Request(image=numpy_to_image(to_uint16(sample.image), 'mono16'),
                                     pixel_size=sample.pixel_size, image_id='known', include_cells=True)
    response = _call(graph, request)
    assert response.success, response.message
    report = response.report
    truth = sample.class_counts
    assert report.image_id == 'known' and list(report.class_names)[0] == 'Perfect'
    assert report.cells_total == len(report.cells) == sum(report.counts)
    # Every defect is found and named; only cells within a pixel of the frame edge are a matter of
    # rounding (the truth keeps boxes wholly inside), so the Perfect count may differ by one or two.
    assert list(report.counts)[1:] == truth[1:].tolist()
    assert abs(report.counts[0] - truth[0]) <= 2
    boxes = np.array([[c.box.x_offset, c.box.y_offset, c.box.x_offset + c.box.width,
                       c.box.y_offset + c.box.height] for c in report.cells], dtype=float)
    accuracy, matches = match_accuracy(boxes, sample.unit_boxes)
    assert accuracy >= 0.97
    classes = np.array([c.defect_class for c in report.cells])
    hit = matches >= 0
    assert (classes[matches[hit]] == sample.unit_classes[hit]).all()
    assert report.analysed_area == pytest.approx(report.cells_total * PRIMITIVE_CELL_AREA)
    area_cm2 = report.analysed_area * 1e4
    for k, count in enumerate(report.counts):
        assert report.concentration[k] == pytest.approx(count / area_cm2)
        assert report.concentration_low[k] <= report.concentration[k] <= report.concentration_high[k]
    cell = report.cells[0]
    assert len(cell.probabilities) == 6 and cell.confidence == pytest.approx(max(cell.probabilities))
    assert cell.x == pytest.approx((cell.box.x_offset + cell.box.width / 2) * sample.pixel_size, rel=0.05)


@pytest.mark.parametrize('make_image, pixel_size, code', [
    (lambda: Image(encoding='mono8', height=0, width=0, step=0), 0.0, 'INVALID_IMAGE'),
    (lambda: numpy_to_image(np.full((40, 40), 9, np.uint8), 'mono8'), 0.0, 'INVALID_IMAGE'),
    (lambda: Image(encoding='yuv422', height=2, width=2, step=4, data=bytes(8)), 0.0, 'INVALID_IMAGE'),
    (lambda: numpy_to_image(np.zeros((600, 600), np.uint8), 'mono8'), -1.0, 'INVALID_ARGUMENT'),
])
def test_bad_requests_get_error_codes(graph, make_image, pixel_size, code):
    response = _call(graph, AnalyzeDefects.Request(image=make_image(), pixel_size=pixel_size), timeout=60.0)
    assert not response.success
    assert response.error_code == code and response.message


def test_topic_mode_publishes_a_report(graph):
    node, client, executor = graph
    reports = []
    subscription = client.create_subscription(DefectReport, '/defects/report', reports.append, 10)
    publisher = client.create_publisher(Image, '/stem/image_raw', IMAGE_PUBLISHER_QOS)
    sample = simulate(StemSimConfig(height=768, width=768), seed=77)
    frame = numpy_to_image(to_uint16(sample.image), 'mono16')
    frame.header.frame_id = 'stem_frame_77'
    assert spin_until(executor, lambda: publisher.get_subscription_count() > 0, 20.0)
    publisher.publish(frame)
    assert spin_until(executor, lambda: len(reports) > 0, 240.0)
    report = reports[0]
    assert report.image_id == 'stem_frame_77' and not report.cells
    assert abs(report.cells_total - len(sample.unit_boxes)) <= 0.1 * len(sample.unit_boxes)
    client.destroy_subscription(subscription)
    client.destroy_publisher(publisher)
