#!/usr/bin/env bash
# Prepares a Redis data directory from an RDB dump, for a server that runs with
# `appendonly yes` (ours: deploy/k8s/base/redis).
#
#   deploy/scripts/restore-redis.sh DUMP REDIS_DATA_DIR
#
# Why not just copy dump.rdb in: with AOF on, Redis loads the AOF (appendonlydir/) at
# start and ignores dump.rdb, so a copied dump is silently not restored (or, with no AOF
# yet, Redis starts empty and writes an empty AOF). This script instead:
#   1. moves the directory's current appendonlydir/ and dump.rdb aside to
#      pre-restore-<UTC date>/ (nothing is deleted),
#   2. places DUMP as dump.rdb,
#   3. starts a private redis-server on a unix socket only (no TCP: no client can write
#      during the restore) with appendonly off, so it loads the RDB,
#   4. turns AOF on (CONFIG SET appendonly yes: Redis rewrites the AOF from the loaded
#      data) and waits until that rewrite has finished and succeeded,
#   5. shuts that server down. The directory now holds an AOF equal to the dump: start the
#      real server on it with its normal config (appendonly yes).
# Prints the number of keys restored. The server must be stopped while this runs.
# Environment: RESTORE_TIMEOUT_SECS (default 600), REDIS_SERVER (default redis-server).
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 DUMP REDIS_DATA_DIR" >&2
  exit 2
fi
dump="$1"
data="$2"
timeout_secs="${RESTORE_TIMEOUT_SECS:-600}"
server="${REDIS_SERVER:-redis-server}"
log() { echo "restore-redis: $*" >&2; }

[ -f "$dump" ] || { log "no such dump: $dump"; exit 1; }
[ "$(head -c 5 "$dump")" = "REDIS" ] || { log "$dump is not an RDB file"; exit 1; }
mkdir -p "$data"
data="$(cd "$data" && pwd)"
dump="$(cd "$(dirname "$dump")" && pwd)/$(basename "$dump")"

stamp="$(date -u +%Y%m%d-%H%M%S)"
aside="$data/pre-restore-$stamp"
for f in appendonlydir appendonly.aof dump.rdb; do
  if [ -e "$data/$f" ] && [ "$dump" != "$data/$f" ]; then
    mkdir -p "$aside"
    mv "$data/$f" "$aside/"
    log "moved $data/$f to $aside/"
  fi
done
if [ "$dump" != "$data/dump.rdb" ]; then
  cp "$dump" "$data/dump.rdb.partial"
  mv "$data/dump.rdb.partial" "$data/dump.rdb"
fi

sockdir="$(mktemp -d)"
sock="$sockdir/redis.sock"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
  rm -rf "$sockdir"
}
trap cleanup EXIT

"$server" --port 0 --unixsocket "$sock" --unixsocketperm 700 --dir "$data" \
  --dbfilename dump.rdb --appendonly no --save '' --daemonize no \
  --logfile "$sockdir/redis.log" &
pid=$!
cli() { redis-cli -s "$sock" "$@"; }

deadline=$(( $(date +%s) + timeout_secs ))
wait_until() { # $1 = description; rest = a command that succeeds when done
  local what="$1"; shift
  while ! "$@"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "redis-server exited while waiting for $what:"; cat "$sockdir/redis.log" >&2; exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then log "timed out waiting for $what"; exit 1; fi
    sleep 0.1
  done
}
loaded() { [ "$(cli PING 2>/dev/null)" = "PONG" ] && cli INFO persistence | tr -d '\r' | grep -q '^loading:0'; }
wait_until "the RDB to load" loaded
keys="$(cli DBSIZE)"
log "loaded $keys keys from $dump"

cli CONFIG SET appendonly yes >/dev/null
rewritten() {
  local info; info="$(cli INFO persistence | tr -d '\r')"
  grep -q '^aof_enabled:1' <<<"$info" &&
    grep -q '^aof_rewrite_in_progress:0' <<<"$info" &&
    grep -q '^aof_rewrite_scheduled:0' <<<"$info" &&
    ! grep -q '^aof_last_bgrewrite_status:err' <<<"$info"
}
wait_until "the AOF rewrite" rewritten
status="$(cli INFO persistence | tr -d '\r' | sed -n 's/^aof_last_bgrewrite_status://p')"
[ "$status" = "ok" ] || { log "AOF rewrite status: $status"; exit 1; }
after="$(cli DBSIZE)"
[ "$after" = "$keys" ] || { log "key count changed during restore: $keys -> $after"; exit 1; }

cli SHUTDOWN NOSAVE >/dev/null 2>&1 || true
wait "$pid" 2>/dev/null || true
pid=""
[ -d "$data/appendonlydir" ] || { log "no appendonlydir after the rewrite"; exit 1; }
log "restored $keys keys into $data (AOF rewritten; start redis-server with appendonly yes)"
echo "$keys"
