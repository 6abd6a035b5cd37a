"""defect_analyzer_node: point-defect analysis of ADF-STEM images of 2H monolayers over ROS 2.

- service ``/defects/analyze`` (flake_msgs/srv/AnalyzeDefects): an image, or a microscope
  file (.dm3/.dm4/.emd/.ser/.tif) inside ``files_dir``, in; DefectReport out. The material
  and detector come from the request, else the file, else the node's parameters.
- topic mode: ``/stem/image_raw`` (sensor_msgs/Image, sensor-data QoS) in,
  ``/defects/report`` (flake_msgs/DefectReport) out.

The service callback only checks the request's header fields and hands the message to the
worker thread: decoding, copying and analysis happen there, so a 100 MB frame never holds
the executor. The worker is fed by a queue bounded in images and in decoded bytes; a full
queue refuses service requests with BUSY and drops the oldest topic frame.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
import queue
import threading
from typing import Any

from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.task import Future
from sensor_msgs.msg import Image, RegionOfInterest

from flake_core.materials import stem_lattice
from flake_core.node_tools import (
    ERROR,
    OK,
    PIPELINE_QOS,
    SENSOR_SUBSCRIBER_QOS,
    SERVICE_QOS,
    WARN,
    declare_parameters,
    diagnostic_status,
    diagnostics_publisher,
    publish_diagnostics,
    run_node,
)
from flake_core.ros_image import ImageConversionError, encoding_info, image_to_numpy
from flake_detector.defects.adf import detector_from
from flake_detector.defects.analyze import MAX_IMAGE_PX, DefectAnalysis, DefectAnalyzer, InvalidImageError
from flake_detector.defects.io import MICROSCOPE_SUFFIXES, ImageFileError, read_image
from flake_detector.parameters import DefectAnalyzerNodeParameters
from flake_msgs.msg import DefectCell, DefectReport
from flake_msgs.srv import AnalyzeDefects

BUSY = 'BUSY'
ANALYSIS_FAILED = 'ANALYSIS_FAILED'


class DroppedError(RuntimeError):
    """Work taken off a full queue to make room for a newer topic frame."""


def report_message(analysis: DefectAnalysis, header, image_id: str, include_cells: bool) -> DefectReport:
    value, low, high = analysis.concentrations()
    ratio = analysis.chalcogen_metal_ratio
    report = DefectReport(header=header, image_id=image_id, pixel_size=float(analysis.pixel_size),
                          analysed_area=float(analysis.analysed_area),
                          cells_total=int(analysis.analysed.sum()), class_names=list(analysis.class_names),
                          counts=[int(c) for c in analysis.counts],
                          concentration=[float(v) for v in value], concentration_low=[float(v) for v in low],
                          concentration_high=[float(v) for v in high], model_version=analysis.model_version,
                          processing_time=float(analysis.processing_time), material=analysis.material,
                          detector=analysis.detector, detector_source=analysis.detector_source,
                          lattice_constant=float(analysis.lattice_constant),
                          lattice_rotation=math.radians(analysis.lattice.rotation_deg) if analysis.lattice else 0.0,
                          chalcogen_metal_ratio=float(ratio) if math.isfinite(ratio) else 0.0,
                          sublattice_basis=analysis.sublattice.basis if analysis.sublattice else '',
                          masked_area=float(analysis.masked_area), warnings=list(analysis.warnings))
    if include_cells:
        cells = []
        analysed = analysis.analysed
        for box, centre, k, p in zip(analysis.boxes[analysed], analysis.centres[analysed],
                                     analysis.classes[analysed], analysis.probabilities[analysed]):
            x0, y0 = max(int(round(box[0])), 0), max(int(round(box[1])), 0)
            roi = RegionOfInterest(x_offset=x0, y_offset=y0, width=max(int(round(box[2])) - x0, 0),
                                   height=max(int(round(box[3])) - y0, 0))
            cells.append(DefectCell(defect_class=int(k), confidence=float(p[k]),
                                    probabilities=[float(v) for v in p], box=roi,
                                    x=float(centre[0] * analysis.pixel_size), y=float(centre[1] * analysis.pixel_size)))
        report.cells = cells
    return report


def check_image_header(msg: Image) -> str:
    """Why an Image message cannot be analysed, from its header fields alone ('' when it can)."""
    try:
        dtype, channels = encoding_info(msg.encoding)
    except (ImageConversionError, ValueError) as error:
        return str(error)
    height, width = int(msg.height), int(msg.width)
    if height == 0 or width == 0:
        return f'empty image ({width}x{height})'
    if max(height, width) > MAX_IMAGE_PX:
        return f'image is {width}x{height} px; at most {MAX_IMAGE_PX} px per side are analysed'
    if int(msg.step) < width * channels * dtype.itemsize or len(msg.data) < int(msg.step) * height:
        return f'image data ({len(msg.data)} bytes, step {msg.step}) does not hold {width}x{height} {msg.encoding}'
    return ''


def resolve_file(folder: Path, name: str) -> Path:
    """``name`` inside ``folder`` (symlinks resolved); ValueError for anything outside it or not a microscope file."""
    if not name or '\x00' in name or len(name) > 1024:
        raise ValueError('file name must be 1-1024 characters without NUL')
    base = folder.resolve()
    candidate = (base / name).resolve()
    if not candidate.is_relative_to(base) or candidate == base:
        raise ValueError(f'file {name!r} is outside the analyzer\'s files folder')
    if candidate.suffix.lower() not in MICROSCOPE_SUFFIXES:
        raise ValueError(f'file {name!r} is not a microscope file ({", ".join(sorted(MICROSCOPE_SUFFIXES))})')
    return candidate


class DefectAnalyzerNode(Node):
    def __init__(self, **kwargs):
        super().__init__('defect_analyzer_node', **kwargs)
        self.params = declare_parameters(self, DefectAnalyzerNodeParameters)
        self.analyzer = DefectAnalyzer(self.params.detector_checkpoint or None,
                                       self.params.classifier_checkpoint or None,
                                       threads=self.params.threads, alpha=self.params.alpha,
                                       beta=self.params.beta)
        self.files_dir = Path(self.params.files_dir or Path(os.environ.get('FLAKE_DATA_DIR', 'data')) / 'stem')
        self.jobs: queue.Queue = queue.Queue(maxsize=self.params.queue_size)
        self._queued_bytes = 0
        self._queue_lock = threading.Lock()
        self.processed = 0
        self.failed = 0
        self.last_error = ''
        self.last_time = 0.0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name='defect-analysis', daemon=True)
        self._worker.start()
        group = ReentrantCallbackGroup()
        self.service = self.create_service(AnalyzeDefects, 'defects/analyze', self._on_request,
                                           qos_profile=SERVICE_QOS, callback_group=group)
        self.report_pub = self.create_publisher(DefectReport, 'defects/report', PIPELINE_QOS)
        if self.params.topic_mode:
            self.image_sub = self.create_subscription(Image, 'stem/image_raw', self._on_image,
                                                      SENSOR_SUBSCRIBER_QOS, callback_group=group)
        self.diagnostics_pub = diagnostics_publisher(self)
        self.create_timer(self.params.diagnostics_period, self._publish_diagnostics)
        self.get_logger().info(f'defect analyzer ready ({self.analyzer.model_version}, {self.params.material})')

    # ------------------------------------------------------------ worker

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            load, size, done = job
            try:
                image, pixel_size, material, detector, source = load()
                analysis = self.analyzer.analyze(image, pixel_size, material, detector, source)
            except Exception as error:  # noqa: BLE001 - every failure goes back to the requester
                self.failed += 1
                self.last_error = str(error)
                done(None, error)
            else:
                self.processed += 1
                self.last_time = analysis.processing_time
                done(analysis, None)
            finally:
                with self._queue_lock:
                    self._queued_bytes -= size

    def _submit(self, load, size: int, done) -> bool:
        """Queue work whose decoded image takes ``size`` bytes; False when the queue is full."""
        with self._queue_lock:
            if self._queued_bytes + size > self.params.max_queued_megabytes * 2**20 and self._queued_bytes > 0:
                return False
            try:
                self.jobs.put_nowait((load, size, done))
            except queue.Full:
                return False
            self._queued_bytes += size
            return True

    def _material_and_detector(self, material: str, detector: str) -> tuple[str, str]:
        material = (material or self.params.material).strip().lower()
        stem_lattice(material)
        detector = (detector or '').strip()
        if detector:
            detector_from(detector)
        return material, detector

    # ------------------------------------------------------------ service

    async def _on_request(self, request, response):
        codes = AnalyzeDefects.Response
        if not math.isfinite(request.pixel_size) or request.pixel_size < 0 or (
                request.pixel_size and not (1e-13 < request.pixel_size < 1e-9)):
            return self._fail(response, codes.ERROR_INVALID_ARGUMENT,
                              f'pixel_size {request.pixel_size} m/px is outside 1e-13..1e-9 (or 0)')
        try:
            material, detector = self._material_and_detector(request.material, request.detector)
        except ValueError as error:
            return self._fail(response, codes.ERROR_INVALID_ARGUMENT, str(error))
        if request.file:
            try:
                path = resolve_file(self.files_dir, request.file)
            except ValueError as error:
                return self._fail(response, codes.ERROR_INVALID_ARGUMENT, str(error))
            load, size = self._file_loader(path, request.pixel_size, material, detector), 0
        else:
            problem = check_image_header(request.image)
            if problem:
                return self._fail(response, codes.ERROR_INVALID_IMAGE, problem)
            # Pixels are decoded and copied by the worker, not here: the executor stays free.
            load = self._message_loader(request.image, request.pixel_size or self.params.default_pixel_size,
                                        material, detector)
            size = int(request.image.height) * int(request.image.step)
        result: Future = Future(executor=self.executor)

        def done(analysis, error):
            result.set_result((analysis, error))

        if not self._submit(load, size, done):
            return self._fail(response, BUSY, 'the analysis queue is full; retry later')
        analysis, error = await result
        if error is not None:
            if isinstance(error, DroppedError):
                code = BUSY
            elif isinstance(error, (InvalidImageError, ImageFileError, ImageConversionError, FileNotFoundError)):
                code = codes.ERROR_INVALID_IMAGE
            else:
                code = ANALYSIS_FAILED
            return self._fail(response, code, str(error))
        header = request.image.header
        response.report = report_message(analysis, header, request.image_id or header.frame_id or request.file,
                                         request.include_cells)
        response.success = True
        response.message = f'{int(analysis.analysed.sum())} unit cells classified' + (
            f'; {len(analysis.warnings)} warning(s)' if analysis.warnings else '')
        return response

    @staticmethod
    def _message_loader(msg: Image, pixel_size: float, material: str, detector: str):
        def load():
            try:
                pixels = image_to_numpy(msg).copy()
            except ValueError as error:
                raise InvalidImageError(f'image message is inconsistent: {error}') from None
            return pixels, pixel_size, material, detector or None, 'request' if detector else None
        return load

    @staticmethod
    def _file_loader(path: Path, pixel_size: float, material: str, detector: str):
        def load():
            frame = read_image(path)
            if detector:
                chosen, source = detector, 'request'
            elif frame.detector is not None:
                chosen, source = frame.detector, 'file'
            else:
                chosen, source = None, None
            return frame.pixels, pixel_size or frame.pixel_size, material, chosen, source
        return load

    def _fail(self, response, code: str, message: str):
        response.success = False
        response.error_code = code
        response.message = message
        self.get_logger().warning(f'analyze request refused: {code}: {message}')
        return response

    # ------------------------------------------------------------ topic mode

    def _on_image(self, msg: Image) -> None:
        problem = check_image_header(msg)
        if problem:
            self.get_logger().warning(f'/stem/image_raw frame skipped: {problem}', throttle_duration_sec=5.0)
            return
        header = msg.header
        detector = self.params.detector

        def done(analysis, error):
            if error is not None:
                self.get_logger().warning(f'/stem/image_raw frame failed: {error}', throttle_duration_sec=5.0)
                return
            self.report_pub.publish(report_message(analysis, header, header.frame_id,
                                                   self.params.topic_include_cells))

        load = self._message_loader(msg, self.params.default_pixel_size, self.params.material, detector)
        size = int(msg.height) * int(msg.step)
        if not self._submit(load, size, done):
            try:  # keep the newest frame: drop the oldest waiting one, telling whoever waits for it
                _, dropped, dropped_done = self.jobs.get_nowait()
                with self._queue_lock:
                    self._queued_bytes -= dropped
                dropped_done(None, DroppedError('dropped from the full analysis queue for a newer frame'))
            except queue.Empty:
                pass
            self._submit(load, size, done)
            self.get_logger().warning('analysis queue full, dropped a frame', throttle_duration_sec=5.0)

    # ------------------------------------------------------------ diagnostics

    def _publish_diagnostics(self) -> None:
        level = OK if not self.failed else WARN
        if not self._worker.is_alive():
            level = ERROR
        values: dict[str, Any] = {'processed': self.processed, 'failed': self.failed,
                                  'queued': self.jobs.qsize(), 'queued_megabytes': f'{self._queued_bytes / 2**20:.1f}',
                                  'last_processing_time_s': f'{self.last_time:.3f}', 'material': self.params.material,
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
