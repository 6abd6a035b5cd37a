"""registry_node over real rclpy: detections in, every service and error code, concurrent robots."""

import gc
import json
import math
import random
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import Point, Point32
import numpy as np
import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from ros_helpers import spin_future, spin_until

from flake_core.node_tools import PIPELINE_QOS
from flake_core.ros_image import image_to_numpy, numpy_to_image
from flake_msgs.msg import Flake, FlakeArray, FlakeImage, RegistryEvent
from flake_msgs.srv import (
    AddFlakeImage,
    GetFlake,
    GetRevisitList,
    MarkFlakeUsed,
    QueryFlakes,
    ReleaseFlake,
    ReserveFlake,
)
from flake_registry.nodes.registry_node import SERVICE_QOS, RegistryNode

pytestmark = pytest.mark.ros

UM = 1e-6
MATERIALS = ('graphene', 'hbn', 'mos2')


def make_flake(i, x, y, side=10 * UM, **fields):
    flake = Flake()
    flake.header.frame_id = 'wafer'
    flake.chip_id = 'chip-N'
    flake.material = MATERIALS[i % 3]
    flake.layer_class = Flake.LAYER_MONO if i % 2 == 0 else Flake.LAYER_FEW
    flake.layers = 1.0 if i % 2 == 0 else 4.0
    flake.thickness_nm = 0.34 * flake.layers
    flake.score = 0.5 + 0.04 * i
    flake.detector = 'contrast'
    flake.centre.x, flake.centre.y = x, y
    h = side / 2
    flake.contour.points = [Point32(x=x - h, y=y - h), Point32(x=x + h, y=y - h), Point32(x=x + h, y=y + h),
                            Point32(x=x - h, y=y + h)]
    flake.area = side * side
    flake.bbox.x_offset, flake.bbox.y_offset, flake.bbox.width, flake.bbox.height = 10 * i, 5, 20, 20
    flake.homogeneity = 0.9
    for name, value in fields.items():
        setattr(flake, name, value)
    return flake


class Robot:
    """A client node with its own executor: one per thread."""

    def __init__(self, ros, name):
        self.node = ros.create_node(name)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.clients = {}
        for srv, name in ((QueryFlakes, 'query_flakes'), (GetFlake, 'get_flake'), (ReserveFlake, 'reserve_flake'),
                          (ReleaseFlake, 'release_flake'), (MarkFlakeUsed, 'mark_flake_used'),
                          (GetRevisitList, 'get_revisit_list'), (AddFlakeImage, 'add_flake_image')):
            self.clients[name] = (srv, self.node.create_client(srv, f'/registry/{name}', qos_profile=SERVICE_QOS))

    def call(self, name, **fields):
        srv, client = self.clients[name]
        assert client.wait_for_service(timeout_sec=30.0), f'/registry/{name} not available'
        return spin_future(self.executor, client.call_async(srv.Request(**fields)), timeout=30.0)

    def warm_up(self, attempts=10):
        """Make every client's response path usable before the measured calls.

        A reply sent before DDS has matched a brand-new client's response reader is
        lost, so the first call of each client is a harmless one, retried until answered.
        """
        for name, (srv, client) in self.clients.items():
            assert client.wait_for_service(timeout_sec=30.0), f'/registry/{name} not available'
            request = srv.Request(flake_id='F0000000') if hasattr(srv.Request, 'flake_id') else srv.Request()
            for _ in range(attempts):
                future = client.call_async(request)
                if spin_until(self.executor, future.done, timeout=3.0):
                    break
                client.remove_pending_request(future)
            else:
                raise TimeoutError(f'/registry/{name} never answered')

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()


