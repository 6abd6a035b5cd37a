#!/usr/bin/env bash
# Install the ROS 2 tools kit (ros2 launch, the ros2 command line, composition_interfaces and
# tf2_msgs built from source) into the venv, when the kit is beside the checkout in
# ../shared/ros2-tools (FLAKE_ROS2_TOOLS overrides the place). Without it, nothing happens:
# the tests that need `ros2` say why they are skipped, and the nodes run without /tf.
# A second run with nothing changed returns at once (a stamp newer than every kit file).
#
# Usage: bash tools/install_ros2_tools.sh VENV
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:?usage: bash tools/install_ros2_tools.sh VENV}"
KIT="${FLAKE_ROS2_TOOLS:-$ROOT/../shared/ros2-tools}"
STAMP="$VENV/.stamps/ros2-tools"

if [ ! -f "$KIT/install.sh" ]; then
  echo "[ros2-tools] no kit at $KIT: ros2 launch and the ros2 CLI are not installed (their tests are skipped)"
  exit 0
fi
if [ -f "$STAMP" ] && [ -x "$VENV/bin/ros2" ] && [ -z "$(find "$KIT" -newer "$STAMP" -print -quit)" ]; then
  exit 0
fi
echo "[ros2-tools] installing the ROS 2 tools kit from $KIT into $VENV"
bash "$KIT/install.sh" "$VENV"
mkdir -p "$(dirname "$STAMP")" && touch "$STAMP"
