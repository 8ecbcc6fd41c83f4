#!/usr/bin/env bash
# Runs the whole system on this machine (`honua dev`): a private redis-server (unless
# HONUA_REDIS_URL is set), the scheduler, the gateway on :9090 and two workers; submits the
# example processes and shows their progress. Installs redis-server when it is missing
# (Debian/Ubuntu). Usage: scripts/dev.sh [honua dev options, e.g. --workers 4]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${HONUA_REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing it with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq redis-server >/dev/null
fi

exec cargo run --locked -p honua --bin honua -- dev "$@"
