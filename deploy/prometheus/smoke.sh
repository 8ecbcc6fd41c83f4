#!/usr/bin/env bash
# Smoke test of the monitoring chain: a real Prometheus server scrapes a running system
# (`honua dev --mock-llm`: private redis-server, scheduler, gateway, in-process workers,
# and the in-process mock OpenAI-compatible provider, which answers 429 + Retry-After to
# every 5th request, behind the `llm` step kind) with deploy/prometheus/rules.yml loaded,
# and the operations guide's PromQL queries (OPERATIONS_GUIDE.md "Prometheus Queries",
# Weekly and Monthly checklists, the LLM token and rate-limit queries included) must return
# data. The LLM work is the built-in LlmExample process type `--mock-llm` adds. Also lints one scrape of /metrics with `promtool check metrics` (fails the run on
# any finding, e.g. a metric without `# HELP`). Everything runs on free ports under a temporary directory and is stopped on exit.
#
# Usage: deploy/prometheus/smoke.sh [--print-binary]
#        (--print-binary: print the path of the `honua` binary it runs, then exit; it is
#        `<cargo target directory>/debug/honua`, honouring CARGO_TARGET_DIR and cargo config)
# Environment: SMOKE_DEADLINE_SECS (default 90) how long to wait for every query;
#              SMOKE_KEEP=1 keeps the temporary directory (logs) on exit.
# Exit: 0 when every required query returned data and the lint was clean; 1 otherwise (or
# on a set-up failure).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

# The binary cargo builds: `target_directory` of `cargo metadata` (CARGO_TARGET_DIR, relative
# or not, `build.target-dir` of a cargo config, or ./target).
target_dir() {
  cargo metadata --format-version 1 --no-deps --locked 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}
TARGET=$(target_dir)
[ -n "$TARGET" ] || { echo "smoke: cargo metadata did not name a target directory" >&2; exit 1; }
HONUA=$TARGET/debug/honua
if [ "${1:-}" = "--print-binary" ]; then
  echo "$HONUA"
  exit 0
fi
DEADLINE_SECS=${SMOKE_DEADLINE_SECS:-90}
T0=$(date +%s)

# --- tools -----------------------------------------------------------------------------
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  # check.sh installs the Debian package (prometheus + promtool) and stops its service.
  deploy/prometheus/check.sh >/dev/null
fi
for tool in prometheus promtool curl redis-server; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "smoke: $tool is required but not installed" >&2
    exit 1
  fi
done
if command -v jq >/dev/null 2>&1; then JSON=jq
elif command -v python3 >/dev/null 2>&1; then JSON=python3
else echo "smoke: need jq or python3" >&2; exit 1; fi

# Built (or found up to date) where cargo puts it.
cargo build -q --locked -p honua --bin honua
[ -x "$HONUA" ] || { echo "smoke: $HONUA missing after cargo build" >&2; exit 1; }

# --- clean-up --------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/honua-prom-smoke.XXXXXX")
HONUA_PID=""
PROM_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$PROM_PID" ] && kill -0 "$PROM_PID" 2>/dev/null; then
    kill -TERM "$PROM_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$PROM_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PROM_PID" 2>/dev/null || true
    wait "$PROM_PID" 2>/dev/null || true
  fi
  if [ -n "$HONUA_PID" ]; then
    # honua runs in its own process group (setsid) with its redis-server child: ask it to
    # stop gracefully (it stops its Redis), then kill whatever is left of that group.
    kill -INT "$HONUA_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$HONUA_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$HONUA_PID" 2>/dev/null || true
    wait "$HONUA_PID" 2>/dev/null || true
  fi
  if [ "${SMOKE_KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
    echo "smoke: logs kept in $TMP" >&2
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' 2>/dev/null \
    || shuf -i 20000-60000 -n 1
}

# Polls "$@" every 0.2 s until it succeeds or $1 seconds pass.
wait_for() {
  local secs=$1; shift
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.2
  done
}

# --- the system ------------------------------------------------------------------------
mkdir -p "$TMP/defs" "$TMP/data" "$TMP/prom"
cp -r processes/. "$TMP/defs/"
cp deploy/prometheus/smoke/SmokeFail.toml "$TMP/defs/"

