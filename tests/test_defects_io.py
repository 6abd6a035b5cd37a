"""Microscope files: .dm4 (written here by a minimal DM4 writer), .emd and .tif (RosettaSciIO's writers)
are read back with their pixel size and detector; sizes are checked before anything is decoded."""

import struct
import zlib

import numpy as np
import pytest

from flake_detector.defects.adf import AdfDetector
from flake_detector.defects.io import ImageFileError, read_image, write_image

# Digital Micrograph 4 tag types.
DM_UINT16, DM_INT32, DM_UINT32, DM_FLOAT32, DM_BOOL, DM_ARRAY = 4, 3, 5, 6, 8, 20
NUMPY_TO_DM = {np.dtype('uint16'): (10, 4), np.dtype('float32'): (2, 6), np.dtype('int16'): (1, 2),
               np.dtype('uint32'): (11, 5), np.dtype('int32'): (7, 3), np.dtype('float64'): (12, 7)}
SCALAR_FORMAT = {DM_UINT32: '<I', DM_INT32: '<i', DM_FLOAT32: '<f', DM_BOOL: '<B'}


def _tag_header(kind: int, name: str) -> bytes:
    raw = name.encode('latin-1')
    return struct.pack('>BH', kind, len(raw)) + raw


def _data_tag(name: str, info: list[int], payload: bytes) -> bytes:
    body = b'%%%%' + struct.pack('>Q', len(info)) + b''.join(struct.pack('>Q', v) for v in info) + payload
    return _tag_header(21, name) + struct.pack('>Q', len(body)) + body


def _scalar(name: str, kind: int, value) -> bytes:
    return _data_tag(name, [kind], struct.pack(SCALAR_FORMAT[kind], value))


def _string(name: str, text: str) -> bytes:
    # DM keeps strings as arrays of UTF-16 code units.
    return _data_tag(name, [DM_ARRAY, DM_UINT16, len(text)], text.encode('utf-16-le'))


def _group(name: str, entries: list[bytes]) -> bytes:
    body = struct.pack('>BBQ', 0, 1, len(entries)) + b''.join(entries)
    return _tag_header(20, name) + struct.pack('>Q', len(body)) + body


def write_dm4(path, image: np.ndarray, pixel_size_nm: float, title: str = 'HAADF', declared_shape=None) -> None:
    """A minimal valid DM4 file: one image with its spatial calibration and a little microscope info.

    ``declared_shape`` (H, W) overrides the size written in the header (to make a lying file).
    """
    data_type, element = NUMPY_TO_DM[image.dtype]
    height, width = declared_shape or image.shape
    dimension = [_scalar('Origin', DM_FLOAT32, 0.0), _scalar('Scale', DM_FLOAT32, pixel_size_nm),
                 _string('Units', 'nm')]
    calibrations = _group('Calibrations', [
        _group('Brightness', [_scalar('Origin', DM_FLOAT32, 0.0), _scalar('Scale', DM_FLOAT32, 1.0),
                              _string('Units', 'counts')]),
        _group('Dimension', [_group('', dimension), _group('', dimension)]),
        _scalar('DisplayCalibratedUnits', DM_BOOL, 1)])
    image_data = _group('ImageData', [
        calibrations,
        _data_tag('Data', [DM_ARRAY, element, image.size],
                  np.ascontiguousarray(image).astype('<' + image.dtype.str[1:]).tobytes()),
        _scalar('DataType', DM_UINT32, data_type),
        _group('Dimensions', [_scalar('', DM_UINT32, width), _scalar('', DM_UINT32, height)]),
        _scalar('PixelDepth', DM_UINT32, image.dtype.itemsize)])
    tags = _group('ImageTags', [_group('Microscope Info', [_scalar('Voltage', DM_FLOAT32, 80000.0),
                                                           _string('Microscope', 'test column')])])
    image_entry = _group('', [image_data, tags, _string('Name', title)])
    root = struct.pack('>BBQ', 0, 1, 1) + _group('ImageList', [image_entry])
    with open(path, 'wb') as handle:
        handle.write(struct.pack('>IQI', 4, len(root) + 8, 1) + root + b'\x00' * 8)


@pytest.fixture
def frame():
    rng = np.random.default_rng(5)
    return (rng.random((96, 128)) * 4000).astype(np.uint16)


@pytest.mark.parametrize('dtype', ['uint16', 'float32'])
def test_dm4_from_our_writer_is_read_with_its_pixel_size(tmp_path, frame, dtype):
    path = tmp_path / 'frame.dm4'
    write_dm4(path, frame.astype(dtype), pixel_size_nm=0.04)
    read = read_image(path)
    assert read.pixels.shape == (96, 128) and read.pixels.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(read.pixels, frame.astype(dtype))
    assert read.pixel_size == pytest.approx(4e-11, rel=1e-6)
    assert read.detector is None and read.metadata.get('title') == 'HAADF'


def test_emd_keeps_pixel_size_and_detector(tmp_path, frame):
    path = write_image(tmp_path / 'frame.emd', frame, 2.5e-11, detector=AdfDetector(68.0, 280.0, 'HAADF'),
                       beam_energy_kev=80.0)
    read = read_image(path)
    np.testing.assert_array_equal(read.pixels, frame)
    assert read.pixel_size == pytest.approx(2.5e-11, rel=1e-6)
    assert (read.detector.inner_mrad, read.detector.outer_mrad) == (68.0, 280.0)
    assert read.metadata['beam_energy_kev'] == 80.0


def test_tiff_keeps_pixel_size_png_and_npy_have_none(tmp_path, frame):
    tif = read_image(write_image(tmp_path / 'frame.tif', frame, 3e-11))
    np.testing.assert_array_equal(tif.pixels, frame)
    assert tif.pixel_size == pytest.approx(3e-11, rel=1e-4)
    for name in ('frame.png', 'frame.npy'):
        plain = read_image(write_image(tmp_path / name, frame, 3e-11))
        np.testing.assert_array_equal(plain.pixels, frame)
        assert plain.pixel_size is None


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header promises width x height 8-bit grey pixels, with one tiny compressed block."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\x00' * 4096))
                     + chunk(b'IEND', b''))


def test_decompression_bombs_are_refused_from_the_header(tmp_path, frame):
    bomb = tmp_path / 'bomb.png'
    _png_header_only(bomb, 60000, 60000)          # 3.6 GB of pixels promised by a ~100 byte file
    assert bomb.stat().st_size < 1000
    with pytest.raises(ImageFileError, match='at most 8192 px per side'):
        read_image(bomb)
    lying = tmp_path / 'lying.dm4'
    write_dm4(lying, frame, 0.04, declared_shape=(50000, 50000))
    with pytest.raises(ImageFileError, match='at most 8192 px per side'):
        read_image(lying)
    big = np.lib.format.open_memmap(tmp_path / 'big.npy', mode='w+', dtype=np.float64, shape=(8192, 8193))
    del big
    with pytest.raises(ImageFileError, match='at most 8192'):
        read_image(tmp_path / 'big.npy')


@pytest.mark.parametrize('name, content, message', [
    ('noise.dm4', bytes(range(256)) * 8, 'could not be read as a digitalmicrograph file'),
    ('noise.emd', b'not hdf5 at all' * 20, 'could not be read as a emd file'),
    ('noise.tif', b'II*\x00' + b'\xff' * 64, 'not a readable TIFF'),
    ('noise.png', b'not a png', 'not a readable image'),
    ('empty.dm4', b'', 'is empty'),
    ('frame.xyz', b'123', 'unsupported file type'),
])
def test_bad_files_get_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageFileError, match=message):
        read_image(path)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / 'missing.dm4')
