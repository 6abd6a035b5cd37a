"""defect_analyzer_node: point-defect analysis of HAADF-STEM images over ROS 2.

- service ``/defects/analyze`` (flake_msgs/srv/AnalyzeDefects): image in, DefectReport out;
  the callback is a coroutine that awaits the worker, so the executor keeps spinning.
- topic mode: ``/stem/image_raw`` (sensor_msgs/Image, sensor-data QoS) in,
  ``/defects/report`` (flake_msgs/DefectReport) out.
Analysis runs in one worker thread fed by a bounded queue: a full queue refuses
service requests with BUSY and drops the oldest topic frame.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.task import Future
from sensor_msgs.msg import Image, RegionOfInterest

from flake_core.node_tools import (
    ERROR,
    OK,
    PIPELINE_QOS,
    SENSOR_SUBSCRIBER_QOS,
    WARN,
    declare_parameters,
    diagnostic_status,
    diagnostics_publisher,
    publish_diagnostics,
    run_node,
)
from flake_core.ros_image import ImageConversionError, image_to_numpy
from flake_detector.defects import CLASS_NAMES
from flake_detector.defects.analyze import DefectAnalysis, DefectAnalyzer, InvalidImageError
from flake_detector.parameters import DefectAnalyzerNodeParameters
from flake_msgs.msg import DefectCell, DefectReport
from flake_msgs.srv import AnalyzeDefects

BUSY = 'BUSY'

def report_message(analysis: DefectAnalysis, header, image_id: str, include_cells: bool) -> DefectReport:
    value, low, high = analysis.concentrations()
    report = DefectReport(header=header, image_id=image_id, pixel_size=float(analysis.pixel_size),
                          analysed_area=float(analysis.analysed_area),
                          cells_total=int(len(analysis.classes)), class_names=list(CLASS_NAMES),
                          counts=[int(c) for c in analysis.counts],
                          concentration=[float(v) for v in value], concentration_low=[float(v) for v in low],
                          concentration_high=[float(v) for v in high], model_version=analysis.model_version,
                          processing_time=float(analysis.processing_time))
    if include_cells:
        cells = []
        for box, k, p in zip(analysis.boxes, analysis.classes, analysis.probabilities):
            x0, y0 = max(int(round(box[0])), 0), max(int(round(box[1])), 0)
            roi = RegionOfInterest(x_offset=x0, y_offset=y0, width=max(int(round(box[2])) - x0, 0),
                                   height=max(int(round(box[3])) - y0, 0))
            cells.append(DefectCell(defect_class=int(k), confidence=float(p[k]),
                                    probabilities=[float(v) for v in p], box=roi,
                                    x=float((box[0] + box[2]) / 2 * analysis.pixel_size),
                                    y=float((box[1] + box[3]) / 2 * analysis.pixel_size)))
        report.cells = cells
    return report


class DefectAnalyzerNode(Node):
    def __init__(self, **kwargs):
        super().__init__('defect_analyzer_node', **kwargs)
        self.params = declare_parameters(self, DefectAnalyzerNodeParameters)
        self.analyzer = DefectAnalyzer(self.params.detector_checkpoint or None,
                                       self.params.classifier_checkpoint or None,
                                       threads=self.params.threads, alpha=self.params.alpha,
                                       beta=self.params.beta)
        self.jobs: queue.Queue = queue.Queue(maxsize=self.params.queue_size)
        self.processed = 0
        self.failed = 0
        self.last_error = ''
        self.last_time = 0.0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name='defect-analysis', daemon=True)
        self._worker.start()
        group = ReentrantCallbackGroup()
        self.service = self.create_service(AnalyzeDefects, 'defects/analyze', self._on_request,
                                           callback_group=group)
        self.report_pub = self.create_publisher(DefectReport, 'defects/report', PIPELINE_QOS)
        if self.params.topic_mode:
            self.image_sub = self.create_subscription(Image, 'stem/image_raw', self._on_image,
                                                      SENSOR_SUBSCRIBER_QOS, callback_group=group)
        self.diagnostics_pub = diagnostics_publisher(self)
        self.create_timer(self.params.diagnostics_period, self._publish_diagnostics)
        self.get_logger().info(f'defect analyzer ready ({self.analyzer.model_version})')

    # ------------------------------------------------------------ worker

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            image, pixel_size, done = job
            try:
                analysis = self.analyzer.analyze(image, pixel_size)
            except Exception as error:  # noqa: BLE001 - every failure goes back to the requester
                self.failed += 1
                self.last_error = str(error)
                done(None, error)
            else:
                self.processed += 1
                self.last_time = analysis.processing_time
                done(analysis, None)

    def _submit(self, image, pixel_size: float, done) -> bool:
        try:
            self.jobs.put_nowait((image, pixel_size, done))
            return True
        except queue.Full:
            return False

    # ------------------------------------------------------------ service

    async def _on_request(self, request, response):
        pixel_size = request.pixel_size or self.params.default_pixel_size
        if not (request.pixel_size >= 0) or not (1e-13 < pixel_size < 1e-9):
            return self._fail(response, AnalyzeDefects.Response.ERROR_INVALID_ARGUMENT,
                              f'pixel_size {request.pixel_size} m/px is outside 1e-13..1e-9 (or 0)')
        try:
            # Copy: the message buffer is not ours once the callback returns.
            image = image_to_numpy(request.image).copy()
        except ImageConversionError as error:
            return self._fail(response, AnalyzeDefects.Response.ERROR_INVALID_IMAGE, str(error))
        except ValueError as error:
            return self._fail(response, AnalyzeDefects.Response.ERROR_INVALID_IMAGE,
                              f'image message is inconsistent: {error}')
        result: Future = Future(executor=self.executor)

        def done(analysis, error):
            result.set_result((analysis, error))

        if not self._submit(image, pixel_size, done):
            return self._fail(response, BUSY, f'{self.jobs.maxsize} images already waiting; retry later')
        analysis, error = await result
        if error is not None:
            code = (AnalyzeDefects.Response.ERROR_INVALID_IMAGE if isinstance(error, InvalidImageError)
                    else 'ANALYSIS_FAILED')
            return self._fail(response, code, str(error))
        header = request.image.header
        response.report = report_message(analysis, header, request.image_id or header.frame_id,
                                         request.include_cells)
        response.success = True
        response.message = f'{len(analysis.classes)} unit cells classified'
        return response

    def _fail(self, response, code: str, message: str):
        response.success = False
        response.error_code = code
        response.message = message
        self.get_logger().warning(f'analyze request refused: {code}: {message}')
        return response

    # ------------------------------------------------------------ topic mode

    def _on_image(self, msg: Image) -> None:
        try:
            image = image_to_numpy(msg).copy()
        except (ImageConversionError, ValueError) as error:
            self.get_logger().warning(f'/stem/image_raw frame skipped: {error}', throttle_duration_sec=5.0)
            return
        header = msg.header

        def done(analysis, error):
            if error is not None:
                self.get_logger().warning(f'/stem/image_raw frame failed: {error}', throttle_duration_sec=5.0)
                return
            self.report_pub.publish(report_message(analysis, header, header.frame_id,
                                                   self.params.topic_include_cells))

        if not self._submit(image, self.params.default_pixel_size, done):
            try:  # keep the newest frame: drop the oldest waiting one
                self.jobs.get_nowait()
            except queue.Empty:
                pass
            self._submit(image, self.params.default_pixel_size, done)
            self.get_logger().warning('analysis queue full, dropped a frame', throttle_duration_sec=5.0)

    # ------------------------------------------------------------ diagnostics

    def _publish_diagnostics(self) -> None:
        level = OK if not self.failed else WARN
        if not self._worker.is_alive():
            level = ERROR
        values: dict[str, Any] = {'processed': self.processed, 'failed': self.failed,
                                  'queued': self.jobs.qsize(), 'last_processing_time_s': f'{self.last_time:.3f}',
                                  'model_version': self.analyzer.model_version, 'last_error': self.last_error}
        publish_diagnostics(self, self.diagnostics_pub, [diagnostic_status(
            'defect_analyzer_node: analysis', 'defect_analyzer', level,
            'worker stopped' if level == ERROR else 'running', values)])

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5.0)


def main(args=None) -> None:
    run_node(DefectAnalyzerNode, args=args)


if __name__ == '__main__':
    main()
