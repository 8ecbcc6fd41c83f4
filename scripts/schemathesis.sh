#!/usr/bin/env bash
# Property-based API test: schemathesis generates requests from GET /api/openapi.json and
# checks every answer against the document (no 5xx, documented status codes, response
# schemas, content types and headers). Runs `honua dev` (its own redis-server) with an
# admin API key on a free port. Installs schemathesis from PyPI when missing.
# Usage: scripts/schemathesis.sh   (after `cargo build -p honua --bin honua`)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import schemathesis' >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check "schemathesis==4.32.5"
fi
st() { python3 -c 'import sys; from schemathesis.cli import schemathesis; sys.argv[0] = "st"; sys.exit(schemathesis())' "$@"; }

honua="${CARGO_TARGET_DIR:-target}/debug/honua"
[ -x "$honua" ] || cargo build -q --locked -p honua --bin honua

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
token="schemathesis-$(date +%s%N)"
hash=$(printf %s "$token" | sha256sum | cut -d' ' -f1)

HONUA_API_KEYS="schemathesis:admin:$hash" HONUA_DEFINITIONS_DIR="$PWD/processes" \
  HONUA_HTTP_ADDR="127.0.0.1:$port" "$honua" dev --no-examples --data-dir "$work" \
  >"$work/dev.log" 2>&1 &
dev=$!
trap 'kill -INT $dev 2>/dev/null; wait $dev 2>/dev/null; rm -rf "$work"' EXIT

for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$port/health/live" >/dev/null && break
  kill -0 $dev 2>/dev/null || { cat "$work/dev.log"; exit 1; }
  sleep 0.1
done

st run "http://127.0.0.1:$port/api/openapi.json" \
  -H "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
  --max-examples 20 --seed 1
