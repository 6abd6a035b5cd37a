"""flake_registry.client against a real registry_node: the documented robot script, typed errors,
claims that release themselves, bursts of concurrent calls, and stack recipes."""

from pathlib import Path
import re
import subprocess
import sys
import threading

import pytest
from registry_helpers import running_registry

from flake_core.node_tools import SERVICE_QOS
from flake_msgs.msg import Flake
from flake_registry import stacks
from flake_registry.client import (
    AlreadyReservedError,
    AlreadyUsedError,
    InvalidArgumentError,
    InvalidRangeError,
    NotReservedError,
    RegistryClient,
    RegistryServiceError,
    RegistryUnavailableError,
    UnknownIdError,
    WrongTokenError,
)
from flake_registry.query import RegistryError
from flake_registry.store import FlakeStore, Sighting

pytestmark = pytest.mark.ros

UM = 1e-6
# Calls wait this long before a test calls them hung: a guard, not a speed limit (loaded CI hosts).
HANG_GUARD = 120.0
DOC = Path(__file__).resolve().parents[1] / 'docs' / 'registry.md'
SCRIPT_MARKER = '<!-- robot script: run as written by tests/test_registry_client.py -->'


def documented_robot_script() -> str:
    """The Python block that follows the marker in docs/registry.md, exactly as a reader sees it."""
    text = DOC.read_text()
    assert SCRIPT_MARKER in text, 'docs/registry.md lost its robot script'
    match = re.search(r'```python\n(.*?)```', text[text.index(SCRIPT_MARKER):], re.S)
    return match.group(1)


@pytest.fixture(scope='module')
def registry(ros, tmp_path_factory):
    path = tmp_path_factory.mktemp('client') / 'registry.sqlite'
    with FlakeStore(path) as store:
        # Monolayer graphene (the robot script's target), largest first: F1..F3; hBN and MoS2 around them.
        store.ingest([Sighting('chip-C', 'scan-C', x=i * 300 * UM, y=0.0, material='graphene', layer_class=1,
                                layers=1.0, score=0.95, area=(400 - 100 * i) * UM * UM) for i in range(3)]
                     + [Sighting('chip-C', 'scan-C', x=i * 300 * UM, y=600 * UM, material=('hbn', 'mos2')[i % 2],
                                  layer_class=2, layers=4.0, score=0.5 + 0.01 * i, area=50 * UM * UM)
                        for i in range(50)])
    with running_registry(path) as node, RegistryClient(robot_id='test-robot', timeout=HANG_GUARD) as client:
        yield node, client


def test_client_and_registry_use_the_one_deep_service_qos(registry):
    node, client = registry
    assert SERVICE_QOS.depth >= 40
    client.get('F0000001')
    for name, service_client in client._clients.items():
        assert service_client.qos_profile == SERVICE_QOS, name
    served = {service.srv_name.lstrip('/'): service.qos_profile for service in node.services}
    for name in ('query_flakes', 'reserve_flake', 'get_stack_recipe', 'save_wafer_frame', 'get_wafer_frames'):
        assert served[f'registry/{name}'] == SERVICE_QOS, (name, sorted(served))


def test_the_documented_robot_script_reserves_and_marks_a_flake_used(registry):
    node, client = registry
    script = documented_robot_script()
    assert len(script.strip().splitlines()) < 20
    # Another robot holds the largest monolayer: the script must move on to the next one.
    held = client.reserve('F0000001', lease=600.0, robot_id='arm-2')
    try:
        run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        assert 'picking F0000002' in run.stdout
        used = node.store.get_flake('F0000002').flake
        assert (used.status, used.used_by, used.used_note) == (Flake.STATUS_USED, 'arm-1', 'stack 7, layer 1')
        assert node.store.get_flake('F0000001').flake.reserved_by == 'arm-2'
        assert node.store.get_flake('F0000003').flake.status == Flake.STATUS_AVAILABLE
    finally:
        held.release()


def test_query_with_keyword_filters(registry):
    _, client = registry
    mono = client.query(material='graphene', layer_classes=['mono'], sort_by='area', limit=2)
    assert mono.total == 3 and len(mono) == 2
    assert [f.area for f in mono] == sorted((f.area for f in mono), reverse=True)
    page = client.query(material='hbn', limit=5, offset=20)
    assert page.total == 25 and len(page) == 5 and {f.material for f in page} == {'hbn'}
    near = client.query(near=(0.0, 600 * UM), max_distance=350 * UM, sort_by='distance')
    assert [round(f.centre.x / UM) for f in near] == [0, 300]
    region = client.query(region=(-1.0, -1.0, 1.0, 100 * UM))
    assert region.total == 3
    assert [f.id for f in client.query(statuses=['used'])] == ['F0000002']  # by the robot script


