"""Microscope files in and out, with their size checked before anything is decoded.

Read: Digital Micrograph (.dm3, .dm4), EMD (.emd: Velox and NCEM/Berkeley), TIA (.ser),
TIFF (.tif, .tiff) through RosettaSciIO, which takes the pixel size (and, where the file
records it, the detector) from the file's own metadata; PNG, JPEG, BMP and .npy arrays,
which carry no calibration, through Pillow/OpenCV and NumPy.

Every reader first learns the image's size from the header (RosettaSciIO reads lazily,
Pillow and tifffile read headers only, .npy is memory-mapped) and refuses a frame whose
side, pixel count or decoded size is over the limits below before decoding it: a small
compressed file that would unpack into gigabytes (a decompression bomb) costs nothing.

A file may hold several images (two detectors, a frame series): the first 2-D image is
analysed and the others are named in a warning; a stack's first frame is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from pathlib import Path
from typing import Any

import numpy as np

from .adf import AdfDetector

MAX_SIDE_PX = 8192
MAX_PIXELS = 8192 * 8192
MAX_DECODED_BYTES = 8192 * 8192 * 8          # 512 MiB: a float64 frame of the largest size
MICROSCOPE_SUFFIXES = {'.dm3': 'digitalmicrograph', '.dm4': 'digitalmicrograph', '.emd': 'emd',
                       '.ser': 'tia', '.tif': 'tiff', '.tiff': 'tiff'}
PLAIN_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.npy')
UNIT_METRES = {'m': 1.0, 'mm': 1e-3, 'um': 1e-6, 'µm': 1e-6, 'μm': 1e-6, 'micron': 1e-6, 'nm': 1e-9,
               'a': 1e-10, 'å': 1e-10, 'Å': 1e-10, 'angstrom': 1e-10, 'pm': 1e-12}


class ImageFileError(ValueError):
    """A file that cannot be read as an image to analyse, with the reason."""


@dataclass
class Frame:
    """One image read from a file, with what the file says about it."""

    pixels: np.ndarray
    pixel_size: float | None                 # [m/px]; None when the file has no calibration
    detector: AdfDetector | None = None      # from the file's metadata, when recorded
    metadata: dict[str, Any] = field(default_factory=dict)   # microscope, beam energy, title (JSON-safe)
    warnings: list[str] = field(default_factory=list)


def check_size(shape: tuple[int, ...], itemsize: int, what: str) -> None:
    """ImageFileError unless a frame of ``shape`` and ``itemsize`` bytes per value is within the limits."""
    dims = [int(d) for d in shape]
    plane = dims[-2:] if len(dims) >= 2 else dims
    if any(d <= 0 for d in dims):
        raise ImageFileError(f'{what} has an empty dimension {tuple(dims)}')
    if max(plane) > MAX_SIDE_PX:
        raise ImageFileError(f'{what} is {"x".join(map(str, dims))} px; at most {MAX_SIDE_PX} px per side '
                             'are analysed (crop or bin the frame first)')
    pixels = math.prod(plane)
    channels = math.prod(dims[2:]) if len(dims) == 3 and dims[2] <= 4 else 1
    if pixels > MAX_PIXELS or pixels * channels * itemsize > MAX_DECODED_BYTES:
        raise ImageFileError(f'{what} would decode to {pixels * channels * itemsize / 2**20:.0f} MiB; '
                             f'the limit is {MAX_DECODED_BYTES / 2**20:.0f} MiB')


def read_image(path: Path | str) -> Frame:
    """The image in ``path`` with its pixel size and metadata; ImageFileError or FileNotFoundError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no such image file: {path}')
    if path.stat().st_size == 0:
        raise ImageFileError(f'{path} is empty')
    suffix = path.suffix.lower()
    if suffix in MICROSCOPE_SUFFIXES:
        if suffix in ('.tif', '.tiff'):
            _check_tiff_header(path)
        return _read_rosettasciio(path, MICROSCOPE_SUFFIXES[suffix])
    if suffix == '.npy':
        return _read_npy(path)
    if suffix in PLAIN_SUFFIXES:
        return _read_plain(path)
    raise ImageFileError(f'{path}: unsupported file type {suffix or "(none)"}; read are '
                         f'{", ".join(sorted(MICROSCOPE_SUFFIXES) + list(PLAIN_SUFFIXES))}')


