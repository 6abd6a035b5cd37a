"""registry_node: the flake registry on the ROS graph.

Subscribes /detections (FlakeArray) and ingests batches in a worker thread fed by
a bounded queue; serves the assembly robot (query, get, reserve, release, mark
used) and the scan coordinator (revisit list, add image); publishes every change
on /registry/events and its health on /diagnostics. All logic lives in
flake_registry.store; this module converts messages and wires callbacks.
"""

from __future__ import annotations

import gc
import json
import math
import os
from pathlib import Path
import queue
import re
import threading
import time

import cv2
from rclpy.node import Node

from flake_core.node_tools import (
    ERROR,
    OK,
    PIPELINE_QOS,
    SERVICE_QOS,
    WARN,
    declare_parameters,
    diagnostic_status,
    diagnostics_publisher,
    freeze_long_lived_objects,
    publish_diagnostics,
    run_node,
)
from flake_core.ros_image import image_to_numpy
from flake_msgs.msg import FlakeArray, RegistryEvent
from flake_msgs.srv import (
    AddFlakeImage,
    GetFlake,
    GetRevisitList,
    MarkFlakeUsed,
    QueryFlakes,
    ReleaseFlake,
    ReserveFlake,
)
from flake_registry.nodes.conversions import (
    FlakeMessageCache,
    detection_from_msg,
    flake_to_msg,
    from_time,
    image_to_msg,
    observation_to_msg,
    query_from_request,
    to_time,
)
from flake_registry.nodes.frame_records import add_frame_recorder
from flake_registry.nodes.request_limits import (
    INVALID_IMAGE,
    answer_request,
    check_image_size,
    confine_path,
)
from flake_registry.nodes.stack_recipe_service import add_stack_recipe_service
from flake_registry.nodes.wafer_frame_service import add_wafer_frame_services
from flake_registry.parameters import RegistryNodeParameters
from flake_registry.query import INVALID_ARGUMENT, RegistryError
from flake_registry.revisit import RevisitPolicy
from flake_registry.store import IMAGE_ROLES, FlakeStore, default_database_path

_SAFE_NAME = re.compile(r'[^A-Za-z0-9_.-]+')


