#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for the registry's PostgreSQL backend and its tests
# (flake_registry.pg_server starts it in a temporary data directory as an unprivileged user).
# Idempotent: does nothing when initdb and postgres are already there. Needs root (CI runs as root).
set -u

have_server() {
  for bin in /usr/lib/postgresql/*/bin; do
    if [ -x "$bin/initdb" ] && [ -x "$bin/postgres" ]; then
      return 0
    fi
  done
  return 1
}

if have_server; then
  exit 0
fi

if ! command -v apt-get > /dev/null 2>&1; then
  echo "install_postgresql: apt-get not found; install Debian's postgresql package by hand" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo > /dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install_postgresql: needs root (or sudo) to run apt-get install postgresql" >&2
    exit 1
  fi
fi

echo "[setup] installing Debian postgresql for the registry's PostgreSQL backend"
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq; then
  echo "install_postgresql: apt-get update failed; check the network or the apt sources" >&2
  exit 1
fi
# The package's own cluster is not used (the tests make their own in a temporary folder).
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; then
  echo "install_postgresql: apt-get install postgresql failed" >&2
  exit 1
fi
if ! have_server; then
  echo "install_postgresql: postgresql was installed but no /usr/lib/postgresql/*/bin/initdb was found" >&2
  exit 1
fi
echo "[setup] postgresql installed: $(ls -d /usr/lib/postgresql/*/bin | tail -1)"
