#!/usr/bin/env bash
# Installs Debian's chromium for the web app's browser tests (tests/test_web_browser.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (CI runs as root).
set -u

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
  exit 0
fi

if ! command -v apt-get > /dev/null 2>&1; then
  echo "install_chromium: apt-get not found; install Debian's chromium package by hand so that $CHROMIUM exists" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo > /dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install_chromium: needs root (or sudo) to run apt-get install chromium" >&2
    exit 1
  fi
fi

echo "[setup] installing Debian chromium for the browser tests"
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq; then
  echo "install_chromium: apt-get update failed; check the network or the apt sources" >&2
  exit 1
fi
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; then
  echo "install_chromium: apt-get install chromium failed" >&2
  exit 1
fi
if [ ! -x "$CHROMIUM" ]; then
  echo "install_chromium: chromium was installed but $CHROMIUM is missing" >&2
  exit 1
fi
echo "[setup] chromium installed: $($CHROMIUM --version 2>/dev/null || echo "$CHROMIUM")"
