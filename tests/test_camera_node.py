"""camera_node over real rclpy (sim and folder backends) and its frame sources."""

import cv2
from geometry_msgs.msg import Point
import numpy as np
import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from ros_helpers import spin_future, spin_until
from sensor_msgs.msg import CameraInfo, Image
from std_srvs.srv import Trigger

from flake_core.node_tools import SENSOR_SUBSCRIBER_QOS
from flake_core.ros_image import image_to_numpy
from flake_msgs.msg import StageState
from flake_msgs.srv import MoveStage
from flake_scanner.camera_sources import CameraError, FolderSource, StagePose, motion_blur
from flake_scanner.nodes.camera_node import CameraNode
from flake_scanner.nodes.stage_node import StageNode
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.wafer import VirtualWafer

SIZE = 256
SEED = 4


@pytest.fixture
def graph(ros):
    stage = StageNode(parameter_overrides=[Parameter('emulator_time_scale', value=50.0),
                                           Parameter('poll_rate', value=50.0)])
    camera = CameraNode(parameter_overrides=[Parameter('width', value=SIZE), Parameter('height', value=SIZE),
                                             Parameter('rate', value=0.0), Parameter('sim_seed', value=SEED)])
    client = ros.create_node('camera_test_client')
    executor = SingleThreadedExecutor()
    for node in (stage, camera, client):
        executor.add_node(node)
    yield stage, camera, client, executor
    for node in (stage, camera, client):
        executor.remove_node(node)
        if hasattr(node, 'close'):
            node.close()
        node.destroy_node()
    executor.shutdown()


def test_captured_frame_shows_the_flake_at_the_stage_position(graph):
    stage, camera, client, executor = graph
    for node in (stage, camera):
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    images: list[Image] = []
    infos: list[CameraInfo] = []
    states: list[StageState] = []
    client.create_subscription(Image, '/camera/image_raw', images.append, SENSOR_SUBSCRIBER_QOS)
    client.create_subscription(CameraInfo, '/camera/camera_info', infos.append, SENSOR_SUBSCRIBER_QOS)
    client.create_subscription(StageState, '/stage/state', states.append, 10)
    move = client.create_client(MoveStage, '/stage/move')
    capture = client.create_client(Trigger, '/camera/capture')

    reference = CameraModel(VirtualWafer.generate(seed=SEED),
                            CameraSettings(width=SIZE, height=SIZE, objective='10x', seed=SEED))
    x, y = reference.flake_corner_in_view(np.random.default_rng(0), 2e-3, 8e-3)
    z = reference.focal_plane_z(x, y)
    assert spin_until(executor, move.service_is_ready, 10.0)
    response = spin_future(executor, move.call_async(
        MoveStage.Request(target=Point(x=x, y=y, z=z), wait=True)), 20.0)
    assert response.success, response.message
    reached = (response.position.x, response.position.y, response.position.z)
    assert spin_until(executor, lambda: bool(states) and not states[-1].moving
                      and abs(states[-1].position.x - reached[0]) < 1e-9, 10.0)
    # The camera must have the settled state too before the frame is exposed.
    assert spin_until(executor, lambda: camera.pose().x == pytest.approx(reached[0], abs=1e-9), 10.0)

    assert spin_until(executor, capture.service_is_ready, 10.0)
    answer = spin_future(executor, capture.call_async(Trigger.Request()), 20.0)
    assert answer.success, answer.message
    assert spin_until(executor, lambda: bool(images) and bool(infos), 10.0)
    msg = images[-1]
    assert (msg.width, msg.height, msg.encoding, msg.step) == (SIZE, SIZE, 'bgr8', SIZE * 3)
    assert msg.header.frame_id == 'camera_optical'
    assert infos[-1].header.frame_id == 'camera_optical' and infos[-1].width == SIZE
    frame = image_to_numpy(msg)

    # The frame is the simulated microscope's view at the pose the stage reached (the
    # controller rounds to 0.1 um), pixel for pixel.
    expected = reference.render(*reached)
    assert np.array_equal(frame, expected)
    truth = reference.ground_truth(reached[0], reached[1])
    flake = max(truth.flakes, key=lambda o: o.area_px)
    inside = frame[flake.mask].mean(axis=0)
    background = frame[~np.any([o.mask for o in truth.objects], axis=0)].mean(axis=0)
    assert np.abs(inside - background).max() > 3.0, (inside, background)


def test_inactive_camera_refuses_capture(graph):
    _, camera, client, executor = graph
    capture = client.create_client(Trigger, '/camera/capture')
    assert spin_until(executor, capture.service_is_ready, 10.0)
    answer = spin_future(executor, capture.call_async(Trigger.Request()), 10.0)
    assert not answer.success and 'not active' in answer.message


def test_folder_backend_replays_images_in_order(ros, tmp_path):
    for i in range(2):
        cv2.imwrite(str(tmp_path / f'frame_{i}.png'), np.full((20, 30, 3), 40 + 100 * i, np.uint8))
    camera = CameraNode(parameter_overrides=[Parameter('backend', value='folder'),
                                             Parameter('folder', value=str(tmp_path)),
                                             Parameter('rate', value=0.0)])
    client = ros.create_node('camera_folder_client')
    executor = SingleThreadedExecutor()
    executor.add_node(camera)
    executor.add_node(client)
    try:
        images: list[Image] = []
        client.create_subscription(Image, '/camera/image_raw', images.append, SENSOR_SUBSCRIBER_QOS)
        capture = client.create_client(Trigger, '/camera/capture')
        assert camera.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert camera.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert spin_until(executor, capture.service_is_ready, 10.0)
        for _ in range(3):
            assert spin_future(executor, capture.call_async(Trigger.Request()), 10.0).success
        assert spin_until(executor, lambda: len(images) >= 3, 10.0)
        assert [int(image_to_numpy(m)[0, 0, 0]) for m in images[:3]] == [40, 140, 40]
        assert (images[0].width, images[0].height, images[0].step) == (30, 20, 90)
    finally:
        executor.remove_node(camera)
        executor.remove_node(client)
        camera.close()
        camera.destroy_node()
        client.destroy_node()
        executor.shutdown()


def test_folder_and_missing_device_errors(tmp_path):
    with pytest.raises(CameraError, match='holds no'):
        FolderSource(tmp_path)
    with pytest.raises(CameraError, match='does not exist'):
        FolderSource(tmp_path / 'absent')


def test_motion_blur_smears_along_the_motion_only():
    image = np.zeros((41, 41, 3), np.uint8)
    image[20, 20] = 255
    # 1 mm/s for 10 ms at 1 um/px: a 10 px streak along x.
    smeared = motion_blur(image, 1e-3, 0.0, 0.01, 1e-6)
    row = smeared[20, :, 0]
    assert (row > 0).sum() >= 9 and smeared[:, 20, 0].astype(bool).sum() == 1
    assert motion_blur(image, 1e-6, 0.0, 0.01, 1e-6) is image
    assert StagePose().vx == 0.0
