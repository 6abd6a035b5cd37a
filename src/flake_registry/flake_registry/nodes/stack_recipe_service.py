"""The GetStackRecipe service: stack recipes planned in the lab web app, for the assembly robot.

``add_stack_recipe_service(node, store)`` serves /registry/get_stack_recipe from any
node that holds a FlakeStore (the registry node calls it); ``StackRecipeNode`` is a
small stand-alone node for a deployment that runs the web app without the registry
node. The recipe logic lives in flake_registry.stacks; this module converts it to
the message.
"""

from __future__ import annotations

from pathlib import Path

from rclpy.node import Node

from flake_core.node_tools import SERVICE_QOS, declare_parameters, run_node
from flake_msgs.msg import StackLayer
from flake_msgs.srv import GetStackRecipe
from flake_registry import stacks
from flake_registry.nodes.request_limits import answer_request
from flake_registry.parameters import StackRecipeNodeParameters
from flake_registry.store import FlakeStore, default_database_path

SERVICE_NAME = 'registry/get_stack_recipe'


def recipe_to_response(recipe: stacks.StackRecipe, response: GetStackRecipe.Response) -> GetStackRecipe.Response:
    response.name = recipe.name
    response.robot_id = recipe.robot_id
    response.layers = []
    for index, layer in enumerate(recipe.layers):
        msg = StackLayer(index=index, flake_id=layer.flake_id, chip_id=layer.chip_id, material=layer.material,
                         layer_class=int(layer.layer_class), rotation=float(layer.rotation), token=layer.token)
        msg.centre.x, msg.centre.y = float(layer.x), float(layer.y)
        response.layers.append(msg)
    return response


def answer_stack_recipe(store: FlakeStore, request: GetStackRecipe.Request, response: GetStackRecipe.Response,
                        logger=None) -> GetStackRecipe.Response:
    """Fill ``response`` for ``request``; refusals become error codes, never exceptions."""
    def run():
        recipe = stacks.get_recipe(store, request.recipe_id)
        recipe_to_response(recipe, response)
        response.message = f'{len(recipe.layers)} layer(s), bottom first'
    return answer_request(request, response, run, 'get_stack_recipe', logger)


def add_stack_recipe_service(node: Node, store: FlakeStore, name: str = SERVICE_NAME, qos_profile=SERVICE_QOS):
    """Serve GetStackRecipe on ``node`` from ``store`` with the registry's deep service QoS; returns the service."""
    return node.create_service(GetStackRecipe, name,
                               lambda request, response: answer_stack_recipe(store, request, response,
                                                                             node.get_logger()),
                               qos_profile=qos_profile)


class StackRecipeNode(Node):
    def __init__(self, **kwargs):
        super().__init__('stack_recipe_node', **kwargs)
        self.params = declare_parameters(self, StackRecipeNodeParameters)
        self.store = FlakeStore(self.params.database_url
                                or Path(self.params.database_path or default_database_path()))
        add_stack_recipe_service(self, self.store)

    def close(self) -> None:
        self.store.close()


def main(args=None):
    run_node(StackRecipeNode, args=args)


if __name__ == '__main__':
    main()
