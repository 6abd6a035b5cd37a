"""Re-point the ROS 2 PyPI wheels' exported Python/NumPy include dirs at this interpreter.

The wheels' ``*__rosidl_generator_py`` CMake exports name the include dirs of the
machine that built them (``/opt/python/cp3xx-cp3xx/...``). Building flake_msgs
against them needs this interpreter's dirs instead. Only the pip-only install
(``make setup``) runs this; a ROS 2 install's CMake files are never touched.

Usage: python tools/fix_wheel_cmake_paths.py VENV
"""

from pathlib import Path
import re
import sys
import sysconfig

import numpy

PYTHON_INCLUDE = re.compile(r'/opt/python/cp3\d+-cp3\d+/include/python3\.\d+')
NUMPY_INCLUDE = re.compile(r'/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/_core/include')


def main() -> int:
    venv = Path(sys.argv[1])
    python_include = sysconfig.get_paths()['include']
    numpy_include = numpy.get_include()
    fixed = 0
    for path in sorted((venv / 'share').glob('*/cmake/export_*__rosidl_generator_pyExport.cmake')):
        text = path.read_text()
        new = NUMPY_INCLUDE.sub(numpy_include, text)
        new = PYTHON_INCLUDE.sub(python_include, new)
        if new != text:
            path.write_text(new)
            fixed += 1
    print(f'[setup] re-pointed include dirs in {fixed} wheel CMake export file(s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
