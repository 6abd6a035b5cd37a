"""Peer process for the flake_msgs round-trip tests.

Publishes a sample Flake on /peer/flake, answers /peer/query_flakes, and serves a
/peer/scan action that sends feedback for each of its tiles and honours cancel.
"""

from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rclpy  # noqa: E402
from rclpy.action import ActionServer, CancelResponse, GoalResponse  # noqa: E402
from rclpy.callback_groups import ReentrantCallbackGroup  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sample_messages import sample_flake  # noqa: E402

from flake_core.node_tools import run_node  # noqa: E402
from flake_msgs.action import Scan  # noqa: E402
from flake_msgs.msg import Flake  # noqa: E402
from flake_msgs.srv import QueryFlakes  # noqa: E402

TILES = 5


class InterfacePeer(Node):
    def __init__(self):
        super().__init__('interface_peer')
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.publisher = self.create_publisher(Flake, '/peer/flake', latched)
        self.publisher.publish(sample_flake(0))
        self.create_service(QueryFlakes, '/peer/query_flakes', self.on_query)
        group = ReentrantCallbackGroup()
        self.server = ActionServer(self, Scan, '/peer/scan', self.execute,
                                   goal_callback=lambda _goal: GoalResponse.ACCEPT,
                                   cancel_callback=lambda _handle: CancelResponse.ACCEPT,
                                   callback_group=group)
        self.rate_timer_group = group
        print('peer ready', flush=True)

    def on_query(self, request, response):
        if request.layers_max and request.layers_min > request.layers_max:
            response.success = False
            response.error_code = response.ERROR_INVALID_RANGE
            response.message = 'layers_min > layers_max'
            return response
        response.success = True
        response.flakes = [sample_flake(i) for i in range(request.limit or 3)]
        response.total = 42
        return response

    async def execute(self, goal_handle):
        result = Scan.Result()
        for tile in range(TILES):
            if goal_handle.is_cancel_requested:
                goal_handle.canceled()
                result.error_code = result.ERROR_CANCELED
                result.tiles_done = tile
                return result
            feedback = Scan.Feedback(phase='scanning', tiles_done=tile + 1, tiles_total=TILES,
                                     flakes_so_far=tile, eta=float(TILES - tile - 1))
            goal_handle.publish_feedback(feedback)
            # Pace the tiles without blocking the executor thread.
            await self._pause(0.2)
        goal_handle.succeed()
        result.success = True
        result.scan_id = goal_handle.request.chip_id + '-scan'
        result.tiles_total = result.tiles_done = TILES
        return result

    def _pause(self, seconds):
        future = rclpy.task.Future()
        timer = None

        def fire():
            timer.cancel()
            future.set_result(True)

        timer = self.create_timer(seconds, fire, callback_group=self.rate_timer_group)
        return future


def main():
    # The nodes' own runner: it also ends cleanly when Ctrl-C's shutdown races the executor.
    run_node(InterfacePeer, make_executor=lambda: MultiThreadedExecutor(num_threads=2))


if __name__ == '__main__':
    main()