def _read_npy(path: Path) -> Frame:
    try:
        array = np.load(path, mmap_mode='r', allow_pickle=False)
    except ValueError as error:
        raise ImageFileError(f'{path} is not a numeric .npy array: {error}') from None
    check_size(array.shape, array.dtype.itemsize, str(path))
    return Frame(np.array(array), None)


def _read_plain(path: Path) -> Frame:
    import cv2
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as header:          # reads the header only
            width, height = header.size
            bands = len(header.getbands())
            depth = 2 if header.mode in ('I;16', 'I;16B', 'I;16L', 'I') else 1
    except Image.DecompressionBombError as error:
        raise ImageFileError(f'{path} declares a huge image ({error}); at most {MAX_SIDE_PX} px per side '
                             'are analysed') from None
    except (UnidentifiedImageError, OSError) as error:
        raise ImageFileError(f'{path} is not a readable image (PNG, JPEG, BMP): {error}') from None
    check_size((height, width, bands) if bands > 1 else (height, width), depth, str(path))
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageFileError(f'{path} is not a readable image (PNG, JPEG, BMP)')
    if image.ndim == 3:
        image = image[..., ::-1][..., -3:] if image.shape[2] >= 3 else image
    return Frame(image, None)


def _check_tiff_header(path: Path) -> None:
    import tifffile
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            check_size(page.shape, page.dtype.itemsize if page.dtype is not None else 8, str(path))
    except (tifffile.TiffFileError, ValueError, IndexError) as error:
        if isinstance(error, ImageFileError):
            raise
        raise ImageFileError(f'{path} is not a readable TIFF: {error}') from None


def _read_rosettasciio(path: Path, plugin: str) -> Frame:
    import importlib
    reader = importlib.import_module(f'rsciio.{plugin}').file_reader
    try:
        signals = reader(str(path), lazy=True)
    except Exception as error:  # noqa: BLE001 - any parser failure is a bad file, said plainly
        raise ImageFileError(f'{path} could not be read as a {plugin} file: {type(error).__name__}: {error}') from None
    images = [s for s in signals if len(getattr(s.get('data'), 'shape', ())) >= 2]
    if not images:
        raise ImageFileError(f'{path} holds no image')
    warnings = []
    chosen = images[0]
    if len(images) > 1:
        titles = [str(s.get('metadata', {}).get('General', {}).get('title', f'image {k}'))
                  for k, s in enumerate(images)]
        warnings.append(f'{path.name} holds {len(images)} images ({", ".join(titles)}); analysed the first, '
                        f'{titles[0]}')
    data = chosen['data']
    check_size(data.shape, np.dtype(data.dtype).itemsize, str(path))
    if data.ndim > 2:
        warnings.append(f'{path.name} is a stack of {data.shape[:-2]} frames; analysed the first')
        data = data[(0,) * (data.ndim - 2)]
    try:
        pixels = np.asarray(data.compute() if hasattr(data, 'compute') else data)
    except Exception as error:  # noqa: BLE001 - truncated data blocks surface here
        raise ImageFileError(f'{path}: the image data could not be read: {type(error).__name__}: {error}') from None
    if pixels.dtype.names:                         # RGBA records of a DM colour image
        pixels = np.stack([pixels[name] for name in ('R', 'G', 'B')], axis=-1)
    pixel_size, note = _pixel_size(chosen.get('axes', []))
    if note:
        warnings.append(f'{path.name}: {note}')
    metadata = _metadata(chosen)
    return Frame(pixels, pixel_size, _detector(chosen), metadata, warnings)


def _pixel_size(axes: list[dict]) -> tuple[float | None, str]:
    """[m/px] from the last two (signal) axes; None when they carry no length unit."""
    spatial = [a for a in axes if not a.get('navigate', False)][-2:] or axes[-2:]
    sizes = []
    for axis in spatial:
        unit = str(axis.get('units') or '').strip()
        factor = UNIT_METRES.get(unit) or UNIT_METRES.get(unit.lower())
        scale = axis.get('scale')
        if factor is None or scale is None or not math.isfinite(float(scale)) or float(scale) <= 0:
            return None, ''
        sizes.append(float(scale) * factor)
    if not sizes:
        return None, ''
    note = ''
    if len(sizes) == 2 and abs(sizes[0] - sizes[1]) > 0.01 * max(sizes):
        note = f'pixels are not square ({sizes[1]:.4g} x {sizes[0]:.4g} m); used the x size'
    return sizes[-1], note


