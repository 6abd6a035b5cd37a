"""``flake-web candidates``: cut Greplova et al.'s candidate crops from frames for labelling.

The detector's candidate finder (standard-deviation map, fixed-size crops, merged
near-duplicates) runs on each image; its crops go to
``<data dir>/candidates/<image name>/c0000.png ...``, where the Labelling page offers
them for accept or reject, with material and layer class.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import re
import sys

import cv2


def cut_candidates(image_path: Path, out_root: Path, limit: int, crop_size: int) -> int:
    """Write the candidate crops of one image; returns how many were written."""
    from flake_detector.candidates import CandidateFinder

    image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f'cannot read image {image_path}')
    finder = CandidateFinder(crop_size=crop_size)
    candidates = finder.find(image)[:limit]
    folder = out_root / re.sub(r'[^A-Za-z0-9_.-]', '_', image_path.stem)
    folder.mkdir(parents=True, exist_ok=True)
    for index, candidate in enumerate(candidates):
        cv2.imwrite(str(folder / f'c{index:04d}.png'), finder.crop(image, candidate))
    return len(candidates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='flake-web candidates', description=__doc__.splitlines()[0])
    parser.add_argument('images', nargs='+', type=Path, help='frame images (as OpenCV reads them)')
    parser.add_argument('--data-dir', default='', help='data folder (default: $FLAKE_DATA_DIR or ./data)')
    parser.add_argument('--limit', type=int, default=200, help='crops per image at most')
    parser.add_argument('--crop-size', type=int, default=80, help='crop side [px] (Greplova et al. (2020): 80)')
    args = parser.parse_args(argv)
    if args.limit < 1 or args.crop_size < 8:
        parser.error('--limit must be >= 1 and --crop-size >= 8')
    out_root = Path(args.data_dir or os.environ.get('FLAKE_DATA_DIR') or 'data') / 'candidates'
    total = 0
    for image_path in args.images:
        try:
            count = cut_candidates(image_path, out_root, args.limit, args.crop_size)
        except ValueError as exc:
            print(f'flake-web candidates: error: {exc}', file=sys.stderr)
            return 2
        total += count
        print(f'[flake-web candidates] {image_path.name}: {count} crops', file=sys.stderr, flush=True)
    print(f'[flake-web candidates] {total} crops in {out_root}; label them on the Labelling page', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
