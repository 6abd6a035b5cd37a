"""``flake-system``: bring the whole node graph up without ``ros2 launch``.

It starts every node of ``flake_scanner.graph`` (one microscope, or a facility of several
with ``--microscope`` once per microscope) as its own process with the same parameter files
and remappings the launch files use, drives the lifecycle nodes to active, waits until every
node offers what it should and answers, relays their logs, and stops them all cleanly on
Ctrl-C, SIGTERM, or when one dies.
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

from flake_scanner.graph import (
    HARDWARE_MODES,
    Microscope,
    Placement,
    command_line,
    facility_graph,
    single_graph,
)


class GraphStartError(RuntimeError):
    """The graph could not be brought up (a node died or a lifecycle transition failed)."""


class RunningSystem:
    """Processes of the node graph. Use ``running_system()`` or ``start``/``stop``."""

    def __init__(self, hardware: str = 'sim', namespace: str = '', params_file: str | None = None,
                 use_sim_time: bool = False, only: set[str] | None = None,
                 log_dir: str | Path | None = None, echo: bool = True,
                 microscopes: list[Microscope] | None = None):
        if microscopes:
            self.placements = facility_graph(microscopes, params_file, only)
        else:
            self.placements = single_graph(hardware, namespace, params_file, only)
        self.specs = [placement.spec for placement in self.placements]
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
        for placement in self.placements:
            command = command_line(placement, self.use_sim_time, executable_dir)
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, bufsize=1, env=dict(os.environ),
                                       start_new_session=True)
            key = placement.key
            self.processes[key] = process
            log_name = key.replace('/', '.')
            log_file = open(self.log_dir / f'{log_name}.log', 'w') if self.log_dir else None  # noqa: SIM115
            if log_file:
                self._log_files.append(log_file)
            thread = threading.Thread(target=self._relay, args=(key, process, log_file), daemon=True)
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
        lifecycle = [p for p in self.placements if p.spec.lifecycle]
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
            for placement in lifecycle:
                key = placement.key
                change = node.create_client(ChangeState, f'{placement.full_name}/change_state')
                get = node.create_client(GetState, f'{placement.full_name}/get_state')
                deadline = time.monotonic() + timeout
                state = None
                while True:
                    if key in self.dead():
                        raise GraphStartError(f'{key} exited with code {self.dead()[key]}; see its log')
                    if time.monotonic() > deadline:
                        where = 'never answered' if state is None else f'stuck in state {state}'
                        raise GraphStartError(f'{key} {where} after {timeout:.0f} s; see its log')
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
                            raise GraphStartError(f'{key} is finalized; see its log')
                        executor.spin_once(timeout_sec=0.2)
                        continue
                    result = answer(change, ChangeState.Request(transition=Transition(id=transition)), 10.0)
                    if result is not None and not result.success:
                        raise GraphStartError(f'{key}: lifecycle transition {transition} failed; see its log')
                node.destroy_client(change)
                node.destroy_client(get)
        finally:
            executor.shutdown()
            node.destroy_node()
            if own_context:
                rclpy.try_shutdown()

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Return once every node offers its interfaces (NodeSpec.ready) and answers a parameter
        request, i.e. has finished starting and spins; GraphStartError names the ones that do not."""
        from rcl_interfaces.srv import GetParameters
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        own_context = not rclpy.ok()
        if own_context:
            rclpy.init()
        node = rclpy.create_node('flake_system_readiness_probe')
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        waiting = {placement.key: placement for placement in self.placements}
        pending: dict[str, object] = {}
        clients = {}
        deadline = time.monotonic() + timeout
        try:
            while waiting:
                dead = {key: code for key, code in self.dead().items() if key in waiting}
                if dead:
                    raise GraphStartError(f'node(s) exited while starting: {dead}; see their logs')
                if time.monotonic() > deadline:
                    raise GraphStartError(f'not ready after {timeout:.0f} s: {", ".join(sorted(waiting))}; '
                                          'see their logs')
                for key, placement in list(waiting.items()):
                    if not _offers(node, placement):
                        continue
                    if key not in clients:
                        clients[key] = node.create_client(GetParameters, f'{placement.full_name}/get_parameters')
                    client = clients[key]
                    future = pending.get(key)
                    if future is None and client.service_is_ready():
                        pending[key] = client.call_async(GetParameters.Request(names=['use_sim_time']))
                    elif future is not None and future.done():
                        del waiting[key]
                executor.spin_once(timeout_sec=0.1)
        finally:
            executor.shutdown()
            node.destroy_node()
            if own_context:
                rclpy.try_shutdown()

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


