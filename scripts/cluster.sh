#!/usr/bin/env bash
# A local Redis Cluster for trying Honua on one by hand: six `redis-server --cluster-enabled
# yes` nodes on loopback (three primaries, three replicas), created with
# `redis-cli --cluster create`. Each node's data, log and pid file live under DIR (default
# target/honua-cluster).
#
#   scripts/cluster.sh start [FIRST_PORT]   # ports FIRST_PORT.. (default 30001), skipping any
#                                           # port or cluster bus port (+10000) in use; prints
#                                           # the HONUA_REDIS_CLUSTER_NODES line to export
#   scripts/cluster.sh status               # CLUSTER NODES as one node sees it
#   scripts/cluster.sh stop                 # kills the nodes this script started, removes DIR
#
# Then, e.g.: eval "$(scripts/cluster.sh start | tail -1)"; honua-scheduler & honua-worker
# (HONUA_REDIS_URL must stay unset). Try a failover with `kill -9` of the primary of `{0}`:
# `redis-cli -p <port> cluster keyslot '{0}'` and `cluster slots` name it.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${HONUA_CLUSTER_DIR:-target/honua-cluster}"
case "$DIR" in /*) ;; *) DIR="$(pwd)/$DIR" ;; esac
NODE_TIMEOUT_MS="${HONUA_CLUSTER_NODE_TIMEOUT_MS:-2000}"

in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ports() { cat "$DIR/ports"; }

start() {
  if [ -f "$DIR/ports" ]; then
    echo "a cluster is already running from $DIR (ports $(ports | tr '\n' ' ')); stop it first" >&2
    exit 1
  fi
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || {
    echo "redis-server and redis-cli are needed (apt-get install redis-server)" >&2
    exit 1
  }
  local port="${1:-30001}" picked=()
  while [ "${#picked[@]}" -lt 6 ]; do
    if [ "$port" -ge 55535 ]; then
      echo "no six free ports below 55535 (cluster bus ports are port + 10000)" >&2
      exit 1
    fi
    if ! in_use "$port" && ! in_use $((port + 10000)); then picked+=("$port"); fi
    port=$((port + 1))
  done
  mkdir -p "$DIR"
  printf '%s\n' "${picked[@]}" >"$DIR/ports"
  for p in "${picked[@]}"; do
    mkdir -p "$DIR/$p"
    redis-server --port "$p" --bind 127.0.0.1 --daemonize yes \
      --dir "$DIR/$p" --pidfile "$DIR/$p/redis.pid" --logfile redis.log \
      --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout "$NODE_TIMEOUT_MS" --appendonly yes --save ''
  done
  local deadline=$((SECONDS + 30))
  for p in "${picked[@]}"; do
    until redis-cli -p "$p" ping >/dev/null 2>&1; do
      [ "$SECONDS" -lt "$deadline" ] || { echo "node $p did not start (see $DIR/$p/redis.log)" >&2; exit 1; }
      sleep 0.1
    done
  done
  redis-cli --cluster create $(printf '127.0.0.1:%s ' "${picked[@]}") \
    --cluster-replicas 1 --cluster-yes >"$DIR/create.log"
  for p in "${picked[@]}"; do
    until redis-cli -p "$p" cluster info | grep -q '^cluster_state:ok'; do
      [ "$SECONDS" -lt "$deadline" ] || { echo "cluster not ok on $p" >&2; exit 1; }
      sleep 0.1
    done
  done
  echo "cluster up: $(printf '127.0.0.1:%s ' "${picked[@]}")(data in $DIR)"
  echo "export HONUA_REDIS_CLUSTER_NODES=$(printf 'redis://127.0.0.1:%s,' "${picked[@]}" | sed 's/,$//')"
}

status() {
  redis-cli -p "$(ports | head -1)" cluster nodes
}

stop() {
  [ -f "$DIR/ports" ] || { echo "no cluster in $DIR" >&2; exit 0; }
  local pids=() deadline=$((SECONDS + 30))
  for p in $(ports); do
    if [ -f "$DIR/$p/redis.pid" ]; then pids+=("$(cat "$DIR/$p/redis.pid")"); fi
  done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do
      [ "$SECONDS" -lt "$deadline" ] || { echo "node $pid did not stop" >&2; exit 1; }
      sleep 0.1
    done
  done
  rm -rf "$DIR"
  echo "cluster stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  status) status ;;
  stop) stop ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
