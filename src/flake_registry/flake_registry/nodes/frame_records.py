"""The registry records the scan frames the tiler keeps, so that a flake's full-resolution frame is found.

``add_frame_recorder(node, store)`` subscribes registry/frames (ScanFrames without pixels that
``tiler_node`` sends once it has written the frame to ``flake_core.data_files.frame_file``
under the data folder) and records each one with ``FlakeStore.record_frame``: its size, pixel
size, capture time, pixel -> wafer map and the path relative to the data folder, where the
web app serves it from. Revisit captures are not scan frames and are not recorded here (they
come with their flake through AddFlakeImage).
"""

from __future__ import annotations

from rclpy.node import Node

from flake_core.data_files import frame_file
from flake_core.node_tools import PIPELINE_QOS
from flake_msgs.msg import ScanFrame
from flake_registry.nodes.conversions import from_time
from flake_registry.store import FlakeStore

FRAMES_TOPIC = 'registry/frames'


def record_of(frame: ScanFrame) -> dict:
    """The ``FlakeStore.record_frame`` arguments of one announced frame."""
    return {'scan_id': frame.scan_id, 'tile_index': int(frame.tile_index),
            'pixel_to_wafer': [float(v) for v in frame.pixel_to_wafer], 'width': int(frame.image.width),
            'height': int(frame.image.height), 'pixel_size': float(frame.pixel_size),
            'stamp': from_time(frame.header.stamp), 'path': frame_file(frame.scan_id, frame.tile_index).as_posix()}


def add_frame_recorder(node: Node, store: FlakeStore):
    """Record every frame announced on registry/frames; a frame that cannot be recorded is logged."""
    def on_frame(frame: ScanFrame) -> None:
        if frame.revisit or not frame.scan_id:
            return
        try:
            store.record_frame(**record_of(frame))
        except Exception as error:  # noqa: BLE001 - one bad record must not stop the subscription
            node.get_logger().error(f'frame {frame.tile_index} of scan {frame.scan_id!r} not recorded: '
                                    f'{type(error).__name__}: {error}', throttle_duration_sec=5.0)

    return node.create_subscription(ScanFrame, FRAMES_TOPIC, on_frame, PIPELINE_QOS)
