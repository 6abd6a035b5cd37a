"""A real registry_node in the test process, spun by its own executor thread, and test flakes."""

from __future__ import annotations

from contextlib import contextmanager
import threading

from geometry_msgs.msg import Point32
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter

from flake_msgs.msg import Flake
from flake_registry.nodes.registry_node import RegistryNode

UM = 1e-6


@contextmanager
def running_registry(database_path, **parameters):
    """A RegistryNode on ``database_path`` served by an executor in a thread; yields the node."""
    overrides = [Parameter('database_path', value=str(database_path))]
    overrides += [Parameter(name, value=value) for name, value in parameters.items()]
    node = RegistryNode(parameter_overrides=overrides)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        yield node
    finally:
        executor.shutdown()
        node.close()
        node.destroy_node()
        spinner.join(timeout=10)


def make_flake(x, y, *, material='graphene', layer_class=Flake.LAYER_MONO, layers=1.0, score=0.9,
               chip_id='chip-T', side=10 * UM, **fields) -> Flake:
    """A square flake of ``side`` centred at (x, y) [m] in the wafer frame."""
    flake = Flake()
    flake.header.frame_id = 'wafer'
    flake.chip_id = chip_id
    flake.material = material
    flake.layer_class = layer_class
    flake.layers = layers
    flake.thickness_nm = 0.34 * layers
    flake.score = score
    flake.detector = 'contrast'
    flake.centre.x, flake.centre.y = x, y
    h = side / 2
    flake.contour.points = [Point32(x=x - h, y=y - h), Point32(x=x + h, y=y - h), Point32(x=x + h, y=y + h),
                            Point32(x=x - h, y=y + h)]
    flake.area = side * side
    flake.bbox.x_offset, flake.bbox.y_offset, flake.bbox.width, flake.bbox.height = 10, 5, 20, 20
    flake.homogeneity = 0.9
    for name, value in fields.items():
        setattr(flake, name, value)
    return flake
