#!/usr/bin/env bash
# The whole test suite: unit, script-contract and whole-system tests. The tests start their
# own redis-server processes on free ports; this installs redis-server when it is missing
# (Debian/Ubuntu). Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing it with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq redis-server >/dev/null
fi

deploy/prometheus/check.sh
deploy/k8s/validate.sh
cargo test --workspace --locked "$@"
# A real Prometheus scrapes `honua dev` (built by the tests above) and runs the guide's queries.
deploy/prometheus/smoke.sh
scripts/schemathesis.sh
