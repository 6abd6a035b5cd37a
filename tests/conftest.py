"""Test-wide set-up: an isolated DDS domain for this run and one rclpy context."""

import os
from pathlib import Path
import random
import sys

# Tests may run without `source env.sh`; give them the same isolation it gives.
os.environ.setdefault('ROS_DOMAIN_ID', str(random.randint(1, 100)))
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
_root = Path(__file__).resolve().parent.parent
os.environ.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(_root / 'config' / 'fastdds_profile.xml'))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

REPO_ROOT = _root
SHARED_DIR = REPO_ROOT.parent / 'shared'


@pytest.fixture(scope='session')
def ros():
    """rclpy initialised once for the session; yields the rclpy module."""
    import rclpy

    if not rclpy.ok():
        rclpy.init()
    yield rclpy
    rclpy.try_shutdown()


def pytest_collection_modifyitems(config, items):
    """Browser tests start chromium: they count as slow, out of `make test-fast`."""
    for item in items:
        if item.path.name.startswith('test_web_browser'):
            item.add_marker(pytest.mark.slow)