def _walk(tree: Any, path: tuple = ()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _walk(value, path + (str(key),))
    else:
        yield path, tree


def _detector(signal: dict) -> AdfDetector | None:
    """Collection angles recorded by the file: Velox EMD (CollectionAngleRange, rad, of the detector the
    image came from) or the NCEM EMD 'microscope' attributes written by ``write_image`` (mrad)."""
    original = signal.get('original_metadata', {}) or {}
    title = str(signal.get('metadata', {}).get('General', {}).get('title', ''))
    microscope = original.get('microscope', {}) if isinstance(original.get('microscope'), dict) else {}
    try:
        if 'collection_angle_inner_mrad' in microscope:
            return AdfDetector(float(microscope['collection_angle_inner_mrad']),
                               float(microscope['collection_angle_outer_mrad']),
                               str(microscope.get('detector_name', '')))
        detectors = original.get('Detectors', {})
        if isinstance(detectors, dict):
            for entry in detectors.values():
                if not isinstance(entry, dict) or 'CollectionAngleRange' not in entry:
                    continue
                name = str(entry.get('DetectorName', ''))
                if title and name and name != title:
                    continue
                span = entry['CollectionAngleRange']
                return AdfDetector(float(span['begin']) * 1e3, float(span['end']) * 1e3, name)
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _metadata(signal: dict) -> dict[str, Any]:
    """A few JSON-safe facts for the report: title, microscope, beam energy."""
    metadata = signal.get('metadata', {}) or {}
    out: dict[str, Any] = {}
    title = metadata.get('General', {}).get('title')
    if title:
        out['title'] = str(title)
    tem = metadata.get('Acquisition_instrument', {}).get('TEM', {})
    if isinstance(tem, dict):
        if 'beam_energy' in tem:
            out['beam_energy_kev'] = float(tem['beam_energy'])
        if 'microscope' in tem:
            out['microscope'] = str(tem['microscope'])
    microscope = (signal.get('original_metadata', {}) or {}).get('microscope', {})
    if isinstance(microscope, dict) and 'beam_energy_kev' in microscope and 'beam_energy_kev' not in out:
        out['beam_energy_kev'] = float(microscope['beam_energy_kev'])
    return out


def write_image(path: Path | str, image: np.ndarray, pixel_size: float, detector: AdfDetector | None = None,
                beam_energy_kev: float | None = None) -> Path:
    """Write a frame: .emd and .tif keep the pixel size (and .emd the detector); .png and .npy keep pixels only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == '.npy':
        np.save(path, image)
        return path
    if suffix in ('.png', '.jpg', '.jpeg', '.bmp'):
        import cv2
        if not cv2.imwrite(str(path), image):
            raise ImageFileError(f'cannot write an image to {path}')
        return path
    if suffix not in ('.emd', '.tif', '.tiff'):
        raise ImageFileError(f'cannot write {suffix or "(no suffix)"}; write .emd, .tif, .png or .npy')
    height, width = image.shape[:2]
    axes = [{'name': name, 'size': size, 'scale': pixel_size * 1e9, 'offset': 0.0, 'units': 'nm', 'navigate': False}
            for name, size in (('y', height), ('x', width))]
    microscope: dict[str, Any] = {}
    if detector is not None:
        microscope.update(detector_name=detector.name or 'ADF', collection_angle_inner_mrad=detector.inner_mrad,
                          collection_angle_outer_mrad=detector.outer_mrad)
    if beam_energy_kev:
        microscope['beam_energy_kev'] = float(beam_energy_kev)
    signal = {'data': np.asarray(image), 'axes': axes,
              'metadata': {'General': {'title': detector.name if detector and detector.name else 'ADF'},
                           'Signal': {'signal_type': ''}},
              'original_metadata': {'microscope': microscope}}
    if suffix == '.emd':
        from rsciio.emd import file_writer
    else:
        from rsciio.tiff import file_writer
    tmp = path.with_name(path.name + '.tmp' + path.suffix)
    file_writer(str(tmp), signal)
    tmp.replace(path)   # a crash mid-write never leaves a truncated file under the final name
    return path
