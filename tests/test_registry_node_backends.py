"""registry_node on SQLite and on PostgreSQL (database_url): the same services, one winner per flake."""

import threading

import pytest
from rclpy.executors import SingleThreadedExecutor
from registry_backends import postgres_server, registry_url  # noqa: F401 - fixtures
from registry_helpers import make_flake, running_registry
from ros_helpers import spin_until

from flake_core.node_tools import PIPELINE_QOS
from flake_msgs.msg import FlakeArray
from flake_registry.client import AlreadyReservedError, RegistryClient

pytestmark = pytest.mark.ros

UM = 1e-6


def test_same_services_and_one_winner_per_flake_on_both_backends(ros, registry_url, tmp_path):  # noqa: F811
    postgres = registry_url.startswith('postgresql')
    parameters = {'database_url': registry_url} if postgres else {}
    with running_registry(registry_url if not postgres else tmp_path / 'unused.sqlite', **parameters) as node, \
            RegistryClient(robot_id='arm-0') as robot:
        assert node.store.dialect == ('postgresql' if postgres else 'sqlite')
        scanner = ros.create_node('backend_test_scanner')
        executor = SingleThreadedExecutor()
        executor.add_node(scanner)
        publisher = scanner.create_publisher(FlakeArray, '/detections', PIPELINE_QOS)
        assert spin_until(executor, lambda: publisher.get_subscription_count() > 0, timeout=30)
        flakes = [make_flake(i * 100 * UM, 0.0, chip_id='chip-B', score=0.5 + 0.05 * i) for i in range(6)]
        flakes.append(make_flake(1 * UM, 0.0, chip_id='chip-B', score=0.4))  # flake 0 seen again
        publisher.publish(FlakeArray(scan_id='scan-B', flakes=flakes))
        assert spin_until(executor, lambda: node.stats['batches_stored'] == 1, timeout=30)
        executor.shutdown()
        scanner.destroy_node()

        found = robot.query(chip_id='chip-B', sort_by='score')
        assert found.total == 6 and [round(f.score, 2) for f in found] == [0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
        assert len(robot.get(found[-1].id).observations) == 2

        # Four robots race for the same three flakes: one winner each, and the registry agrees.
        contested = [f.id for f in found[:3]]
        robots = [RegistryClient(robot_id=f'arm-{i}') for i in range(1, 5)]
        won: dict[str, list[str]] = {flake_id: [] for flake_id in contested}
        start = threading.Barrier(len(robots))

        def race(client):
            client.get(contested[0])  # connected before the race starts
            start.wait()
            for flake_id in contested:
                try:
                    client.reserve(flake_id, lease=60.0)
                    won[flake_id].append(client.robot_id)
                except AlreadyReservedError:
                    pass

        threads = [threading.Thread(target=race, args=(client,)) for client in robots]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        for client in robots:
            client.close()
        for flake_id, winners in won.items():
            assert len(winners) == 1, (flake_id, winners)
            assert robot.get(flake_id).reserved_by == winners[0]

        claim = robot.reserve(found[4].id, lease=30.0)
        claim.mark_used(note='stack 1')
        assert robot.get(found[4].id).flake.status == 3  # STATUS_USED
