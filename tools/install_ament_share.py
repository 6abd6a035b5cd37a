"""Register the editable Python packages in the venv's ament index.

``pip install -e`` does not install ``data_files``, so ``get_package_share_directory``
would not find the packages. This writes what colcon would: the resource marker
and ``share/<pkg>`` holding package.xml, and links to config/ and launch/.

Usage: python tools/install_ament_share.py VENV PKG [PKG ...]
"""

import os
from pathlib import Path
import sys

ROOT = Path(__file__).resolve().parent.parent


def link(target: Path, name: Path) -> None:
    if name.is_symlink() or name.exists():
        if name.is_symlink() and os.readlink(name) == str(target):
            return
        name.unlink()
    name.symlink_to(target)


def main() -> int:
    venv = Path(sys.argv[1]).resolve()
    index = venv / 'share' / 'ament_index' / 'resource_index' / 'packages'
    index.mkdir(parents=True, exist_ok=True)
    for package in sys.argv[2:]:
        source = ROOT / 'src' / package
        (index / package).write_text('')
        share = venv / 'share' / package
        share.mkdir(parents=True, exist_ok=True)
        link(source / 'package.xml', share / 'package.xml')
        if package == 'flake_scanner':
            link(ROOT / 'config', share / 'config')
            link(ROOT / 'launch', share / 'launch')
    print(f'[setup] registered {len(sys.argv) - 2} package(s) in the ament index')
    return 0


if __name__ == '__main__':
    sys.exit(main())
