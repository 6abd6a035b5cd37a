"""Size limits and data-folder paths of registry service requests (pure: no ROS graph)."""

import os

from geometry_msgs.msg import Point32
import pytest

from flake_msgs.msg import Flake
from flake_msgs.srv import AddFlakeImage, GetRevisitList, MarkFlakeUsed, QueryFlakes, ReserveFlake
from flake_registry.nodes.request_limits import (
    DEFAULT_TEXT,
    LIST_LIMITS,
    TEXT_LIMITS,
    check_message,
    confine_path,
)
from flake_registry.query import RegistryError


def refusal(call, *args):
    with pytest.raises(RegistryError) as error:
        call(*args)
    return error.value.code, error.value.message


@pytest.mark.parametrize('request_msg, field, length', [
    (ReserveFlake.Request(flake_id='F0000001', robot_id='r' * 200_000), 'robot_id', 200_000),
    (MarkFlakeUsed.Request(flake_id='F0000001', token='t', note='n' * 1_000_000), 'note', 1_000_000),
    (QueryFlakes.Request(chip_id='c' * 129), 'chip_id', 129),
    (QueryFlakes.Request(sort_by='s' * 33), 'sort_by', 33),
    (GetRevisitList.Request(materials=['graphene', 'm' * 40]), 'materials', 40),
])
def test_long_text_is_refused_naming_field_and_limit(request_msg, field, length):
    code, message = refusal(check_message, request_msg)
    assert code == 'INVALID_ARGUMENT'
    assert message == f'{field} has {length} characters; at most {TEXT_LIMITS[field]}'


def test_nested_text_lists_and_pixels_are_limited():
    request = AddFlakeImage.Request(flake_id='F0000001')
    request.image.path = 'p' * 5000
    assert refusal(check_message, request) == ('INVALID_ARGUMENT', 'image.path has 5000 characters; at most 1024')
    request = AddFlakeImage.Request(flake_id='F0000001')
    request.pixels.header.frame_id = 'f' * (DEFAULT_TEXT * 4)
    assert refusal(check_message, request)[1].startswith('pixels.header.frame_id has 1024 characters')
    request = AddFlakeImage.Request(flake_id='F0000001')
    request.pixels.data = bytes(LIST_LIMITS['pixels.data'] + 1)
    code, message = refusal(check_message, request)
    assert code == 'INVALID_IMAGE' and message.startswith('pixels.data has 67108865 elements')
    assert refusal(check_message, QueryFlakes.Request(layer_classes=[1] * 17))[0] == 'INVALID_ARGUMENT'
    assert refusal(check_message, ReserveFlake.Request(flake_id='F1\x00', robot_id='a'))[1] == \
        'flake_id contains a NUL character'


def test_requests_within_the_limits_pass():
    check_message(ReserveFlake.Request(flake_id='F0000001', robot_id='r' * 64, lease=10.0))
    check_message(MarkFlakeUsed.Request(flake_id='F0000001', token='t' * 32, note='n' * 1000))
    check_message(QueryFlakes.Request(material='graphene', layer_classes=[0, 1, 2, 3, 4], statuses=[1, 2]))
    flake = Flake(chip_id='chip-1')
    flake.contour.points = [Point32(x=float(i), y=0.0) for i in range(500)]
    check_message(flake)
    flake.contour.points = [Point32()] * (LIST_LIMITS['contour.points'] + 1)
    assert refusal(check_message, flake)[0] == 'INVALID_ARGUMENT'


def test_image_paths_stay_inside_the_data_folder(tmp_path):
    data = tmp_path / 'data'
    (data / 'crops').mkdir(parents=True)
    (data / 'crops' / 'c1.png').write_bytes(b'png')
    (data / 'notes.txt').write_text('x')
    outside = tmp_path / 'secret.png'
    outside.write_bytes(b'png')
    os.symlink(outside, data / 'crops' / 'link.png')

    assert confine_path('crops/c1.png', data) == 'crops/c1.png'
    assert confine_path(str(data / 'crops' / 'c1.png'), data) == 'crops/c1.png'
    for path, why in (('/etc/passwd', 'lies outside the folder'), (str(outside), 'lies outside the folder'),
                      ('crops/link.png', 'lies outside the folder'), ('../../etc/passwd', 'climbs out of its folder'),
                      ('crops/../../secret.png', 'climbs out of its folder'), ('notes.txt', 'is not of a kind'),
                      ('crops/missing.png', "no image 'crops/missing.png'"), ('registry.sqlite', 'no image')):
        code, message = refusal(confine_path, path, data)
        assert code == 'INVALID_ARGUMENT' and message.startswith('image path refused: ') and why in message, path
    assert refusal(confine_path, '  ', data)[1] == 'image path is empty'
    # An image directory configured elsewhere is a second root; its paths stay absolute.
    assert confine_path(str(outside), data, (tmp_path,)) == str(outside.resolve())


def test_blank_robot_ids_tiny_leases_and_a_second_mark_used_are_refused(tmp_path):
    from flake_registry.store import FlakeStore, Sighting

    with FlakeStore(tmp_path / 'registry.sqlite') as store:
        flake_id = store.ingest([Sighting('chip', 'scan', x=0.0, y=0.0, material='graphene', score=0.9)])[0].flake_id
        for robot_id in ('', '   ', '\t', 'arm 1', 'r' * 65, 'arm\x07'):
            code, message = refusal(store.reserve, flake_id, robot_id, 10.0)
            assert code == 'INVALID_ARGUMENT' and 'robot_id' in message, robot_id
        for lease in (1e-9, 0.5):
            assert refusal(store.reserve, flake_id, 'arm-1', lease) == (
                'INVALID_ARGUMENT', f'lease {lease:g} s is below the minimum 1 s (0 asks for the default lease)')
        held = store.reserve(flake_id, 'arm-1', 1.0)
        store.mark_used(flake_id, held.token, 'stack 1')
        assert refusal(store.mark_used, flake_id, held.token) == ('ALREADY_USED', f'flake {flake_id} was already used')
        assert refusal(store.reserve, flake_id, 'arm-2')[0] == 'ALREADY_USED'
