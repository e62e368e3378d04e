#!/usr/bin/env bash
# System packages the Python dependencies compile against. py-libp2p pulls fastecdsa, which
# builds from source and needs gcc and the GMP headers (Debian: libgmp-dev).
set -euo pipefail

have_gmp() {
  [ -e /usr/include/gmp.h ] || ls /usr/include/*/gmp.h >/dev/null 2>&1
}

command -v gcc >/dev/null || { echo "error: gcc is missing (Debian: apt-get install gcc)" >&2; exit 1; }
if ! have_gmp; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing libgmp-dev (needed to build fastecdsa for py-libp2p)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgmp-dev >/dev/null
  else
    echo "error: the GMP headers are missing: install the Debian package libgmp-dev" \
         "(sudo apt-get install libgmp-dev), then run make again" >&2
    exit 1
  fi
fi

# PostgreSQL server binaries: the shared-queue tests start a throwaway server with them
# (sogni_devnet/pg_cluster.py); Debian's postgresql package puts them in /usr/lib/postgresql.
have_postgres() {
  [ -n "${SOGNI_PG_BINDIR:-}" ] && [ -x "$SOGNI_PG_BINDIR/initdb" ] && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
if ! have_postgres; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing postgresql (the queue tests start a throwaway PostgreSQL server)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "error: PostgreSQL is missing: install the Debian package postgresql" \
         "(sudo apt-get install postgresql), then run make again" >&2
    exit 1
  fi
fi