HONUA_PORT=$(free_port)
GW=http://127.0.0.1:$HONUA_PORT
# No HONUA_REDIS_URL: `honua dev` starts its own redis-server on a free port.
env -u HONUA_REDIS_URL -u HONUA_CONFIG -u HONUA_URL -u HONUA_TOKEN \
  HONUA_HTTP_ADDR=127.0.0.1:$HONUA_PORT HONUA_DEFINITIONS_DIR="$TMP/defs" \
  RUST_LOG=${RUST_LOG:-warn} \
  setsid "$HONUA" dev --mock-llm --data-dir "$TMP/data" >"$TMP/honua.log" 2>&1 &
HONUA_PID=$!
if ! wait_for 60 curl -fsS -o /dev/null "$GW/metrics"; then
  echo "smoke: the gateway did not answer on $GW/metrics; honua.log:" >&2
  tail -n 30 "$TMP/honua.log" >&2
  exit 1
fi

submit() { # submit TYPE
  curl -fsS -o /dev/null -X POST "$GW/api/processes" -H 'content-type: application/json' \
    -d "{\"processType\":\"$1\",\"input\":{\"smoke\":true}}"
}

# --- Prometheus ------------------------------------------------------------------------
PROM_PORT=$(free_port)
PROM=http://127.0.0.1:$PROM_PORT
sed -e "s|@TARGET@|127.0.0.1:$HONUA_PORT|" -e "s|@RULES@|$ROOT/deploy/prometheus/rules.yml|" \
  deploy/prometheus/smoke/prometheus.yml.in >"$TMP/prometheus.yml"
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/prom" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$TMP/prometheus.log" 2>&1 &
PROM_PID=$!
if ! wait_for 60 curl -fsS -o /dev/null "$PROM/-/ready"; then
  echo "smoke: prometheus did not become ready; prometheus.log:" >&2
  tail -n 30 "$TMP/prometheus.log" >&2
  exit 1
fi

