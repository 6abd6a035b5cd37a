"""``flake-system``: bring the whole node graph up without ``ros2 launch``.

On a pip-only install there is no launch system; this starts every node of
``flake_scanner.graph`` as its own process with the same parameter files and
remappings the launch file uses, drives the lifecycle nodes to active, relays
their logs, and stops them all cleanly on Ctrl-C, SIGTERM, or when one dies.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time

from flake_scanner.graph import HARDWARE_MODES, command_line, nodes_for


class GraphStartError(RuntimeError):
    """The graph could not be brought up (a node died or a lifecycle transition failed)."""


class RunningSystem:
    """Processes of the node graph. Use ``running_system()`` or ``start``/``stop``."""

    def __init__(self, hardware: str = 'sim', namespace: str = '', params_file: str | None = None,
                 use_sim_time: bool = False, only: set[str] | None = None,
                 log_dir: str | Path | None = None, echo: bool = True):
        self.specs = nodes_for(hardware, only)
        self.hardware = hardware
        self.namespace = namespace
        self.params_file = params_file
        self.use_sim_time = use_sim_time
        self.log_dir = Path(log_dir) if log_dir else None
        self.echo = echo
        self.processes: dict[str, subprocess.Popen] = {}
        self._log_threads: list[threading.Thread] = []
        self._log_files = []

    def start(self) -> None:
        executable_dir = str(Path(sys.executable).parent)
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            command = command_line(spec, self.hardware, self.namespace, self.params_file,
                                   self.use_sim_time, executable_dir)
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, bufsize=1, env=dict(os.environ),
                                       start_new_session=True)
            self.processes[spec.name] = process
            log_file = open(self.log_dir / f'{spec.name}.log', 'w') if self.log_dir else None  # noqa: SIM115
            if log_file:
                self._log_files.append(log_file)
            thread = threading.Thread(target=self._relay, args=(spec.name, process, log_file), daemon=True)
            thread.start()
            self._log_threads.append(thread)

    def _relay(self, name: str, process: subprocess.Popen, log_file) -> None:
        for line in process.stdout:
            if log_file:
                log_file.write(line)
                log_file.flush()
            if self.echo:
                sys.stdout.write(f'[{name}] {line}')
                sys.stdout.flush()

    def dead(self) -> dict[str, int]:
        """Nodes whose process has exited, with their exit codes."""
        return {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}

    def activate_lifecycle_nodes(self, timeout: float = 60.0) -> None:
        """Configure then activate every lifecycle node, as a lifecycle manager would.

        A service response can be lost while DDS is still matching the reply endpoints, so
        the manager asks each node for its state and only requests the transition that is
        still missing, again after a short wait, until the node is active or time runs out.
        """
        lifecycle = [s for s in self.specs if s.lifecycle]
        if not lifecycle:
            return
        from lifecycle_msgs.msg import State, Transition
        from lifecycle_msgs.srv import ChangeState, GetState
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        own_context = not rclpy.ok()
        if own_context:
            rclpy.init()
        node = rclpy.create_node('flake_system_lifecycle_manager')
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        next_step = {State.PRIMARY_STATE_UNCONFIGURED: Transition.TRANSITION_CONFIGURE,
                     State.PRIMARY_STATE_INACTIVE: Transition.TRANSITION_ACTIVATE}

        def answer(client, request, seconds: float):
            future = client.call_async(request)
            until = time.monotonic() + seconds
            while not future.done() and time.monotonic() < until:
                executor.spin_once(timeout_sec=0.05)
            if not future.done():
                client.remove_pending_request(future)
                return None
            return future.result()

        try:
            for spec in lifecycle:
                prefix = f'{self._prefix()}/{spec.name}'
                change = node.create_client(ChangeState, f'{prefix}/change_state')
                get = node.create_client(GetState, f'{prefix}/get_state')
                deadline = time.monotonic() + timeout
                state = None
                while True:
                    if spec.name in self.dead():
                        raise GraphStartError(f'{spec.name} exited with code {self.dead()[spec.name]}; see its log')
                    if time.monotonic() > deadline:
                        where = 'never answered' if state is None else f'stuck in state {state}'
                        raise GraphStartError(f'{spec.name} {where} after {timeout:.0f} s; see its log')
                    if not (change.service_is_ready() and get.service_is_ready()):
                        executor.spin_once(timeout_sec=0.1)
                        continue
                    reply = answer(get, GetState.Request(), 2.0)
                    if reply is None:
                        continue
                    state = reply.current_state.id
                    if state == State.PRIMARY_STATE_ACTIVE:
                        break
                    transition = next_step.get(state)
                    if transition is None:  # transitioning, or finalized/errored: look again shortly
                        if state == State.PRIMARY_STATE_FINALIZED:
                            raise GraphStartError(f'{spec.name} is finalized; see its log')
                        executor.spin_once(timeout_sec=0.2)
                        continue
                    result = answer(change, ChangeState.Request(transition=Transition(id=transition)), 10.0)
                    if result is not None and not result.success:
                        raise GraphStartError(f'{spec.name}: lifecycle transition {transition} failed; see its log')
                node.destroy_client(change)
                node.destroy_client(get)
        finally:
            executor.shutdown()
            node.destroy_node()
            if own_context:
                rclpy.try_shutdown()

    def _prefix(self) -> str:
        if not self.namespace:
            return ''
        return self.namespace if self.namespace.startswith('/') else '/' + self.namespace

    def stop(self, timeout: float = 15.0) -> dict[str, int]:
        """SIGINT every node (as Ctrl-C would), then SIGKILL stragglers; return exit codes."""
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            remaining = max(0.1, deadline - time.monotonic())
            try:
                process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for thread in self._log_threads:
            thread.join(timeout=2)
        for log_file in self._log_files:
            log_file.close()
        return {name: p.returncode for name, p in self.processes.items()}


@contextmanager
def running_system(**kwargs):
    """Bring the graph up (lifecycle nodes active) for the duration of a ``with`` block."""
    system = RunningSystem(**kwargs)
    system.start()
    try:
        system.activate_lifecycle_nodes()
        yield system
    finally:
        system.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='flake-system',
        description='Run the flake scanner node graph (the pip-only equivalent of '
                    'ros2 launch launch/flake_system.launch.py).')
    parser.add_argument('--hardware', choices=HARDWARE_MODES, default='sim',
                        help='sim: simulated microscope (default); real: config/hardware_real.yaml drivers')
    parser.add_argument('--params-file', help='YAML overriding parameters of any node')
    parser.add_argument('--namespace', default='', help='namespace for every node')
    parser.add_argument('--use-sim-time', action='store_true', help='nodes follow /clock (bag replay)')
    parser.add_argument('--only', help='comma-separated node names to start (default: all)')
    parser.add_argument('--log-dir', help='also write each node log to DIR/<node>.log')
    args = parser.parse_args(argv)
    only = set(args.only.split(',')) if args.only else None
    system = RunningSystem(args.hardware, args.namespace, args.params_file, args.use_sim_time, only,
                           args.log_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f'flake-system: starting {", ".join(s.name for s in system.specs)} ({args.hardware} hardware, '
          f'ROS_DOMAIN_ID={os.environ.get("ROS_DOMAIN_ID", "0")})', flush=True)
    system.start()
    code = 0
    try:
        system.activate_lifecycle_nodes()
        print('flake-system: all nodes up; Ctrl-C stops them', flush=True)
        while not stop.wait(0.5):
            dead = system.dead()
            if dead:
                print(f'flake-system: node(s) exited: {dead}; stopping the rest', file=sys.stderr, flush=True)
                code = 1
                break
    except GraphStartError as error:
        print(f'flake-system: {error}', file=sys.stderr, flush=True)
        code = 1
    finally:
        system.stop()
    return code


if __name__ == '__main__':
    sys.exit(main())
