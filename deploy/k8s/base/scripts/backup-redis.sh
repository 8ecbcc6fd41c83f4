#!/usr/bin/env bash
# Backs up a Redis server to DEST_DIR/dump-<UTC date>.rdb, from anywhere that can reach it
# (a laptop, a CronJob pod, a CI runner): no kubectl, no access to the server's disk.
#
#   deploy/scripts/backup-redis.sh REDIS_URL DEST_DIR
#
# 1. BGSAVE, then wait (with a deadline) until LASTSAVE changes and the save succeeded:
#    the snapshot is then a consistent point in time that contains every write
#    acknowledged before the BGSAVE was issued.
# 2. Fetch a snapshot with `redis-cli --rdb` (the replication protocol: it works
#    remotely and on managed Redis that allows SYNC). Note: --rdb makes the server produce
#    a fresh RDB for the transfer, so the file holds everything up to the fetch, a superset
#    of step 1 (Redis >= 7 delays it by repl-diskless-sync-delay, 5 s). Step 1 is kept because it also proves the server can write its own RDB
#    (disk full, permissions) and leaves a local dump.rdb on the server's volume.
# 3. Check the file (RDB magic, and redis-check-rdb when installed), keep BACKUP_KEEP_DAYS
#    (default 7) days of dumps, and run BACKUP_UPLOAD_COMMAND if set, with the dump's path
#    as "$1" (e.g. 'aws s3 cp "$1" s3://honua-backups/redis/').
#
# Environment: BACKUP_TIMEOUT_SECS (default 300) bounds the wait for BGSAVE;
# REDISCLI_AUTH may hold the password instead of the URL. Prints the dump's path on stdout
# (last line); progress on stderr. Exit 0 only when the dump was written and checked.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 REDIS_URL DEST_DIR" >&2
  exit 2
fi
url="$1"
dest="$2"
timeout_secs="${BACKUP_TIMEOUT_SECS:-300}"
keep_days="${BACKUP_KEEP_DAYS:-7}"

cli() { redis-cli -u "$url" --no-auth-warning "$@"; }
log() { echo "backup-redis: $*" >&2; }

info_field() { cli INFO persistence | tr -d '\r' | sed -n "s/^$1://p"; }

mkdir -p "$dest"
before="$(cli LASTSAVE)"
case "$before" in ''|*[!0-9]*) log "LASTSAVE failed: $before"; exit 1;; esac
# LASTSAVE has one-second resolution: a save finishing in the same second as the previous
# one would not change it. Redis >= 7 also counts saves (rdb_saves): either change ends
# the wait.
saves_before="$(info_field rdb_saves)"

# BGSAVE fails while an AOF rewrite or another save runs: SCHEDULE queues it instead.
reply="$(cli BGSAVE SCHEDULE)"
log "BGSAVE: $reply"
case "$reply" in
  *ERR*|*error*|*NOAUTH*|*WRONGPASS*) log "BGSAVE refused: $reply"; exit 1;;
esac

deadline=$(( $(date +%s) + timeout_secs ))
while :; do
  now_save="$(cli LASTSAVE)"
  saves_now="$(info_field rdb_saves)"
  if [ "$now_save" != "$before" ] || { [ -n "$saves_before" ] && [ "$saves_now" != "$saves_before" ]; }; then
    if [ "$(info_field rdb_bgsave_in_progress)" = "1" ]; then sleep 0.1; continue; fi
    status="$(info_field rdb_last_bgsave_status)"
    if [ "$status" != "ok" ]; then
      log "BGSAVE finished with status '$status'"
      exit 1
    fi
    break
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    log "LASTSAVE did not change within ${timeout_secs}s"
    exit 1
  fi
  sleep 0.2
done
log "BGSAVE done (LASTSAVE $before -> $now_save)"

stamp="$(date -u +%Y%m%d-%H%M%S)"
out="$dest/dump-$stamp.rdb"
tmp="$out.partial"
if ! cli --rdb "$tmp" >&2; then
  rm -f "$tmp"
  log "redis-cli --rdb failed"
  exit 1
fi
if [ "$(head -c 5 "$tmp")" != "REDIS" ]; then
  rm -f "$tmp"
  log "fetched file is not an RDB"
  exit 1
fi
if command -v redis-check-rdb >/dev/null 2>&1; then
  if ! redis-check-rdb "$tmp" >/dev/null 2>&1; then
    log "redis-check-rdb rejected the dump (kept as $tmp)"
    exit 1
  fi
fi
mv "$tmp" "$out"
log "wrote $out ($(wc -c < "$out") bytes)"

find "$dest" -maxdepth 1 -name 'dump-*.rdb' -mtime +"$keep_days" -print -delete >&2 || true

if [ -n "${BACKUP_UPLOAD_COMMAND:-}" ]; then
  log "uploading: $BACKUP_UPLOAD_COMMAND"
  bash -c "$BACKUP_UPLOAD_COMMAND" upload "$out"
fi
echo "$out"
