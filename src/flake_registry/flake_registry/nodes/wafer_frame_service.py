"""The registry's wafer-frame services: chip frames kept where every scan coordinator finds them.

``add_wafer_frame_services(node, store)`` serves /registry/save_wafer_frame
(SaveWaferFrame: three corners in the stage frame -> the stored frame) and
/registry/get_wafer_frames (GetWaferFrames: the current frame of some or all
chips) from any node that holds a FlakeStore; the registry node calls it. The
frame logic lives in ``FlakeStore.save_wafer_frame``; this module converts messages.
"""

from __future__ import annotations

import math

from geometry_msgs.msg import Point
from rclpy.node import Node

from flake_core.node_tools import SERVICE_QOS
from flake_msgs.msg import WaferFrame
from flake_msgs.srv import GetWaferFrames, SaveWaferFrame
from flake_registry.nodes.conversions import to_time
from flake_registry.nodes.request_limits import answer_request
from flake_registry.records import ChipWaferFrame
from flake_registry.store import FlakeStore

SAVE_SERVICE = 'registry/save_wafer_frame'
GET_SERVICE = 'registry/get_wafer_frames'


def wafer_frame_to_msg(frame: ChipWaferFrame) -> WaferFrame:
    return WaferFrame(chip_id=frame.chip_id, corners=[Point(x=float(x), y=float(y)) for x, y in frame.corners],
                      stage_to_wafer=[float(v) for v in frame.stage_to_wafer], rotation=float(frame.rotation),
                      residual=float(frame.residual), measured_by=frame.measured_by,
                      measured_at=to_time(frame.measured_at))


def answer_save(store: FlakeStore, request: SaveWaferFrame.Request, response: SaveWaferFrame.Response,
                logger=None) -> SaveWaferFrame.Response:
    """Fill ``response`` for ``request``; refusals become error codes, never exceptions."""
    def run():
        frame = store.save_wafer_frame(request.chip_id, [(p.x, p.y) for p in request.corners],
                                       measured_by=request.measured_by)
        response.frame = wafer_frame_to_msg(frame)
        response.message = (f'chip {frame.chip_id}: rotation {math.degrees(frame.rotation):.3f} deg, '
                            f'corner residual {frame.residual * 1e6:.1f} um')
    return answer_request(request, response, run, 'save_wafer_frame', logger)


def answer_get(store: FlakeStore, request: GetWaferFrames.Request, response: GetWaferFrames.Response,
               logger=None) -> GetWaferFrames.Response:
    def run():
        frames = store.wafer_frames(list(request.chip_ids))
        response.frames = [wafer_frame_to_msg(frame) for frame in frames.values()]
        response.message = f'{len(frames)} chip(s) with a wafer frame'
    return answer_request(request, response, run, 'get_wafer_frames', logger)


def add_wafer_frame_services(node: Node, store: FlakeStore, qos_profile=SERVICE_QOS) -> list:
    """Serve SaveWaferFrame and GetWaferFrames on ``node`` from ``store`` (deep service QoS); returns the services."""
    logger = node.get_logger()
    return [
        node.create_service(SaveWaferFrame, SAVE_SERVICE,
                            lambda request, response: answer_save(store, request, response, logger),
                            qos_profile=qos_profile),
        node.create_service(GetWaferFrames, GET_SERVICE,
                            lambda request, response: answer_get(store, request, response, logger),
                            qos_profile=qos_profile),
    ]