def _offers(node, placement: Placement) -> bool:
    """Whether the graph shows every interface ``placement``'s node should offer."""
    namespace = placement.namespace or '/'
    name = placement.spec.name
    try:
        services = {n for n, _ in node.get_service_names_and_types_by_node(name, namespace)}
        subscriptions = None
        for item in placement.spec.ready:
            kind, _, relative = item.partition(':')
            resolved = placement.resolve(relative)
            if kind == 'service' and resolved not in services:
                return False
            if kind == 'action' and f'{resolved}/_action/send_goal' not in services:
                return False
            if kind == 'subscription':
                if subscriptions is None:
                    subscriptions = {n for n, _ in node.get_subscriber_names_and_types_by_node(name, namespace)}
                if resolved not in subscriptions:
                    return False
    except Exception:  # noqa: BLE001 - a node not yet discovered is simply not ready
        return False
    return True


@contextmanager
def running_system(**kwargs):
    """Bring the graph up (lifecycle nodes active) for the duration of a ``with`` block."""
    system = RunningSystem(**kwargs)
    system.start()
    try:
        system.activate_lifecycle_nodes()
        system.wait_until_ready()
        yield system
    finally:
        system.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='flake-system',
        description='Run the flake scanner node graph (the pip-only equivalent of '
                    'ros2 launch flake_scanner flake_system.launch.py, or facility.launch.py with --microscope).')
    parser.add_argument('--hardware', choices=HARDWARE_MODES, default='sim',
                        help='sim: simulated microscope (default); real: config/hardware_real.yaml drivers')
    parser.add_argument('--params-file', help='YAML overriding parameters of any node')
    parser.add_argument('--namespace', default='', help='namespace for every node (one microscope)')
    parser.add_argument('--microscope', action='append', default=[], metavar='NAME[:HARDWARE[:PARAMS_FILE]]',
                        help='a facility: one microscope per --microscope, its nodes in /NAME, one registry for all')
    parser.add_argument('--use-sim-time', action='store_true', help='nodes follow /clock (bag replay)')
    parser.add_argument('--only', help='comma-separated node names to start (default: all)')
    parser.add_argument('--log-dir', help='also write each node log to DIR/<node>.log')
    parser.add_argument('--ready-timeout', type=float, default=180.0,
                        help='longest wait for every node to be up [s] (default 180)')
    args = parser.parse_args(argv)
    if args.ready_timeout <= 0:
        parser.error('--ready-timeout must be positive')
    try:
        microscopes = [Microscope.parse(entry) for entry in args.microscope]
        if microscopes and args.namespace:
            parser.error('--microscope places every node in its own namespace: leave out --namespace')
        if args.params_file and not Path(args.params_file).exists():
            parser.error(f'--params-file: {args.params_file} does not exist')
        only = set(args.only.split(',')) if args.only else None
        system = RunningSystem(args.hardware, args.namespace, args.params_file, args.use_sim_time, only,
                               args.log_dir, microscopes=microscopes or None)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    what = (', '.join(f'{m.name} ({m.hardware})' for m in microscopes) if microscopes
            else f'{args.hardware} hardware')
    print(f'flake-system: starting {len(system.placements)} nodes for {what} '
          f'(ROS_DOMAIN_ID={os.environ.get("ROS_DOMAIN_ID", "0")})', flush=True)
    started = time.monotonic()
    system.start()
    code = 0
    try:
        system.activate_lifecycle_nodes()
        system.wait_until_ready(args.ready_timeout)
        print(f'flake-system: all {len(system.placements)} nodes ready after {time.monotonic() - started:.1f} s; '
              'Ctrl-C stops them', flush=True)
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