def test_refusals_raise_typed_errors_with_the_service_codes(registry):
    _, client = registry
    with pytest.raises(UnknownIdError) as missing:
        client.get('F9999999')
    assert missing.value.code == 'UNKNOWN_ID' and 'F9999999' in missing.value.message
    assert isinstance(missing.value, RegistryError) and missing.value.service == 'get_flake'
    with pytest.raises(InvalidRangeError):
        client.query(layers_min=5.0, layers_max=2.0)
    with pytest.raises(InvalidArgumentError):
        client.query(material='gold')
    with pytest.raises(InvalidArgumentError):
        client.query(layer_classes=['huge'])  # refused before the call, with the registry's code
    with pytest.raises(InvalidArgumentError):
        client.query(max_distance=1e-3)
    with pytest.raises(InvalidArgumentError):
        client.reserve('F0000004', lease=-1.0)
    with pytest.raises(WrongTokenError):
        held = client.reserve('F0000004', lease=30.0)
        try:
            client.release('F0000004', 'forged')
        finally:
            held.release()
    with pytest.raises(NotReservedError):
        client.release('F0000004', 'forged')


def test_a_claim_releases_its_flake_on_leaving_the_block(registry):
    _, client = registry
    # F0000004 onwards alternate hBN (even) and MoS2 (odd); these tests take hBN only.
    with client.reserve('F0000006', lease=60.0) as claim:
        assert client.get('F0000006').reserved_by == 'test-robot'
        with pytest.raises(AlreadyReservedError) as taken:
            client.reserve('F0000006', robot_id='arm-9')
        assert "'test-robot'" in taken.value.message
    assert claim.outcome == 'released' and client.get('F0000006').reserved_by == ''

    with pytest.raises(RuntimeError, match='gripper'), client.reserve('F0000008', lease=60.0):
        raise RuntimeError('gripper jammed')  # the robot's own error comes through ...
    assert client.get('F0000008').reserved_by == ''  # ... and the flake is free again

    with client.reserve('F0000014', lease=60.0) as claim:
        claim.mark_used(note='stack 1')
    assert claim.outcome == 'used' and client.get('F0000014').flake.status == Flake.STATUS_USED
    with pytest.raises(AlreadyUsedError):
        client.reserve('F0000014')


def test_forty_concurrent_calls_from_one_process_are_all_answered(registry):
    # A robot's burst: 40 threads share one client; every call gets its own answer.
    _, client = registry
    flake_ids = [f.id for f in client.query(material='mos2', limit=40)]
    assert len(flake_ids) == 25
    targets = flake_ids + flake_ids[:15]  # 15 flakes asked for twice: one winner each
    answers = [None] * len(targets)
    start = threading.Barrier(len(targets))

    def reserve(index):
        start.wait(timeout=60)
        try:
            answers[index] = client.reserve(targets[index], lease=60.0, robot_id=f'burst-{index}')
        except RegistryServiceError as error:
            answers[index] = error

    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(answer is not None for answer in answers)
    won = [a for a in answers if not isinstance(a, RegistryServiceError)]
    lost = [a for a in answers if isinstance(a, RegistryServiceError)]
    assert len(won) == 25 and sorted(c.flake_id for c in won) == sorted(flake_ids)
    assert len(lost) == 15 and all(isinstance(e, AlreadyReservedError) for e in lost)
    for claim in won:
        claim.release()


def test_stack_recipe_from_the_web_planner_is_fetched_and_marked_used(registry):
    node, client = registry
    recipe = stacks.save_recipe(node.store, 'hBN/graphene', [stacks.StackLayer('F0000010'),
                                                           stacks.StackLayer('F0000012', rotation=0.5)])
    with pytest.raises(NotReservedError):
        client.mark_stack_used(client.stack_recipe(recipe.id))
    stacks.reserve_recipe(node.store, recipe.id, 'arm-3', 120.0)
    fetched = client.stack_recipe(recipe.id)
    assert [layer.flake_id for layer in fetched.layers] == ['F0000010', 'F0000012']
    assert fetched.robot_id == 'arm-3' and all(layer.token for layer in fetched.layers)
    assert fetched.layers[1].rotation == pytest.approx(0.5)
    assert client.mark_stack_used(fetched) == ['F0000010', 'F0000012']
    assert node.store.get_flake('F0000010').flake.used_note == 'stack hBN/graphene, layer 0'
    with pytest.raises(UnknownIdError):
        client.stack_recipe('S000000000000')


def test_no_registry_on_the_namespace_is_reported_not_waited_for(ros):
    with RegistryClient(namespace='nobody_here', connect_timeout=1.0) as client, \
            pytest.raises(RegistryUnavailableError) as error:
        client.get('F0000001')
    assert error.value.code == 'UNAVAILABLE' and '/nobody_here/registry/get_flake' in error.value.message
