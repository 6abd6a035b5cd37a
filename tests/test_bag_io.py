"""Bag files: the independent MCAP reader, sqlite3 storage, and clear errors for bad bags."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from flake_core.ros_image import image_to_numpy, numpy_to_image
from flake_scanner.bag.io import (
    FLAKE_ARRAY_TYPE,
    SCAN_FRAME_TYPE,
    BagError,
    BagNotFoundError,
    BagReader,
    BagWriter,
    CorruptBagError,
    NoFramesError,
    TruncatedBagError,
    UnknownTypeError,
    scan_frames,
)
from flake_scanner.bag.types import interface_definitions, typestore

FRAMES = 12


def _frame_bytes(index: int, size: int = 16) -> bytes:
    from rclpy.serialization import serialize_message

    from flake_msgs.msg import ScanFrame

    frame = ScanFrame(scan_id='scan-io', tile_index=index, pixel_size=2e-6)
    frame.image = numpy_to_image(np.full((size, size, 3), index, np.uint8), 'bgr8')
    return serialize_message(frame)


def _write_bag(path, storage='mcap', frames=FRAMES, with_flakes=True):
    from rclpy.serialization import serialize_message

    from flake_msgs.msg import FlakeArray

    with BagWriter(path, storage=storage) as writer:
        writer.add_topic('/scan/tiles', SCAN_FRAME_TYPE)
        writer.add_topic('/detections', FLAKE_ARRAY_TYPE)
        for index in range(frames):
            writer.write('/scan/tiles', 10**9 + index * 10**7, _frame_bytes(index))
        if with_flakes:
            writer.write('/detections', 2 * 10**9, serialize_message(FlakeArray(scan_id='scan-io')))
    return path


def test_every_flake_msgs_type_is_registered_with_rosidl_hashes():
    import json
    from pathlib import Path

    from ament_index_python.packages import get_package_share_directory

    names = interface_definitions()
    assert {'flake_msgs/msg/ScanFrame', 'flake_msgs/msg/FlakeArray',
            'flake_msgs/action/Scan_FeedbackMessage'} <= set(names)
    store = typestore()
    share = Path(get_package_share_directory('flake_msgs'))
    # action feedback travels on a topic: its Python class is found for replay and recording
    from flake_scanner.bag.types import python_message_class

    assert python_message_class('flake_msgs/action/Scan_FeedbackMessage').__name__ == 'Scan_FeedbackMessage'
    assert python_message_class('flake_msgs/action/Scan_Goal').__name__ == 'Scan_Goal'
    with pytest.raises(LookupError, match='acme_msgs/msg/Widget'):
        python_message_class('acme_msgs/msg/Widget')
    for name in ('ScanFrame', 'Flake', 'FlakeArray', 'StageState'):
        described = json.loads((share / 'msg' / f'{name}.json').read_text())
        assert store.hash_rihs01(f'flake_msgs/msg/{name}') == described['type_hashes'][0]['hash_string']


def test_mcap_bag_is_read_by_the_independent_mcap_reader(ros, tmp_path):
    from mcap.reader import make_reader

    bag = _write_bag(tmp_path / 'bag')
    (mcap_file,) = bag.glob('*.mcap')
    with mcap_file.open('rb') as stream:
        reader = make_reader(stream)
        assert reader.get_header().profile == 'ros2'
        summary = reader.get_summary()
        schemas = {s.name: s.encoding for s in summary.schemas.values()}
        assert schemas == {SCAN_FRAME_TYPE: 'ros2msg', FLAKE_ARRAY_TYPE: 'ros2msg'}
        counts = {summary.channels[c].topic: n for c, n in summary.statistics.channel_message_counts.items()}
        assert counts == {'/scan/tiles': FRAMES, '/detections': 1}
    with mcap_file.open('rb') as stream:
        tiles = [m for _, c, m in make_reader(stream).iter_messages(topics=['/scan/tiles'])]
    assert [m.log_time for m in tiles] == [10**9 + i * 10**7 for i in range(FRAMES)]
    # Compare what the bytes mean: CDR alignment padding is undefined and may differ byte for byte.
    from rclpy.serialization import deserialize_message

    from flake_msgs.msg import ScanFrame

    frame = deserialize_message(tiles[5].data, ScanFrame)
    assert (frame.scan_id, frame.tile_index, frame.pixel_size) == ('scan-io', 5, 2e-6)
    assert (frame.image.width, frame.image.height, frame.image.encoding) == (16, 16, 'bgr8')
    assert np.array_equal(image_to_numpy(frame.image), np.full((16, 16, 3), 5, np.uint8))
    metadata = (bag / 'metadata.yaml').read_text()
    assert 'version: 9' in metadata and 'storage_identifier: mcap' in metadata


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_frames_round_trip_through_both_storages(ros, tmp_path, storage):
    bag = _write_bag(tmp_path / 'bag', storage=storage)
    with BagReader(bag) as reader:
        assert reader.storage == storage
        assert reader.topics['/scan/tiles'].count == FRAMES
        assert reader.message_count == FRAMES + 1
        frames = list(scan_frames(reader))
    assert [f.tile_index for _, f in frames] == list(range(FRAMES))
    pixels = image_to_numpy(frames[3][1].image)
    assert pixels.shape == (16, 16, 3) and int(pixels[0, 0, 1]) == 3
    # a bare storage file (no metadata.yaml) opens too
    (storage_file,) = [p for p in bag.iterdir() if p.suffix in ('.mcap', '.db3')]
    with BagReader(storage_file) as reader:
        assert len(list(reader.messages(['/scan/tiles']))) == FRAMES


def test_truncated_bag_gives_a_clear_error(ros, tmp_path):
    bag = _write_bag(tmp_path / 'bag')
    (mcap_file,) = bag.glob('*.mcap')
    data = mcap_file.read_bytes()
    mcap_file.write_bytes(data[:len(data) // 2])
    with pytest.raises(TruncatedBagError, match='truncated'):
        with BagReader(bag) as reader:
            list(reader.messages())


def test_corrupt_bags_give_clear_errors(ros, tmp_path):
    bag = _write_bag(tmp_path / 'mcap')
    (mcap_file,) = bag.glob('*.mcap')
    data = bytearray(mcap_file.read_bytes())
    data[100:400] = np.random.default_rng(3).integers(0, 256, 300, dtype=np.uint8).tobytes()
    mcap_file.write_bytes(bytes(data))
    with pytest.raises(CorruptBagError, match=str(bag.name)):
        with BagReader(bag) as reader:
            list(reader.messages())

    sqlite_bag = _write_bag(tmp_path / 'sqlite', storage='sqlite3')
    (db_file,) = sqlite_bag.glob('*.db3')
    db_file.write_bytes(b'SQLite format 3\x00' + bytes(4000))
    with pytest.raises(CorruptBagError, match='corrupt'):
        with BagReader(sqlite_bag) as reader:
            list(reader.messages())

    metadata_bag = _write_bag(tmp_path / 'metadata')
    (metadata_bag / 'metadata.yaml').write_text('rosbag2_bagfile_information: [not, a, mapping\n')
    with pytest.raises(CorruptBagError):
        BagReader(metadata_bag)

    with pytest.raises(BagNotFoundError):
        BagReader(tmp_path / 'missing')
    empty_dir = tmp_path / 'empty'
    empty_dir.mkdir()
    with pytest.raises(CorruptBagError, match='metadata.yaml'):
        BagReader(empty_dir)


def test_unknown_type_is_named(ros, tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer

    bag = tmp_path / 'foreign'
    widget_def = 'int32 count\nstring label\n'
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        known = writer.add_connection('/widget', 'acme_msgs/msg/Widget', msgdef=widget_def,
                                      rihs01='RIHS01_' + '0' * 64)
        opaque = writer.add_connection('/opaque', 'acme_msgs/msg/Opaque', msgdef='',
                                       rihs01='RIHS01_' + '1' * 64)
        writer.write(known, 5, bytes([0, 1, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, b'h'[0], b'i'[0], 0, 0]))
        writer.write(opaque, 6, bytes([0, 1, 0, 0, 1, 2, 3, 4]))
    with BagReader(bag) as reader:
        widget, opaque_message = list(reader.messages())
        # the definition travelling in the bag is enough to decode it offline
        decoded = reader.deserialize(widget)
        assert decoded.count == 7 and decoded.label == 'hi'
        with pytest.raises(UnknownTypeError, match='acme_msgs/msg/Opaque'):
            reader.deserialize(opaque_message)
        with pytest.raises(NoFramesError, match='holds no flake_msgs/msg/ScanFrame'):
            list(scan_frames(reader))
    # and replay refuses it by name, since nothing here can publish that type
    from rclpy.parameter import Parameter

    from flake_scanner.bag.replay import BagReplayer

    with pytest.raises(UnknownTypeError, match='cannot replay /opaque: message type acme_msgs/msg/Opaque'):
        BagReplayer(parameter_overrides=[Parameter('bag', value=str(bag))])
    with pytest.raises(BagError, match='nothing to replay'):
        BagReplayer(parameter_overrides=[Parameter('bag', value=str(bag)),
                                         Parameter('skip_unknown_types', value=True)])


def test_bag_without_frames_is_a_clear_error(ros, tmp_path):
    bag = _write_bag(tmp_path / 'no_frames', frames=0)
    with BagReader(bag) as reader:
        with pytest.raises(NoFramesError, match='no messages'):
            list(scan_frames(reader))
    other = tmp_path / 'only_detections'
    with BagWriter(other) as writer:
        writer.add_topic('/detections', FLAKE_ARRAY_TYPE)
    with BagReader(other) as reader:
        with pytest.raises(NoFramesError, match='/detections'):
            list(scan_frames(reader))


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match='storage'):
        BagWriter(tmp_path / 'x', storage='rosbag1')
    with pytest.raises(ValueError, match='version'):
        BagWriter(tmp_path / 'y', version=5)
    with BagWriter(tmp_path / 'z') as writer:
        with pytest.raises(UnknownTypeError, match='acme_msgs/msg/Widget'):
            writer.add_topic('/w', 'acme_msgs/msg/Widget')
        with pytest.raises(BagError, match='not added'):
            writer.write('/nothing', 0, b'')
    with pytest.raises(FileExistsError):
        BagWriter(tmp_path / 'z')
    assert os.path.isdir(tmp_path / 'z')
    shutil.rmtree(tmp_path / 'z')


def test_replay_refuses_a_topic_recorded_with_another_definition(ros, tmp_path):
    from rclpy.parameter import Parameter
    from rosbags.rosbag2 import StoragePlugin, Writer

    from flake_scanner.bag.replay import BagReplayer

    store = typestore()
    msgdef, _ = store.generate_msgdef(SCAN_FRAME_TYPE, ros_version=2)
    bag = tmp_path / 'old_definition'
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        stale = writer.add_connection('/scan/tiles', SCAN_FRAME_TYPE, msgdef=msgdef, rihs01='RIHS01_' + 'ab' * 32)
        writer.write(stale, 1, _frame_bytes(0))
    with BagReader(bag) as reader:
        assert 'different definition' in reader.definition_mismatch('/scan/tiles')
        # decoded with the definition stored in the bag, not the one known here
        (message,) = reader.messages()
        assert reader.deserialize(message).tile_index == 0
    with pytest.raises(UnknownTypeError, match='recorded with a different definition of flake_msgs/msg/ScanFrame'):
        BagReplayer(parameter_overrides=[Parameter('bag', value=str(bag))])
    with BagReader(_write_bag(tmp_path / 'current')) as reader:
        assert reader.definition_mismatch('/scan/tiles') is None


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_damaged_bags_only_ever_raise_bag_errors(ros, tmp_path, storage):
    """Seeded damage (cut short, bytes flipped, blocks overwritten): a BagError or intact data, nothing else."""
    base = _write_bag(tmp_path / 'base', storage=storage)
    (storage_file,) = [p for p in base.iterdir() if p.suffix in ('.mcap', '.db3')]
    data = storage_file.read_bytes()
    rng = np.random.default_rng(11)
    outcomes = {'ok': 0, 'error': 0}
    for trial in range(45):
        damaged = bytearray(data)
        if trial % 3 == 0:
            damaged = damaged[:int(rng.integers(1, len(damaged)))]
        elif trial % 3 == 1:
            for index in rng.integers(0, len(damaged), int(rng.integers(1, 8))):
                damaged[index] = int(rng.integers(0, 256))
        else:
            start = int(rng.integers(0, len(damaged) - 64))
            damaged[start:start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        bag = tmp_path / f'damaged_{trial}'
        shutil.copytree(base, bag)
        (bag / storage_file.name).write_bytes(bytes(damaged))
        try:
            with BagReader(bag) as reader:
                for message in reader.messages():
                    reader.deserialize(message)
            outcomes['ok'] += 1
        except BagError as exc:
            assert str(bag) in str(exc)
            outcomes['error'] += 1
        shutil.rmtree(bag)
    assert outcomes['error'] >= 15  # every cut-short file at least
