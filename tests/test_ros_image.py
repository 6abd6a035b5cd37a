"""sensor_msgs/Image <-> numpy with cv_bridge's semantics."""

import array
import sys

import numpy as np
import pytest
from sensor_msgs.msg import Image

from flake_core.ros_image import ImageConversionError, image_to_numpy, numpy_to_image


@pytest.mark.parametrize('encoding,dtype,channels', [
    ('bgr8', np.uint8, 3), ('rgb8', np.uint8, 3), ('mono8', np.uint8, 1), ('mono16', np.uint16, 1),
    ('bgra8', np.uint8, 4), ('32FC1', np.float32, 1)])
def test_round_trip_keeps_pixels_shape_and_packed_step(encoding, dtype, channels):
    rng = np.random.default_rng(1)
    shape = (37, 53) if channels == 1 else (37, 53, channels)
    pixels = (rng.random(shape) * 1000).astype(dtype)
    msg = numpy_to_image(pixels, encoding)
    assert (msg.height, msg.width, msg.encoding) == (37, 53, encoding)
    assert msg.step == 53 * channels * np.dtype(dtype).itemsize
    assert isinstance(msg.data, array.array)
    assert np.array_equal(image_to_numpy(msg), pixels)


def test_row_padding_is_skipped():
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    padded = np.zeros((4, 20), np.uint8)
    padded[:, :15] = pixels.reshape(4, 15)
    msg = Image(height=4, width=5, encoding='bgr8', step=20)
    msg.data = padded.tobytes()
    assert np.array_equal(image_to_numpy(msg), pixels)


def test_big_endian_mono16_is_swapped_to_host_order():
    pixels = np.array([[1, 256], [4660, 65535]], dtype=np.uint16)
    msg = Image(height=2, width=2, encoding='mono16', step=4, is_bigendian=1)
    msg.data = pixels.astype('>u2').tobytes()
    assert np.array_equal(image_to_numpy(msg), pixels)
    little = Image(height=2, width=2, encoding='mono16', step=4, is_bigendian=0)
    little.data = pixels.astype('<u2').tobytes()
    assert np.array_equal(image_to_numpy(little), pixels)
    assert numpy_to_image(pixels, 'mono16').is_bigendian == (sys.byteorder == 'big')


def test_desired_encoding_converts_colour_order_and_grey():
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 200  # blue
    msg = numpy_to_image(bgr, 'bgr8')
    rgb = image_to_numpy(msg, 'rgb8')
    assert rgb[0, 0].tolist() == [0, 0, 200]
    grey = image_to_numpy(msg, 'mono8')
    assert grey.shape == (2, 2) and int(grey[0, 0]) == round(0.114 * 200)


@pytest.mark.parametrize('mutate,reason', [
    (lambda m: setattr(m, 'encoding', 'yuv422_weird'), 'unsupported image encoding'),
    (lambda m: setattr(m, 'step', 3), 'step'),
    (lambda m: setattr(m, 'height', 50), 'data holds'),
    (lambda m: setattr(m, 'width', 0), 'empty image'),
])
def test_malformed_messages_raise_clear_errors(mutate, reason):
    msg = numpy_to_image(np.zeros((4, 4, 3), np.uint8), 'bgr8')
    mutate(msg)
    with pytest.raises(ImageConversionError, match=reason):
        image_to_numpy(msg)


def test_arrays_that_do_not_fit_the_encoding_are_refused():
    with pytest.raises(ImageConversionError, match='channel'):
        numpy_to_image(np.zeros((4, 4), np.uint8), 'bgr8')
    with pytest.raises(ImageConversionError, match='dtype'):
        numpy_to_image(np.zeros((4, 4), np.float64), 'mono8')