# query EXPR -> prints "<count>\t<first value>" of an instant query ("ERR" on an error).
query() {
  local body
  body=$(curl -fsS -G "$PROM/api/v1/query" --data-urlencode "query=$1" 2>/dev/null) || { printf 'ERR\t-\n'; return; }
  if [ "$JSON" = jq ]; then
    jq -r 'if .status != "success" then "ERR\t-" else
             (.data.result | length | tostring) + "\t" +
             (if .data.resultType == "scalar" then .data.result[1]
              elif (.data.result | length) > 0 then
                ([.data.result[].value[1] | select(. != "NaN")] | first // "NaN")
              else "-" end)
           end' <<<"$body"
  else
    python3 -c 'import json,sys
d=json.load(sys.stdin)
if d.get("status")!="success": print("ERR\t-"); sys.exit()
r=d["data"]["result"]
if d["data"]["resultType"]=="scalar": print("1\t"+r[1]); sys.exit()
v=[x["value"][1] for x in r if x["value"][1]!="NaN"]
print("%d\t%s"%(len(r), (v[0] if v else "NaN") if r else "-"))' <<<"$body"
  fi
}

# Wait for the first successful scrape, then submit more work so the counters move
# between scrapes (the examples `honua dev` submitted may have finished before it).
if ! wait_for 30 sh -c "curl -fsS -G '$PROM/api/v1/query' --data-urlencode 'query=up == 1' | grep -q '\"value\"'"; then
  echo "smoke: prometheus never scraped $GW/metrics successfully" >&2
  exit 1
fi
# LlmExample makes 2 provider calls per process and the mock answers 429 to every 5th
# call, so these three (after the one `honua dev` submitted) bring at least one 429.
for t in Test Test SmokeFail Test SmokeFail LlmExample LlmExample LlmExample; do submit "$t"; done

# --- promtool check metrics on one scrape ---------------------------------------------
curl -fsS "$GW/metrics" >"$TMP/metrics.txt"
set +e
LINT=$(promtool check metrics <"$TMP/metrics.txt" 2>&1)
LINT_RC=$?
set -e

# --- the guide's queries ---------------------------------------------------------------
REQUIRED=(
  'honua_active_processes'
  'sum(honua_active_processes)'
  'sum(rate(honua_process_completed_total[1h])) / sum(rate(honua_process_started_total[1h])) * 100'
  'avg(honua_process_duration_seconds)'
  'histogram_quantile(0.95, rate(honua_process_duration_seconds_bucket[5m]))'
  'sum by (process_type) (rate(honua_process_failures_total[5m]))'
  'redis_up'
  'avg_over_time(honua_process_duration_seconds[7d])'
  'sum(rate(honua_process_completed_total[7d])) / sum(rate(honua_process_started_total[7d]))'
  'honua_process_completed_total'
  'sum(increase(honua_llm_tokens_used_total[7d]))'
  'sum(rate(honua_llm_tokens_used_total[1m]))'
  'sum(rate(honua_llm_errors_total{error_type="rate_limit"}[5m]))'
)
# Of those, the ones whose value must also be above 0: LLM tokens were used and a
# provider 429 was counted while Prometheus was scraping (a series at 0 alone would pass
# with the 429 before the first scrape).
declare -A NONZERO=(
  ['sum(increase(honua_llm_tokens_used_total[7d]))']=1
  ['sum(rate(honua_llm_tokens_used_total[1m]))']=1
  ['sum(rate(honua_llm_errors_total{error_type="rate_limit"}[5m]))']=1
)
positive() { awk -v v="$1" 'BEGIN { exit !(v + 0 > 0) }'; }
# lacks QUERY RESULT -> succeeds when RESULT does not satisfy QUERY's requirement.
lacks() {
  local n=${2%%$'\t'*} v=${2#*$'\t'}
  case $n in ''|0|ERR) return 0 ;; esac
  [ -n "${NONZERO[$1]:-}" ] && ! positive "$v"
}
declare -A RESULT
deadline=$(( $(date +%s) + DEADLINE_SECS ))
last_submit=$(date +%s)
while :; do
  missing=0
  for q in "${REQUIRED[@]}"; do
    r=$(query "$q")
    RESULT[$q]=$r
    if lacks "$q" "$r"; then missing=$((missing + 1)); fi
  done
  [ "$missing" -eq 0 ] && break
  now=$(date +%s)
  [ "$now" -lt "$deadline" ] || break
  # Keep work flowing while waiting (e.g. for the recording rule's first sample).
  if [ $(( now - last_submit )) -ge 3 ]; then
    submit Test || true; submit SmokeFail || true; submit LlmExample || true
    last_submit=$now
  fi
  sleep 0.5
done

printf '\n%-100s %6s  %s\n' "QUERY (required; * = its value must be > 0)" "SERIES" "A VALUE (first non-NaN)"
for q in "${REQUIRED[@]}"; do
  IFS=$'\t' read -r n v <<<"${RESULT[$q]}"
  mark=""
  if lacks "$q" "${RESULT[$q]}"; then
    case $n in ''|0|ERR) mark="   <-- NO DATA" ;; *) mark="   <-- NOT > 0" ;; esac
  fi
  [ -n "${NONZERO[$q]:-}" ] && q="* $q"
  printf '%-100s %6s  %s%s\n' "$q" "$n" "$v" "$mark"
done

# Guide queries that cannot return data on this system yet (listed, not failed).
printf '\n%-100s %6s  %s\n' "QUERY (not expected yet)" "SERIES" "WHY"
not_yet() {
  IFS=$'\t' read -r n _ <<<"$(query "$1")"
  printf '%-100s %6s  %s\n' "$1" "$n" "$2"
}
not_yet '(container_memory_usage_bytes{pod=~"honua-process-framework.*"} / container_spec_memory_limit_bytes{pod=~"honua-process-framework.*"}) * 100' 'cAdvisor metrics: needs Kubernetes (kubelet scrape)'

printf '\npromtool check metrics (one scrape of %s/metrics, %s lines): exit %s\n' \
  "$GW" "$(wc -l <"$TMP/metrics.txt")" "$LINT_RC"
[ -n "$LINT" ] && printf '%s\n' "$LINT"

echo
if [ "$missing" -ne 0 ]; then
  echo "smoke: FAILED: $missing required queries returned no data (or not > 0 where marked *) within ${DEADLINE_SECS}s ($(( $(date +%s) - T0 ))s total)" >&2
  exit 1
fi
if [ "$LINT_RC" -ne 0 ] || [ -n "$LINT" ]; then
  echo "smoke: FAILED: promtool check metrics reported findings on /metrics" >&2
  exit 1
fi
echo "smoke: OK: every required query returned data ($(( $(date +%s) - T0 ))s total)"
