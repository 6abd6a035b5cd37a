"""The web app and a live registry node (another process) reserve the same flakes: exactly one wins."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading

import pytest
from rclpy.executors import SingleThreadedExecutor
from ros_helpers import spin_future, spin_until, stop_helper
from web_helpers import make_registry, web_app, web_client

from flake_msgs.srv import GetStackRecipe, ReserveFlake

pytestmark = pytest.mark.ros

ROUNDS = 8


@pytest.fixture(scope='module')
def system(ros, tmp_path_factory):
    """A registry file with the registry node serving it from its own process, and the app over the same file."""
    db_path, data_dir, store = make_registry(tmp_path_factory.mktemp('concurrency'), count=40)
    node_process = subprocess.Popen(
        [sys.executable, '-c', 'from flake_registry.nodes.registry_node import main; main()',
         '--ros-args', '-p', f'database_path:={db_path}', '-r', '__node:=registry_node_web_test'],
        env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    robot = ros.create_node('web_concurrency_robot')
    executor = SingleThreadedExecutor()
    executor.add_node(robot)
    client = robot.create_client(ReserveFlake, '/registry/reserve_flake')
    try:
        assert client.wait_for_service(timeout_sec=60.0), 'registry node did not come up'
        # A reply sent before DDS matched the client's reader is lost: retry a harmless call until answered.
        for _ in range(20):
            future = client.call_async(ReserveFlake.Request(flake_id='F0000000', robot_id='warm-up'))
            if spin_until(executor, future.done, timeout=3.0):
                assert future.result().error_code == 'UNKNOWN_ID'
                break
            client.remove_pending_request(future)
        else:
            pytest.fail('registry node never answered')
        with web_client(web_app(db_path, data_dir, store)) as web:
            yield web, client, executor, store
    finally:
        executor.shutdown()
        robot.destroy_node()
        output = stop_helper(node_process)
        store.close()
        assert 'Traceback' not in output, output


def race(web, client, executor, layer_ids: list[str], contested: str):
    """The app reserves ``layer_ids`` as one stack while a robot reserves ``contested`` over ROS, at once."""
    start = threading.Barrier(2)
    outcome = {}

    def from_app():
        start.wait(timeout=30)
        outcome['http'] = web.post('/api/stacks', json={
            'name': 'race', 'robot_id': 'web-arm', 'lease_s': 600,
            'layers': [{'flake_id': i} for i in layer_ids]})

    thread = threading.Thread(target=from_app)
    thread.start()
    start.wait(timeout=30)
    future = client.call_async(ReserveFlake.Request(flake_id=contested, robot_id='ros-arm', lease=600.0))
    ros_reply = spin_future(executor, future, timeout=30.0)
    thread.join(timeout=30)
    return outcome['http'], ros_reply


def test_exactly_one_of_app_and_ros_service_wins(system):
    web, client, executor, store = system
    winners = []
    for round_index in range(ROUNDS):
        flake_id = f'F{round_index + 1:07d}'
        http, ros_reply = race(web, client, executor, [flake_id], flake_id)
        app_won = http.status_code == 201
        assert app_won != ros_reply.success, (http.status_code, http.text, ros_reply.error_code)
        if app_won:
            assert ros_reply.error_code == 'ALREADY_RESERVED'
        else:
            assert http.status_code == 409 and http.json()['error']['code'] == 'ALREADY_RESERVED'
        live = [r for r in store.reservations(flake_id)]
        assert len(live) == 1
        assert live[0]['robot_id'] == ('web-arm' if app_won else 'ros-arm')
        winners.append('app' if app_won else 'ros')
    assert len(winners) == ROUNDS


def test_stack_against_ros_is_all_or_none(system):
    web, client, executor, store = system
    for round_index in range(4):
        base = 20 + 3 * round_index
        layer_ids = [f'F{base + k:07d}' for k in range(3)]
        contested = layer_ids[1]
        http, ros_reply = race(web, client, executor, layer_ids, contested)
        reserved = {r['flake_id']: r['robot_id'] for r in store.reservations() if r['flake_id'] in layer_ids}
        if http.status_code == 201:
            assert not ros_reply.success and ros_reply.error_code == 'ALREADY_RESERVED'
            assert reserved == {i: 'web-arm' for i in layer_ids}
        else:
            assert ros_reply.success
            assert http.json()['error']['code'] == 'ALREADY_RESERVED'
            # The stack reserved nothing: only the robot's flake is taken.
            assert reserved == {contested: 'ros-arm'}


def test_registry_node_serves_recipes_saved_by_the_app(system, ros):
    web, _, executor, store = system
    created = web.post('/api/stacks', json={'name': 'served', 'robot_id': 'arm-9', 'lease_s': 600,
                                            'layers': [{'flake_id': 'F0000035'}, {'flake_id': 'F0000036',
                                                                                  'rotation_deg': 90}]})
    assert created.status_code == 201
    node = executor.get_nodes()[0]
    client = node.create_client(GetStackRecipe, '/registry/get_stack_recipe')
    try:
        assert client.wait_for_service(timeout_sec=30.0)
        for _ in range(20):
            future = client.call_async(GetStackRecipe.Request(recipe_id=created.json()['id']))
            if spin_until(executor, future.done, timeout=3.0):
                break
            client.remove_pending_request(future)
        else:
            pytest.fail('get_stack_recipe never answered')
        reply = future.result()
        assert reply.success and reply.robot_id == 'arm-9'
        assert [layer.flake_id for layer in reply.layers] == ['F0000035', 'F0000036']
        assert reply.layers[1].rotation == pytest.approx(math.pi / 2)
        assert reply.layers[0].token == created.json()['layers'][0]['token']
    finally:
        node.destroy_client(client)
