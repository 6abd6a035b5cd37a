"""GetStackRecipe over real rclpy: a recipe saved and reserved in the web app, fetched by the robot."""

from __future__ import annotations

import math
import threading

import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from ros_helpers import spin_future, spin_until
from web_helpers import make_registry

from flake_msgs.msg import Flake
from flake_msgs.srv import GetStackRecipe
from flake_registry import stacks
from flake_registry.nodes.stack_recipe_service import StackRecipeNode

pytestmark = pytest.mark.ros


@pytest.fixture(scope='module')
def service(ros, tmp_path_factory):
    db_path, data_dir, store = make_registry(tmp_path_factory.mktemp('stack_service'), count=12)
    node = StackRecipeNode(parameter_overrides=[Parameter('database_path', value=str(db_path))])
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    robot = ros.create_node('stack_recipe_robot')
    robot_executor = SingleThreadedExecutor()
    robot_executor.add_node(robot)
    client = robot.create_client(GetStackRecipe, '/registry/get_stack_recipe')
    assert client.wait_for_service(timeout_sec=30.0)
    # A reply sent before DDS matched the client's reader is lost: retry a harmless call until answered.
    for _ in range(20):
        future = client.call_async(GetStackRecipe.Request(recipe_id='S000000000000'))
        if spin_until(robot_executor, future.done, timeout=3.0):
            break
        client.remove_pending_request(future)
    else:
        pytest.fail('get_stack_recipe never answered')

    def call(recipe_id):
        return spin_future(robot_executor, client.call_async(GetStackRecipe.Request(recipe_id=recipe_id)), 30.0)

    yield store, call
    robot_executor.shutdown()
    robot.destroy_node()
    executor.shutdown()
    node.close()
    node.destroy_node()
    store.close()


def test_robot_fetches_the_reserved_recipe(service):
    store, call = service
    layers = [stacks.StackLayer('F0000002', rotation=0.0), stacks.StackLayer('F0000001', rotation=math.pi / 6),
              stacks.StackLayer('F0000006', rotation=-0.1)]
    recipe = stacks.save_recipe(store, 'hBN/G/hBN', layers)
    recipe = stacks.reserve_recipe(store, recipe.id, 'arm-3', 600)
    reply = call(recipe.id)
    assert reply.success and reply.error_code == ''
    assert reply.name == 'hBN/G/hBN' and reply.robot_id == 'arm-3'
    assert [layer.flake_id for layer in reply.layers] == ['F0000002', 'F0000001', 'F0000006']
    assert [layer.index for layer in reply.layers] == [0, 1, 2]
    assert [layer.material for layer in reply.layers] == ['hbn', 'graphene', 'hbn']
    assert reply.layers[1].layer_class == Flake.LAYER_MONO
    assert reply.layers[1].rotation == pytest.approx(math.pi / 6)
    flake = store.get_flake('F0000001').flake
    assert (reply.layers[1].centre.x, reply.layers[1].centre.y) == pytest.approx((flake.x, flake.y))
    # The tokens in the recipe are the live reservations: the robot can mark the flakes used.
    store.mark_used('F0000001', reply.layers[1].token)
    assert store.get_flake('F0000001').flake.status == Flake.STATUS_USED


@pytest.mark.parametrize('recipe_id, code', [('S123456789abc', 'UNKNOWN_ID'), ('', 'INVALID_ARGUMENT'),
                                             ("S1'; DROP TABLE", 'INVALID_ARGUMENT')])
def test_bad_recipe_ids_get_error_codes(service, recipe_id, code):
    _, call = service
    reply = call(recipe_id)
    assert not reply.success and reply.error_code == code and reply.message
    assert reply.layers == []
