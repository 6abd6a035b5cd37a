"""Install the editable Python packages into the venv prefix the way colcon would.

``pip install -e`` installs neither ``data_files`` nor the ``lib/<package>/`` scripts that
ament_python's ``setup.cfg`` (``script_dir=$base/lib/<package>``) asks for, so
``get_package_share_directory``, ``ros2 run`` and ``ros2 launch`` would not find them. This
writes what colcon would:

- the ament index marker and ``share/<pkg>/package.xml``;
- ``lib/<pkg>/<executable>`` for every console script of the package: a small real
  executable that runs the entry point with the venv's interpreter;
- for flake_scanner, ``share/flake_scanner/launch`` and ``share/flake_scanner/config`` as real
  copies of launch/ and config/ (ros2 launch does not look into a linked directory).

Running it again rewrites only what changed. Usage: python tools/install_ament_share.py VENV PKG [PKG ...]
"""

from __future__ import annotations

from importlib import metadata
import os
from pathlib import Path
import shutil
import sys

ROOT = Path(__file__).resolve().parent.parent
SHARED_DIRECTORIES = {'flake_scanner': ('config', 'launch')}


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> None:
    if path.is_symlink():
        path.unlink()
    if not (path.is_file() and path.read_text() == text):
        path.write_text(text)
    os.chmod(path, mode)


def copy_tree(source: Path, target: Path) -> None:
    """``target`` becomes a real copy of ``source`` (a link left by an older set-up is replaced)."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    target.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for item in sorted(source.rglob('*')):
        if item.is_dir() or '__pycache__' in item.parts or item.name.endswith('~'):
            continue
        relative = item.relative_to(source)
        wanted.add(relative)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if not (destination.is_file() and not destination.is_symlink()
                and destination.read_bytes() == item.read_bytes()):
            if destination.is_symlink():
                destination.unlink()
            shutil.copy2(item, destination)
    for item in sorted(target.rglob('*'), reverse=True):
        if item.is_file() and item.relative_to(target) not in wanted:
            item.unlink()


def console_scripts(package: str) -> list[metadata.EntryPoint]:
    try:
        distribution = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return []
    return [e for e in distribution.entry_points if e.group == 'console_scripts']


def launcher(python: Path, entry: metadata.EntryPoint) -> str:
    module, _, attribute = entry.value.partition(':')
    return (f'#!{python}\n'
            f'# {entry.name}: the console script of {entry.value}, where ros2 run and ros2 launch look for it\n'
            'import sys\n\n'
            f'from {module} import {attribute.split(".")[0]}\n\n'
            "if __name__ == '__main__':\n"
            f'    sys.argv[0] = {entry.name!r}\n'
            f'    sys.exit({attribute}())\n')


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    venv = Path(sys.argv[1]).absolute()
    python = venv / 'bin' / 'python'
    index = venv / 'share' / 'ament_index' / 'resource_index' / 'packages'
    index.mkdir(parents=True, exist_ok=True)
    executables = 0
    for package in sys.argv[2:]:
        source = ROOT / 'src' / package
        (index / package).write_text('')
        share = venv / 'share' / package
        share.mkdir(parents=True, exist_ok=True)
        write_if_changed(share / 'package.xml', (source / 'package.xml').read_text())
        for directory in SHARED_DIRECTORIES.get(package, ()):
            copy_tree(ROOT / directory, share / directory)
        scripts = console_scripts(package)
        lib = venv / 'lib' / package
        lib.mkdir(parents=True, exist_ok=True)
        names = {entry.name for entry in scripts}
        for stale in lib.iterdir():
            if stale.name not in names:
                stale.unlink()
        for entry in scripts:
            write_if_changed(lib / entry.name, launcher(python, entry), 0o755)
            executables += 1
    print(f'[setup] registered {len(sys.argv) - 2} package(s) in the ament index, '
          f'{executables} executable(s) in lib/<package>/')
    return 0


if __name__ == '__main__':
    sys.exit(main())
