"""run_node ends a node cleanly when Ctrl-C's shutdown races a message, and only then.

Each case runs in its own interpreter: run_node initialises and shuts down rclpy's global
context, which the other tests of the session share."""

import subprocess
import sys

RACE = '''
import sys
import rclpy
from flake_core.node_tools import run_node

class Node:
    destroyed = False
    def destroy_node(self):
        Node.destroyed = True

class RacingExecutor:
    """Spins until 'Ctrl-C': the context shut down (as rclpy's signal handler does), then a
    message taken at that moment fails to convert, as rclpy raises it under load."""
    stopped = False
    def add_node(self, node):
        pass
    def spin(self):
        if sys.argv[1] == 'shutdown-first':
            rclpy.try_shutdown()
        raise RuntimeError("Unable to convert call argument '0' to Python object")
    def shutdown(self):
        RacingExecutor.stopped = True

try:
    run_node(Node, args=[], make_executor=RacingExecutor)
    outcome = 'returned'
except RuntimeError as error:
    outcome = 'raised ' + str(error)
print(outcome, Node.destroyed, RacingExecutor.stopped, rclpy.ok())
'''


def run_case(case: str) -> str:
    done = subprocess.run([sys.executable, '-c', RACE, case], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_failed_take_after_shutdown_ends_the_node_cleanly():
    assert run_case('shutdown-first') == 'returned True True False'


def test_the_same_error_while_the_context_runs_is_raised_and_the_node_still_closed():
    assert run_case('context-running') == "raised Unable to convert call argument '0' to Python object True True False"
