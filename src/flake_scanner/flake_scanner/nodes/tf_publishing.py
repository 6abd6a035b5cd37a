"""tf for the scanner's frames without tf2_ros: TFMessage publishers on ``tf`` and ``tf_static``.

tf2_msgs is not on PyPI; ``make setup`` builds it from the ROS 2 tools kit where one is
present, and a ROS 2 install provides it. Without it there is no tf and positions stay on
/stage/state and in the messages' own fields (the node says so once).

The topics are relative (``tf``, ``tf_static``): a microscope started in a namespace keeps
its own tree (``/scope1/tf_static``), as namespaced robots do; ``/tf`` without one.

Frames (REP 103, REP 105): ``stage`` is fixed to the microscope body (the controller's axes);
``camera`` sits on the optical axis at the stage position, axes parallel to ``stage``;
``camera_optical`` is ``camera`` turned half a turn about x (optical z looks down into the
sample, optical y is stage -y); ``wafer_<chip id>`` is a chip's frame from its corners.
"""

from __future__ import annotations

import math

from geometry_msgs.msg import TransformStamped

from flake_core.node_tools import LATCHED_QOS

STATIC_QOS = LATCHED_QOS  # one latched message holds every static transform


def wafer_frame_id(chip_id: str) -> str:
    """tf frame of a chip's wafer frame: ``wafer_<chip id>`` (tf frame ids take no spaces or slashes)."""
    return 'wafer_' + ''.join(c if c.isalnum() or c in '-_.' else '_' for c in chip_id)


def transform(stamp, parent: str, child: str, translation=(0.0, 0.0, 0.0),
              quaternion=(0.0, 0.0, 0.0, 1.0)) -> TransformStamped:
    message = TransformStamped()
    message.header.stamp = stamp
    message.header.frame_id = parent
    message.child_frame_id = child
    t = message.transform.translation
    t.x, t.y, t.z = (float(v) for v in translation)
    r = message.transform.rotation
    r.x, r.y, r.z, r.w = (float(v) for v in quaternion)
    return message


def wafer_transform(frame, chip_id: str, stamp) -> TransformStamped:
    """stage -> wafer_<chip>: the chip's origin corner and its rotation on the stage."""
    wafer_to_stage = frame.wafer_to_stage
    half = frame.rotation / 2.0
    return transform(stamp, 'stage', wafer_frame_id(chip_id), (wafer_to_stage.c, wafer_to_stage.f, 0.0),
                     (0.0, 0.0, math.sin(half), math.cos(half)))


def camera_transform(position, stamp) -> TransformStamped:
    """stage -> camera: the optical axis at the stage position."""
    return transform(stamp, 'stage', 'camera', position)


def optical_transform(stamp) -> TransformStamped:
    """camera -> camera_optical: a half turn about x (REP 103 optical frame)."""
    return transform(stamp, 'camera', 'camera_optical', quaternion=(1.0, 0.0, 0.0, 0.0))


def _tf_message_class():
    try:
        from tf2_msgs.msg import TFMessage
    except ImportError:
        return None
    return TFMessage


class TfPublisher:
    """Dynamic transforms on ``tf`` and a latched set of static ones on ``tf_static``."""

    def __init__(self, node, dynamic: bool = False, static: bool = False):
        self._message = _tf_message_class()
        self._statics: dict[str, TransformStamped] = {}
        self.dynamic = self.static = None
        if self._message is None:
            node.get_logger().info('tf2_msgs is not installed: no /tf (make setup builds it from the ROS 2 '
                                   'tools kit; a ROS 2 install has it)')
            return
        if dynamic:
            self.dynamic = node.create_publisher(self._message, 'tf', 100)
        if static:
            self.static = node.create_publisher(self._message, 'tf_static', STATIC_QOS)

    @property
    def available(self) -> bool:
        return self._message is not None

    def send(self, *transforms: TransformStamped) -> None:
        if self.dynamic is not None:
            self.dynamic.publish(self._message(transforms=list(transforms)))

    def send_static(self, *transforms: TransformStamped) -> None:
        """Add or replace static transforms (by child frame) and publish the whole set, as tf2 does."""
        if self.static is None:
            return
        for item in transforms:
            self._statics[item.child_frame_id] = item
        self.static.publish(self._message(transforms=list(self._statics.values())))
