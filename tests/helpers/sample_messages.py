"""Deterministic flake_msgs instances shared by the interface tests and their peer process."""

import numpy as np

from flake_core.ros_image import numpy_to_image


def sample_flake(index: int = 0):
    from geometry_msgs.msg import Point32

    from flake_msgs.msg import Flake

    rng = np.random.default_rng(index)
    flake = Flake()
    flake.header.frame_id = 'wafer'
    flake.id = f'flake-{index:04d}'
    flake.scan_id = 'scan-0001'
    flake.chip_id = 'chip-A'
    flake.tile_index = 7 + index
    flake.material = 'graphene'
    flake.layer_class = Flake.LAYER_FEW
    flake.layers = 2.0
    flake.layers_std = 0.1
    flake.thickness_nm = 0.67
    flake.thickness_nm_std = 0.05
    flake.score = 0.93
    flake.detector = 'contrast'
    flake.model_version = 'test-1'
    flake.bbox.x_offset, flake.bbox.y_offset, flake.bbox.width, flake.bbox.height = 10, 20, 33, 17
    flake.centre.x, flake.centre.y = 1.25e-3, 2.5e-3
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    flake.contour.points = [Point32(x=float(1.25e-3 + 2e-5 * np.cos(a)), y=float(2.5e-3 + 2e-5 * np.sin(a)))
                            for a in angles]
    flake.area = 1.2e-9
    mask = (rng.random((17, 33)) > 0.5).astype(np.uint8) * 255
    flake.mask = numpy_to_image(mask, 'mono8')
    flake.homogeneity = 0.8
    flake.isolation_distance = 5e-5
    flake.edge_straightness = 0.6
    flake.status = Flake.STATUS_AVAILABLE
    return flake