@pytest.fixture(scope='module')
def registry(ros, tmp_path_factory):
    folder = tmp_path_factory.mktemp('registry')
    node = RegistryNode(parameter_overrides=[Parameter('database_path', value=str(folder / 'registry.sqlite')),
                                             Parameter('diagnostics_period', value=0.2)])
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    robot = Robot(ros, 'registry_test_robot')
    events = []
    robot.node.create_subscription(RegistryEvent, '/registry/events', events.append, PIPELINE_QOS)
    publisher = robot.node.create_publisher(FlakeArray, '/detections', PIPELINE_QOS)
    # Twelve flakes 200 um apart; the thirteenth is flake 0 again from the next tile,
    # the fourteenth has no finite position and is refused.
    flakes = [make_flake(i, (i % 4) * 200 * UM, (i // 4) * 200 * UM) for i in range(12)]
    mask = (np.arange(20 * 20).reshape(20, 20) % 7 == 0).astype(np.uint8) * 255
    flakes[0].mask = numpy_to_image(mask, 'mono8')
    again = make_flake(0, 1.5 * UM, 0.0, score=0.4)
    again.tile_index = 1
    again.scan_id = 'scan-N'
    broken = make_flake(1, math.nan, 0.0)
    batch = FlakeArray(scan_id='scan-N', tile_index=0, flakes=[*flakes, again, broken])
    assert spin_until(robot.executor, lambda: publisher.get_subscription_count() > 0, timeout=30)
    assert spin_until(robot.executor, lambda: robot.node.count_publishers('/registry/events') > 0, timeout=30)
    publisher.publish(batch)
    assert spin_until(robot.executor, lambda: len(events) >= 13, timeout=30), f'{len(events)} events'
    yield node, robot, events, mask
    robot.close()
    executor.shutdown()
    node.close()
    node.destroy_node()
    spinner.join(timeout=10)


def test_long_lived_objects_are_kept_out_of_full_collections(registry):
    # Frozen at start and every gc_freeze_period: a full collection no longer walks them during a call.
    assert gc.get_freeze_count() > 0


def flake_ids(registry, **filters):
    _, robot, _, _ = registry
    response = robot.call('query_flakes', limit=1000, **filters)
    assert response.success, response.message
    return [f.id for f in response.flakes]


def test_detections_are_merged_refused_and_announced(registry):
    node, robot, events, _ = registry
    assert node.stats['batches_stored'] == 1
    assert (node.stats['detections_stored'], node.stats['detections_refused'], node.stats['new_flakes']) == (13, 1, 12)
    kinds = [e.kind for e in events[:13]]
    assert kinds.count(RegistryEvent.NEW_FLAKE) == 12 and kinds.count(RegistryEvent.OBSERVED) == 1
    observed = next(e for e in events if e.kind == RegistryEvent.OBSERVED)
    assert json.loads(observed.detail) == {'scan_id': 'scan-N', 'tile_index': 0}
    assert observed.chip_id == 'chip-N'


def test_query_filters_sort_and_page_through_the_service(registry):
    _, robot, _, _ = registry
    everything = robot.call('query_flakes')
    assert everything.success and everything.total == 12 and len(everything.flakes) == 12
    assert [f.score for f in everything.flakes] == sorted((f.score for f in everything.flakes), reverse=True)
    mono_graphene = robot.call('query_flakes', material='graphene', layer_classes=[Flake.LAYER_MONO])
    assert mono_graphene.total == 2  # flakes 0 and 6
    assert {f.material for f in mono_graphene.flakes} == {'graphene'}
    assert robot.call('query_flakes', layers_min=2.0).total == 6
    assert robot.call('query_flakes', thickness_nm_max=0.5).total == 6
    assert robot.call('query_flakes', use_region=True, region_min_x=150 * UM, region_min_y=-1.0,
                      region_max_x=450 * UM, region_max_y=250 * UM).total == 4
    near = robot.call('query_flakes', use_distance=True, near=Point(x=200 * UM, y=200 * UM),
                      max_distance=210 * UM, sort_by='distance')
    centres = [(round(f.centre.x / UM), round(f.centre.y / UM)) for f in near.flakes]
    assert centres[0] == (200, 200) and sorted(centres[1:]) == [(0, 200), (200, 0), (200, 400), (400, 200)]
    page = robot.call('query_flakes', sort_by='area', ascending=True, limit=5, offset=10)
    assert page.total == 12 and len(page.flakes) == 2
    first = robot.call('query_flakes', material='graphene', layer_classes=[Flake.LAYER_MONO], sort_by='score',
                       ascending=True).flakes[0]
    # Query answers leave outlines out (query_contours: false); GetFlake has them.
    assert len(first.contour.points) == 0 and first.chip_id == 'chip-N' and first.area > 0
    outline = robot.call('get_flake', flake_id=first.id).flake.contour.points
    assert len(outline) == 4


def test_query_contours_switched_on_at_run_time_sends_outlines(registry):
    node, robot, _, _ = registry
    fields = dict(material='graphene', layer_classes=[Flake.LAYER_MONO], sort_by='score', ascending=True)
    lean = robot.call('query_flakes', **fields).flakes
    node.set_parameters([Parameter('query_contours', value=True)])
    try:
        full = robot.call('query_flakes', **fields).flakes
    finally:
        node.set_parameters([Parameter('query_contours', value=False)])
    assert [f.id for f in full] == [f.id for f in lean] and len(full) == 2
    for with_outline, without in zip(full, lean, strict=True):
        assert len(without.contour.points) == 0
        detail = robot.call('get_flake', flake_id=with_outline.id).flake
        assert [(p.x, p.y) for p in with_outline.contour.points] == [(p.x, p.y) for p in detail.contour.points]
        assert len(with_outline.contour.points) == 4
        without.contour = with_outline.contour
        assert without == with_outline  # every other field as in the lean answer
    assert len(robot.call('query_flakes', **fields).flakes[0].contour.points) == 0


@pytest.mark.parametrize('fields, code', [
    ({'layers_min': 5.0, 'layers_max': 2.0}, 'INVALID_RANGE'),
    ({'use_region': True, 'region_min_x': 1.0, 'region_max_x': 0.0}, 'INVALID_RANGE'),
    ({'min_score': 2.0}, 'INVALID_RANGE'),
    ({'limit': 5000}, 'INVALID_RANGE'),
    ({'use_distance': True, 'max_distance': 0.0}, 'INVALID_RANGE'),
    ({'material': 'gold'}, 'INVALID_ARGUMENT'),
    ({'sort_by': 'colour'}, 'INVALID_ARGUMENT'),
    ({'statuses': [9]}, 'INVALID_ARGUMENT'),
])
def test_bad_queries_get_error_codes(registry, fields, code):
    _, robot, _, _ = registry
    response = robot.call('query_flakes', **fields)
    assert (response.success, response.error_code) == (False, code) and response.message


def test_get_flake_returns_outline_mask_and_observations(registry):
    _, robot, _, mask = registry
    flake_id = robot.call('query_flakes', use_distance=True, near=Point(x=0.0, y=0.0),
                          max_distance=5 * UM).flakes[0].id
    response = robot.call('get_flake', flake_id=flake_id)
    assert response.success
    assert response.flake.id == flake_id and response.flake.material == 'graphene'
    assert [(o.scan_id, o.tile_index) for o in response.observations] == [('scan-N', 0), ('scan-N', 1)]
    assert response.observations[1].centre.x == pytest.approx(1.5 * UM)
    assert np.array_equal(image_to_numpy(response.flake.mask), mask)
    assert response.reserved_by == '' and response.flake.status == Flake.STATUS_AVAILABLE
    missing = robot.call('get_flake', flake_id='F7777777')
    assert (missing.success, missing.error_code) == (False, 'UNKNOWN_ID')


def test_reserve_release_mark_used_and_every_error_code(registry):
    _, robot, events, _ = registry
    first, second, third = flake_ids(registry, material='hbn')[:3]
    held = robot.call('reserve_flake', flake_id=first, robot_id='arm-1', lease=60.0)
    assert held.success and len(held.token) >= 32
    assert robot.call('get_flake', flake_id=first).reserved_by == 'arm-1'
    assert first in flake_ids(registry, statuses=[Flake.STATUS_RESERVED])

    def status_in_query(flake_id):
        # The answer is built from reused messages: a change must show up all the same.
        flakes = robot.call('query_flakes', material='hbn', limit=1000).flakes
        return next(f.status for f in flakes if f.id == flake_id)

    assert status_in_query(first) == Flake.STATUS_RESERVED
    assert status_in_query(second) == Flake.STATUS_AVAILABLE

    def code(name, **fields):
        response = robot.call(name, **fields)
        assert not response.success and response.message
        return response.error_code

    assert code('reserve_flake', flake_id=first, robot_id='arm-2') == 'ALREADY_RESERVED'
    assert code('reserve_flake', flake_id='F0000000', robot_id='arm-2') == 'UNKNOWN_ID'
    assert code('reserve_flake', flake_id=second, robot_id='') == 'INVALID_ARGUMENT'
    assert code('reserve_flake', flake_id=second, robot_id='arm-2', lease=-5.0) == 'INVALID_ARGUMENT'
    assert code('release_flake', flake_id=first, token='forged') == 'WRONG_TOKEN'
    assert code('release_flake', flake_id=second, token='forged') == 'NOT_RESERVED'
    assert code('release_flake', flake_id='nope', token='x') == 'UNKNOWN_ID'
    assert code('mark_flake_used', flake_id=first, token='forged') == 'WRONG_TOKEN'
    assert code('mark_flake_used', flake_id=second, token='forged') == 'NOT_RESERVED'
    assert code('mark_flake_used', flake_id='nope', token='x') == 'UNKNOWN_ID'

    assert robot.call('release_flake', flake_id=first, token=held.token).success
    assert status_in_query(first) == Flake.STATUS_AVAILABLE
    again = robot.call('reserve_flake', flake_id=first, robot_id='arm-2')
    assert robot.call('mark_flake_used', flake_id=first, token=again.token, note='stack 3').success
    assert code('reserve_flake', flake_id=first, robot_id='arm-1') == 'ALREADY_USED'
    assert robot.call('get_flake', flake_id=first).flake.status == Flake.STATUS_USED
    assert status_in_query(first) == Flake.STATUS_USED

    short = robot.call('reserve_flake', flake_id=third, robot_id='arm-1', lease=0.2)
    assert short.success
    expires = short.lease_expires.sec + short.lease_expires.nanosec * 1e-9
    spin_until(robot.executor, lambda: time.time() > expires + 0.05, timeout=10)
    assert code('mark_flake_used', flake_id=third, token=short.token) == 'LEASE_EXPIRED'

    assert spin_until(robot.executor, lambda: [e.kind for e in events[13:]].count('reserved') >= 3, timeout=10)
    mine = [(e.kind, e.flake_id, e.robot_id) for e in events[13:]]
    assert mine[:4] == [('reserved', first, 'arm-1'), ('released', first, 'arm-1'), ('reserved', first, 'arm-2'),
                        ('used', first, 'arm-2')]


def test_eight_robots_racing_for_the_same_flakes_never_share_one(registry, ros):
    _, robot, _, _ = registry
    contested = flake_ids(registry, material='mos2') + flake_ids(registry, material='graphene',
                                                                  statuses=[Flake.STATUS_AVAILABLE])
    assert len(contested) >= 6
    robots = [Robot(ros, f'racing_robot_{i}') for i in range(8)]
    results = [[] for _ in robots]
    start = threading.Barrier(len(robots))

    def race(index):
        order = list(contested)
        random.Random(index).shuffle(order)
        robots[index].warm_up()
        start.wait(timeout=60)
        for flake_id in order:
            response = robots[index].call('reserve_flake', flake_id=flake_id, robot_id=f'robot-{index}', lease=60.0)
            results[index].append((flake_id, response.success, response.error_code, response.token))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(robots))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for r in robots:
            r.close()
    assert all(len(r) == len(contested) for r in results)
    owners = {}
    for index, attempts in enumerate(results):
        for flake_id, success, error_code, _ in attempts:
            if success:
                assert flake_id not in owners, f'{flake_id} has two owners'
                owners[flake_id] = f'robot-{index}'
            else:
                assert error_code == 'ALREADY_RESERVED'
    assert set(owners) == set(contested)
    for flake_id, owner in owners.items():
        assert robot.call('get_flake', flake_id=flake_id).reserved_by == owner


def test_revisit_list_and_stored_revisit_image(registry, tmp_path):
    node, robot, events, _ = registry
    # A chip of its own, so that the other tests' reservations do not matter here.
    publisher = robot.node.create_publisher(FlakeArray, '/detections', PIPELINE_QOS)
    chip = [make_flake(i, i * 100 * UM, 0.0, chip_id='chip-R', score=0.7 + 0.05 * i) for i in range(5)]
    assert spin_until(robot.executor, lambda: publisher.get_subscription_count() > 0, timeout=30)
    publisher.publish(FlakeArray(scan_id='scan-R', flakes=chip))
    assert spin_until(robot.executor, lambda: sum(e.chip_id == 'chip-R' for e in events) == 5, timeout=30)
    robot.node.destroy_publisher(publisher)
    listed = robot.call('get_revisit_list', chip_id='chip-R', min_score=0.8)
    assert listed.success
    scores = [round(f.score, 2) for f in listed.flakes]
    assert scores == [0.9, 0.85, 0.8]
    assert all(f.status == Flake.STATUS_AVAILABLE for f in listed.flakes)
    assert len(robot.call('get_revisit_list', chip_id='chip-R', min_score=0.8, limit=2).flakes) == 2
    target = listed.flakes[0].id
    pixels = np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    stored = robot.call('add_flake_image', flake_id=target,
                        image=FlakeImage(role='revisit', objective='100x', pixel_size=69e-9),
                        pixels=numpy_to_image(pixels, 'bgr8'))
    assert stored.success, stored.message
    import cv2
    assert np.array_equal(cv2.imread(stored.path), pixels)
    assert [f.id for f in robot.call('get_revisit_list', chip_id='chip-R', min_score=0.8).flakes] == [
        f.id for f in listed.flakes[1:]]
    images = robot.call('get_flake', flake_id=target).images
    assert [(i.role, i.path, i.objective) for i in images] == [('revisit', stored.path, '100x')]
    by_path = robot.call('add_flake_image', flake_id=target, image=FlakeImage(role='crop', path='crops/c1.png'))
    assert by_path.success and by_path.path == 'crops/c1.png'
    assert robot.call('add_flake_image', flake_id='F0', image=FlakeImage(role='crop', path='a.png')
                      ).error_code == 'UNKNOWN_ID'
    assert robot.call('add_flake_image', flake_id=target, image=FlakeImage(role='selfie', path='a.png')
                      ).error_code == 'INVALID_ARGUMENT'
    bad = numpy_to_image(pixels, 'bgr8')
    bad.data = bad.data[:100]
    assert robot.call('add_flake_image', flake_id=target, image=FlakeImage(role='revisit'), pixels=bad
                      ).error_code == 'INVALID_IMAGE'
    assert robot.call('get_revisit_list', limit=5000).error_code == 'INVALID_RANGE'


def test_diagnostics_report_the_ingest_counters(registry):
    node, robot, _, _ = registry
    seen = []
    subscription = robot.node.create_subscription(DiagnosticArray, '/diagnostics', seen.append, 10)
    try:
        assert spin_until(robot.executor, lambda: any(s.name == 'registry_node: database'
                                                      for a in seen for s in a.status), timeout=30)
    finally:
        robot.node.destroy_subscription(subscription)
    status = next(s for a in seen for s in a.status if s.name == 'registry_node: database')
    values = {kv.key: kv.value for kv in status.values}
    assert values['detections_refused'] == '1' and values['batches_dropped'] == '0'
    assert int(values['new_flakes']) == node.stats['new_flakes'] >= 12
    assert status.hardware_id == str(node.store.path)
    assert status.level in (DiagnosticStatus.WARN, DiagnosticStatus.WARN[0])  # a refused detection warns


def test_unreadable_flake_is_refused_and_ingest_goes_on(registry):
    node, robot, events, _ = registry
    refused_before = node.stats['detections_refused']
    broken = make_flake(0, 0.0, 0.0, chip_id='chip-U')
    broken.mask = numpy_to_image(np.zeros((20, 20), np.uint8), 'mono8')
    broken.mask.data = broken.mask.data[:50]  # says 20 x 20, carries 50 bytes
    good = make_flake(1, 500 * UM, 0.0, chip_id='chip-U')
    publisher = robot.node.create_publisher(FlakeArray, '/detections', PIPELINE_QOS)
    assert spin_until(robot.executor, lambda: publisher.get_subscription_count() > 0, timeout=30)
    publisher.publish(FlakeArray(scan_id='scan-U', flakes=[broken, good]))
    assert spin_until(robot.executor, lambda: any(e.chip_id == 'chip-U' for e in events), timeout=30)
    robot.node.destroy_publisher(publisher)
    assert node.stats['detections_refused'] == refused_before + 1
    assert [e.kind for e in events if e.chip_id == 'chip-U'] == [RegistryEvent.NEW_FLAKE]
    assert robot.call('query_flakes', chip_id='chip-U').total == 1


def test_message_cache_reuses_only_unchanged_flakes():
    from dataclasses import replace

    from flake_registry.nodes.conversions import FlakeMessageCache
    from flake_registry.store import FlakeRecord

    record = FlakeRecord(id='F0000001', chip_id='c', scan_id='s', tile_index=0, material='hbn', layer_class=1,
                         layers=1.0, layers_std=0.0, thickness_nm=0.3, thickness_nm_std=0.0, score=0.9,
                         detector='contrast', model_version='', x=1e-3, y=2e-3, contour=[(0.0, 0.0)] * 3,
                         area=1e-10, bbox_px=(1, 2, 3, 4), homogeneity=0.5, isolation_distance=0.0,
                         edge_straightness=0.0, status=1, n_observations=1, created=1.0, updated=1.0,
                         detected_at=1.0)
    cache = FlakeMessageCache(2)
    first = cache.message(record)
    assert cache.message(record) is first and len(first.contour.points) == 0
    assert cache.message(record, contour=True) is not first
    reserved = cache.message(replace(record, status=2, reserved_by='arm', lease_expires=5.0))
    assert reserved.status == 2 and first.status == 1
    assert cache.message(replace(record, updated=2.0, score=0.95)).score == pytest.approx(0.95)
    assert (cache.hits, cache.misses) == (1, 4)
    assert cache.message(record) is not first  # evicted: the cache holds 2
    assert FlakeMessageCache(0).message(record) is not FlakeMessageCache(0).message(record)