class RegistryNode(Node):
    def __init__(self, **kwargs):
        super().__init__('registry_node', **kwargs)
        self.params = declare_parameters(self, RegistryNodeParameters, on_change=self._on_params)
        path = Path(self.params.database_path or default_database_path())
        self.store = FlakeStore(self.params.database_url or path, synchronous=self.params.synchronous,
                                ingest_synchronous=self.params.ingest_synchronous,
                                default_lease_s=min(self.params.default_lease, self.params.max_lease),
                                max_lease_s=self.params.max_lease, merge_distance=self.params.merge_distance,
                                merge_iou=self.params.merge_iou)
        self.messages = FlakeMessageCache(self.params.message_cache_size)
        self.image_dir = Path(self.params.image_dir or path.parent / 'images')
        # Image paths a caller names must lie in the data folder (or the image folder).
        self.data_dir = path.parent
        self.get_logger().info(f'registry {self.store.url} (schema {self.store.schema_version}, '
                               f'{self.store.count()} flakes)')

        self._queue: queue.Queue[FlakeArray | None] = queue.Queue(maxsize=self.params.ingest_queue_size)
        self._stats_lock = threading.Lock()
        self.stats = {'batches_received': 0, 'batches_stored': 0, 'batches_dropped': 0, 'batches_failed': 0,
                      'detections_stored': 0, 'detections_refused': 0, 'new_flakes': 0}
        self._last_error = ''

        self.events = self.create_publisher(RegistryEvent, 'registry/events', PIPELINE_QOS)
        self.create_subscription(FlakeArray, 'detections', self._on_detections, PIPELINE_QOS)
        for srv_type, name, callback in (
                (QueryFlakes, 'query_flakes', self._query_flakes), (GetFlake, 'get_flake', self._get_flake),
                (ReserveFlake, 'reserve_flake', self._reserve_flake),
                (ReleaseFlake, 'release_flake', self._release_flake),
                (MarkFlakeUsed, 'mark_flake_used', self._mark_flake_used),
                (GetRevisitList, 'get_revisit_list', self._get_revisit_list),
                (AddFlakeImage, 'add_flake_image', self._add_flake_image)):
            self.create_service(srv_type, f'registry/{name}', callback, qos_profile=SERVICE_QOS)
        # Stack recipes planned in the lab web app, for the assembly robot (flake_registry.stacks).
        add_stack_recipe_service(self, self.store)
        # Chip wafer frames for every scan coordinator (SaveWaferFrame, GetWaferFrames).
        add_wafer_frame_services(self, self.store)
        # The scan frames tiler_node keeps at full resolution (the web app's flake page shows them).
        add_frame_recorder(self, self.store)
        self._diagnostics = diagnostics_publisher(self)
        self._diagnostics_timer = self.create_timer(self.params.diagnostics_period, self._publish_diagnostics)

        self._worker = threading.Thread(target=self._ingest_loop, name='registry_ingest', daemon=True)
        self._worker.start()
        self._gc_timer = freeze_long_lived_objects(self, self.params.gc_freeze_period)

    def _on_params(self, changes: dict) -> None:
        if 'max_lease' in changes:
            self.store.max_lease_s = changes['max_lease']
        if 'default_lease' in changes or 'max_lease' in changes:
            self.store.default_lease_s = min(self.params.default_lease, self.params.max_lease)

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, value in increments.items():
                self.stats[name] += value

    # -- ingest -------------------------------------------------------------------

    def _on_detections(self, msg: FlakeArray) -> None:
        self._count(batches_received=1)
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self._count(batches_dropped=1)
            self.get_logger().error(f'ingest queue full ({self._queue.maxsize} batches): dropped the batch of scan '
                                    f'{msg.scan_id!r} tile {msg.tile_index}', throttle_duration_sec=5.0)

    def _ingest_loop(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            try:
                self._ingest(msg)
            except Exception as error:  # noqa: BLE001 - the worker must outlive any one batch
                self._last_error = f'{type(error).__name__}: {error}'
                self._count(batches_failed=1)
                self.get_logger().error(f'batch of scan {msg.scan_id!r} lost: {self._last_error}')

    def _ingest(self, msg: FlakeArray) -> None:
        detections, unreadable = [], 0
        for flake in msg.flakes:
            try:
                detections.append(detection_from_msg(flake, msg))
            except Exception as error:  # noqa: BLE001 - e.g. a mask whose size does not match its data
                unreadable += 1
                self.get_logger().warn(f'unreadable flake in scan {msg.scan_id!r}: {error}',
                                       throttle_duration_sec=5.0)
        if unreadable:
            self._count(detections_refused=unreadable)
        for attempt in range(1, self.params.ingest_retries + 1):
            try:
                outcomes = self.store.ingest(detections)
                break
            except Exception as error:  # noqa: BLE001 - a failed batch is counted and retried, never raised
                self._last_error = f'{type(error).__name__}: {error}'
                self.get_logger().error(f'storing batch of scan {msg.scan_id!r} tile {msg.tile_index} failed '
                                        f'(attempt {attempt}): {self._last_error}')
                time.sleep(0.2 * attempt)
        else:
            self._count(batches_failed=1)
            return
        refused = [o for o in outcomes if o.error]
        for outcome in refused:
            self.get_logger().warn(f'refused a detection of scan {msg.scan_id!r}: {outcome.error}',
                                   throttle_duration_sec=5.0)
        stored = [o for o in outcomes if not o.error]
        new = [o for o in stored if o.is_new]
        self._count(batches_stored=1, detections_stored=len(stored), detections_refused=len(refused),
                    new_flakes=len(new))
        for outcome in stored:
            if outcome.is_new or self.params.publish_observation_events:
                self._event(RegistryEvent.NEW_FLAKE if outcome.is_new else RegistryEvent.OBSERVED,
                            outcome.flake_id, chip_id=outcome.chip_id,
                            detail={'scan_id': msg.scan_id, 'tile_index': msg.tile_index})

    def _event(self, kind: str, flake_id: str, chip_id: str = '', robot_id: str = '',
               detail: dict | None = None) -> None:
        self.events.publish(RegistryEvent(stamp=self.get_clock().now().to_msg(), kind=kind, flake_id=flake_id,
                                          chip_id=chip_id, robot_id=robot_id,
                                          detail=json.dumps(detail or {}, separators=(',', ':'))))

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once every received batch is stored (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._stats_lock:
                done = self.stats['batches_stored'] + self.stats['batches_failed'] + self.stats['batches_dropped']
                if done >= self.stats['batches_received']:
                    return True
            time.sleep(0.01)
        return False

    # -- services -------------------------------------------------------------------

    def _query_flakes(self, request, response):
        def run():
            contours = self.params.query_contours
            result = self.store.query(query_from_request(request, self.params.default_query_limit),
                                      contours=contours)
            response.total = result.total
            response.flakes = [self.messages.message(f, contour=contours) for f in result.flakes]
            response.message = f'{len(result.flakes)} of {result.total} flakes'
        return answer_request(request, response, run, 'query_flakes', self.get_logger())

    def _get_flake(self, request, response):
        def run():
            detail = self.store.get_flake(request.flake_id)
            response.flake = flake_to_msg(detail.flake)
            response.observations = [observation_to_msg(o) for o in detail.observations]
            response.images = [image_to_msg(i) for i in detail.images]
            response.reserved_by = detail.flake.reserved_by
            response.lease_expires = to_time(detail.flake.lease_expires)
            response.message = f'{detail.flake.n_observations} observation(s)'
        return answer_request(request, response, run, 'get_flake', self.get_logger())

    def _reserve_flake(self, request, response):
        def run():
            reservation = self.store.reserve(request.flake_id, request.robot_id, request.lease)
            response.token = reservation.token
            response.lease_expires = to_time(reservation.expires)
            response.message = f'reserved for {reservation.expires - reservation.created:.1f} s'
            self._event(RegistryEvent.RESERVED, request.flake_id, robot_id=request.robot_id,
                        detail={'expires': reservation.expires})
        return answer_request(request, response, run, 'reserve_flake', self.get_logger())

    def _release_flake(self, request, response):
        def run():
            reservation = self.store.release(request.flake_id, request.token)
            response.message = 'released'
            self._event(RegistryEvent.RELEASED, request.flake_id, robot_id=reservation.robot_id)
        return answer_request(request, response, run, 'release_flake', self.get_logger())

    def _mark_flake_used(self, request, response):
        def run():
            reservation = self.store.mark_used(request.flake_id, request.token, request.note)
            response.message = 'marked used'
            self._event(RegistryEvent.USED, request.flake_id, robot_id=reservation.robot_id,
                        detail={'note': request.note})
        return answer_request(request, response, run, 'mark_flake_used', self.get_logger())

    def _get_revisit_list(self, request, response):
        def run():
            flakes = self.store.revisit_list(
                chip_id=request.chip_id, scan_id=request.scan_id, materials=tuple(request.materials),
                layer_classes=tuple(int(v) for v in request.layer_classes),
                min_score=request.min_score or self.params.revisit_min_score,
                min_homogeneity=request.min_homogeneity, include_revisited=request.include_revisited,
                limit=int(request.limit) or self.params.revisit_limit,
                policy=RevisitPolicy.parse(self.params.revisit_wanted, self.params.revisit_order,
                                           self.params.revisit_min_area))
            response.flakes = [self.messages.message(f, contour=True) for f in flakes]
            response.message = f'{len(flakes)} flake(s) to revisit'
        return answer_request(request, response, run, 'get_revisit_list', self.get_logger())

    def _add_flake_image(self, request, response):
        def run():
            image = request.image
            if image.role not in IMAGE_ROLES:
                raise RegistryError(INVALID_ARGUMENT, f'image role must be one of {list(IMAGE_ROLES)}')
            if not math.isfinite(image.pixel_size) or image.pixel_size < 0:
                raise RegistryError(INVALID_ARGUMENT, f'pixel_size must be >= 0 m, got {image.pixel_size}')
            self.store.get_flake(request.flake_id)  # UNKNOWN_ID before anything is written to disk
            if request.pixels.data:
                path = self._stored_path(self._write_image(request.flake_id, image.role, request.pixels))
            else:
                path = confine_path(image.path, self.data_dir, (self.image_dir,))
            self.store.add_image(request.flake_id, image.role, path, image.objective, image.pixel_size,
                                 from_time(image.stamp) or None)
            response.path = path
            response.message = f'{image.role} image stored'
            self._event(RegistryEvent.IMAGE_ADDED, request.flake_id, detail={'role': image.role, 'path': path})
        return answer_request(request, response, run, 'add_flake_image', self.get_logger())

    def _stored_path(self, path: Path) -> str:
        """As the registry keeps it: relative to the data folder when inside it (the web app and exports
        read it from there), else absolute."""
        resolved, data_dir = path.resolve(), self.data_dir.resolve()
        return resolved.relative_to(data_dir).as_posix() if data_dir in resolved.parents else str(resolved)

    def _write_image(self, flake_id: str, role: str, pixels_msg) -> Path:
        check_image_size(pixels_msg.width, pixels_msg.height)
        try:
            pixels = image_to_numpy(pixels_msg, 'passthrough')
        except Exception as error:  # noqa: BLE001 - any decoding problem is the caller's bad image
            raise RegistryError(INVALID_IMAGE, f'cannot decode the image: {error}') from None
        if pixels_msg.encoding == 'rgb8':
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
        folder = self.image_dir / _SAFE_NAME.sub('_', flake_id)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime('%Y%m%dT%H%M%S', time.gmtime()) + f'{time.time() % 1:.6f}'[1:].replace('.', '_')
        path = folder / f'{role}_{stamp}.png'
        temporary = path.with_suffix('.tmp.png')
        try:
            written = cv2.imwrite(str(temporary), pixels)
        except cv2.error:
            written = False
        if not written:
            temporary.unlink(missing_ok=True)
            raise RegistryError(INVALID_IMAGE, f'cannot write {pixels_msg.encoding} pixels as PNG')
        os.replace(temporary, path)  # never a half-written file under the final name
        return path

    # -- diagnostics and shutdown -----------------------------------------------------

    def _publish_diagnostics(self) -> None:
        with self._stats_lock:
            stats = dict(self.stats)
        level, message = OK, 'ingesting'
        if stats['batches_dropped'] or stats['detections_refused']:
            level, message = WARN, 'batches dropped or detections refused'
        if stats['batches_failed']:
            level, message = ERROR, f'batches failed to store: {self._last_error}'
        values = dict(stats, message_cache_hits=self.messages.hits, message_cache_misses=self.messages.misses,
                      queue_depth=self._queue.qsize(), queue_size=self._queue.maxsize,
                      schema_version=self.store.schema_version, last_error=self._last_error)
        publish_diagnostics(self, self._diagnostics, [
            diagnostic_status('registry_node: database', self.store.url, level, message, values)])

    def close(self) -> None:
        """Store what is queued, then close the database."""
        self._queue.put(None)
        self._worker.join(timeout=30.0)
        self.store.close()
        if self._gc_timer is not None:
            self.destroy_timer(self._gc_timer)
        gc.unfreeze()  # an embedding process (tests, one executor for many nodes) gets its collector back


def main(args=None) -> None:
    run_node(RegistryNode, args=args)


if __name__ == '__main__':
    main()
