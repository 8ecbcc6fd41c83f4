#!/usr/bin/env bash
# Validates the Prometheus rules and runs their unit tests with promtool. Installs the
# Debian/Ubuntu `prometheus` package (which ships promtool) when promtool is missing, and
# stops the Prometheus server the package may start, so it does not hold port 9090.
# Usage: deploy/prometheus/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "promtool not found: installing the prometheus package with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # Only promtool is wanted; the package's server would take :9090.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl stop prometheus || true
  elif command -v service >/dev/null 2>&1; then
    $SUDO service prometheus stop >/dev/null 2>&1 || true
  fi
fi

promtool check rules deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/rules_test.yml
