"""detector_node: scan tiles in, flakes on the wafer out.

Subscribes ``input_topic`` (flake_msgs/ScanFrame, default /scan/tiles) and publishes
``output_topic`` (flake_msgs/FlakeArray, default /detections), both with the lossless
pipeline QoS. The backend (``contrast``, ``cascade``, or any registered with
flake_detector.detection.register_detector, e.g. ``maskrcnn``) runs in a worker
thread behind a bounded queue, so the executor only copies messages. When the queue
is full a frame is spilled to disk (serialised message in ``spill_dir``) and worked
off later, oldest first: no frame is dropped silently, and the counts are on
/diagnostics. Every flake carries wafer coordinates, the thickness estimate with its
uncertainty, the backend and the model version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import queue
import tempfile
import threading
import time

from geometry_msgs.msg import Point, Point32
import numpy as np
from rclpy.node import Node
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import RegionOfInterest

from flake_core.geometry import Affine2D
from flake_core.node_tools import (
    ERROR,
    OK,
    PIPELINE_QOS,
    WARN,
    declare_parameters,
    diagnostic_status,
    diagnostics_publisher,
    publish_diagnostics,
    run_node,
)
from flake_core.ros_image import image_to_numpy, numpy_to_image
from flake_detector.detection import make_detector, wafer_geometry
from flake_detector.parameters import DetectorNodeParameters
from flake_msgs.msg import Flake, FlakeArray, ScanFrame

# Parameters handed to the backend factory, by backend.
BACKEND_PARAMS = {
    'contrast': ('materials', 'oxide_nm', 'calibration', 'min_area_px', 'max_layers', 'work_size', 'max_elongation'),
    'cascade': ('target', 'model_path', 'cascade_threshold', 'oxide_nm', 'calibration', 'std_threshold'),
    'maskrcnn': ('model_path', 'oxide_nm', 'calibration', 'min_area_px'),
}

def backend_kwargs(params: DetectorNodeParameters) -> dict:
    """The keyword parameters of the selected backend's factory: its declared parameters, then
    ``backend_params`` over them (the factory refuses keys it does not know)."""
    kwargs = {name: getattr(params, name) for name in BACKEND_PARAMS.get(params.backend, ())}
    if 'cascade_threshold' in kwargs:
        kwargs['threshold'] = kwargs.pop('cascade_threshold')
    kwargs.update(json.loads(params.backend_params or '{}'))
    return kwargs


class DetectorNode(Node):
    def __init__(self, **kwargs):
        super().__init__('detector_node', **kwargs)
        self.params = declare_parameters(self, DetectorNodeParameters, on_change=self._on_change)
        self._lock = threading.Lock()
        self.counts = {'received': 0, 'processed': 0, 'spilled': 0, 'failed': 0, 'flakes': 0}
        self.last_seconds = 0.0
        self.last_error = ''
        self._detector = None
        self._detector_error = ''
        self._rebuild = True
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=int(self.params.queue_size))
        spill = self.params.spill_dir or os.path.join(
            os.environ.get('FLAKE_DATA_DIR') or tempfile.gettempdir(), 'detector_spill')
        self.spill_dir = Path(spill)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._spill_seq = 0
        self.publisher = self.create_publisher(FlakeArray, self.params.output_topic, PIPELINE_QOS)
        self.diagnostics = diagnostics_publisher(self)
        self.create_subscription(ScanFrame, self.params.input_topic, self._on_frame, PIPELINE_QOS)
        self.create_timer(float(self.params.diagnostics_period), self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name='detector_worker', daemon=True)
        self._worker.start()
        self.get_logger().info(f"detecting with backend {self.params.backend!r} on "
                               f"{self.params.input_topic} -> {self.params.output_topic}")

    # -- executor side: copy and hand over, never block --------------------------------------------
    def _on_frame(self, msg: ScanFrame) -> None:
        with self._lock:
            self.counts['received'] += 1
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self._spill(msg)

    def _spill(self, msg: ScanFrame) -> None:
        with self._lock:
            self._spill_seq += 1
            name = f'{time.time_ns():020d}_{self._spill_seq:08d}.cdr'
            self.counts['spilled'] += 1
        path = self.spill_dir / name
        tmp = path.with_suffix('.part')
        tmp.write_bytes(serialize_message(msg))
        tmp.replace(path)  # a crash leaves either a whole file or a .part, never half a frame
        if self.context.ok():  # after Ctrl-C (close() spills the queue) there is no rosout to log to
            self.get_logger().warn(f'detector queue full: frame spilled to {path}', throttle_duration_sec=5.0)

    def _on_change(self, changes: dict) -> None:
        if any(name in changes for name in ('backend', 'backend_params', *sum(BACKEND_PARAMS.values(), ()))):
            self._rebuild = True

    # -- worker --------------------------------------------------------------------------------------
    def _next_frame(self):
        try:
            return self._queue.get(timeout=0.1)
        except queue.Empty:
            pass
        spilled = sorted(self.spill_dir.glob('*.cdr'))
        if not spilled:
            return None
        path = spilled[0]
        try:
            msg = deserialize_message(path.read_bytes(), ScanFrame)
        except Exception as exc:  # noqa: BLE001 - a damaged file must not stop the worker
            self.get_logger().error(f'cannot read spilled frame {path}: {exc}')
            path.rename(path.with_suffix('.bad'))
            with self._lock:
                self.counts['failed'] += 1
            return None
        path.unlink()
        return msg

    def _work(self) -> None:
        while not self._stop.is_set():
            msg = self._next_frame()
            if msg is None:
                continue
            try:
                self._process(msg)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the node keeps going
                if not self.context.ok():
                    break  # Ctrl-C: the publisher is gone with the context
                with self._lock:
                    self.counts['failed'] += 1
                    self.last_error = f'{type(exc).__name__}: {exc}'
                self.get_logger().error(f'detection failed on tile {msg.tile_index} of scan '
                                        f'{msg.scan_id!r}: {self.last_error}', throttle_duration_sec=5.0)

    def _ensure_detector(self):
        if self._rebuild or self._detector is None:
            self._rebuild = False
            kwargs = backend_kwargs(self.params)
            try:
                self._detector = make_detector(self.params.backend, **kwargs)
                self._detector_error = ''
                self.get_logger().info(f"backend {self.params.backend} ready "
                                       f'(model {self._detector.model_version})')
            except Exception as exc:
                self._detector = None
                self._detector_error = f'{type(exc).__name__}: {exc}'
                raise
        return self._detector

    def _process(self, msg: ScanFrame) -> None:
        detector = self._ensure_detector()
        started = time.perf_counter()
        image = image_to_numpy(msg.image, 'bgr8')
        to_wafer = Affine2D.from_list(msg.pixel_to_wafer)
        result = detector.detect(np.ascontiguousarray(image))
        out = FlakeArray()
        out.header.stamp = msg.header.stamp
        out.header.frame_id = 'wafer'
        out.scan_id, out.tile_index = msg.scan_id, msg.tile_index
        out.candidates = int(result.candidates)
        min_score = float(self.params.min_score)
        min_area_px = self.params.min_area_um2 * 1e-12 / max(to_wafer.scale, 1e-15) ** 2
        for det in result.detections:
            if det.score < min_score or det.area_px < min_area_px:
                continue
            out.flakes.append(self._flake(msg, det, to_wafer, image.shape))
        out.processing_time = float(time.perf_counter() - started)
        self.publisher.publish(out)
        with self._lock:
            self.counts['processed'] += 1
            self.counts['flakes'] += len(out.flakes)
            self.last_seconds = out.processing_time

    @staticmethod
    def _flake(msg: ScanFrame, det, to_wafer: Affine2D, shape) -> Flake:
        geometry = wafer_geometry(det, to_wafer, shape[:2])
        flake = Flake()
        flake.header.stamp = msg.header.stamp
        flake.header.frame_id = 'wafer'
        flake.scan_id, flake.chip_id, flake.tile_index = msg.scan_id, msg.chip_id, msg.tile_index
        flake.material = det.material
        flake.layer_class = int(det.layer_class)
        flake.layers, flake.layers_std = float(det.layers), float(det.layers_std)
        flake.thickness_nm, flake.thickness_nm_std = float(det.thickness_nm), float(det.thickness_nm_std)
        flake.score = float(det.score)
        flake.detector, flake.model_version = det.detector, det.model_version
        x, y, w, h = det.bbox
        flake.bbox = RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h)
        flake.centre = Point(x=geometry.centre[0], y=geometry.centre[1], z=0.0)
        flake.contour.points = [Point32(x=float(px), y=float(py), z=0.0) for px, py in geometry.contour]
        flake.area = geometry.area_m2
        flake.mask = numpy_to_image(np.where(det.mask, 255, 0).astype(np.uint8), 'mono8')
        flake.homogeneity = _finite(det.homogeneity)
        flake.isolation_distance = geometry.isolation_m
        flake.edge_straightness = _finite(det.edge_straightness)
        flake.status = Flake.STATUS_CANDIDATE
        return flake

    # -- diagnostics -----------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        with self._lock:
            counts = dict(self.counts)
            last, error = self.last_seconds, self.last_error
        pending_spill = len(list(self.spill_dir.glob('*.cdr')))
        values = {**counts, 'queued': self._queue.qsize(), 'pending_spill': pending_spill,
                  'backend': self.params.backend, 'last_frame_s': f'{last:.3f}',
                  'model_version': getattr(self._detector, 'model_version', ''), 'last_error': error}
        if self._detector_error:
            level, message = ERROR, f'backend unavailable: {self._detector_error}'
        elif counts['failed']:
            level, message = WARN, f"{counts['failed']} frames failed: {error}"
        elif pending_spill:
            level, message = WARN, f'falling behind: {pending_spill} frames spilled to disk'
        else:
            level, message = OK, 'detecting'
        publish_diagnostics(self, self.diagnostics, [
            diagnostic_status('detector_node: detector', 'detector', level, message, values)])

    def close(self) -> None:
        """Stop the worker; frames still queued are spilled so nothing is lost."""
        self._stop.set()
        self._worker.join(timeout=30.0)
        while True:
            try:
                self._spill(self._queue.get_nowait())
            except queue.Empty:
                break


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.0


def main(args=None) -> None:
    run_node(DetectorNode, args=args)


if __name__ == '__main__':
    main()
