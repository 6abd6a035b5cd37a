# Environment of the flake scanner. Source it in a shell (`source env.sh`) to use
# the system by hand; every Makefile target sources it too.
# shellcheck shell=bash
FLAKE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
export FLAKE_ROOT

# The pip-only install lives in .venv; a lab's ROS 2 install sourced before this
# file keeps working because the prefixes are prepended, not replaced.
if [ -x "$FLAKE_ROOT/.venv/bin/python" ]; then
  export VIRTUAL_ENV="$FLAKE_ROOT/.venv"
  case ":$PATH:" in *":$VIRTUAL_ENV/bin:"*) ;; *) export PATH="$VIRTUAL_ENV/bin:$PATH" ;; esac
  case ":${AMENT_PREFIX_PATH:-}:" in
    *":$VIRTUAL_ENV:"*) ;;
    *) export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}" ;;
  esac
fi

# One DDS domain per run, visible on this host only, so parallel runs and tests
# never see each other's nodes. Set FLAKE_ROS_DOMAIN_ID to pin it.
export ROS_DOMAIN_ID="${FLAKE_ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 1 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"

# Multi-megabyte image buffers: keep glibc from mapping and unmapping each one.
export GLIBC_TUNABLES="glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"
# Large shared-memory segment so camera frames cross processes losslessly.
export FASTDDS_DEFAULT_PROFILES_FILE="$FLAKE_ROOT/config/fastdds_profile.xml"
# Build products and caches stay inside the checkout.
export FLAKE_DATA_DIR="${FLAKE_DATA_DIR:-$FLAKE_ROOT/data}"
