#!/usr/bin/env bash
# The whole test suite: unit, script-contract and whole-system tests. The tests start their
# own redis-server processes on free ports; the console test drives a headless Chromium
# through chromedriver and checks each page with axe-core. This installs redis-server,
# chromium and chromium-driver when missing (Debian/Ubuntu) and fetches the pinned axe-core
# npm package into target/axe. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "${missing[*]} not found: installing with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# axe-core for the console's accessibility checks (tests/tests/console.rs): the pinned npm
# tarball (npm pack, or straight from the registry without npm), checked against its hash.
AXE_VERSION=4.10.3
AXE_SHA256=0f2b4d7dcdf7d1219df8d1959ad68e565f51d14c3f0d88bb71cd59abeb956292
AXE_DIR=target/axe
AXE_TGZ="$AXE_DIR/axe-core-$AXE_VERSION.tgz"
if ! echo "$AXE_SHA256  $AXE_TGZ" | sha256sum -c --status 2>/dev/null; then
  rm -rf "$AXE_DIR" && mkdir -p "$AXE_DIR"
  if command -v npm >/dev/null 2>&1; then
    (cd "$AXE_DIR" && npm pack --silent "axe-core@$AXE_VERSION" >/dev/null)
  else
    curl -sSfL -o "$AXE_TGZ" "https://registry.npmjs.org/axe-core/-/axe-core-$AXE_VERSION.tgz"
  fi
  echo "$AXE_SHA256  $AXE_TGZ" | sha256sum -c --quiet
  tar xzf "$AXE_TGZ" -C "$AXE_DIR"
fi
export HONUA_AXE_JS="$PWD/$AXE_DIR/package/axe.min.js"

deploy/prometheus/check.sh
deploy/k8s/validate.sh
cargo test --workspace --locked "$@"
# A real Prometheus scrapes `honua dev` (built by the tests above) and runs the guide's queries.
deploy/prometheus/smoke.sh
scripts/schemathesis.sh
