#!/usr/bin/env bash
# Renders the Redis ACL file (redis.conf `aclfile`) from deploy/redis/users.acl.template and
# the roles' passwords, so that no password is ever committed and the file on disk holds
# only SHA-256 hashes.
#
#   deploy/scripts/render-redis-acl.sh TEMPLATE OUT
#
# - Comment lines (#) and blank lines are dropped; a line ending in `\` continues on the next.
# - `@prefix@` becomes HONUA_KEY_PREFIX (default `honua`, the config's `key_prefix`).
# - On the line `user honua-<role> ...`, `@password@` becomes `#<sha256>` of
#   REDIS_PASSWORD_<ROLE> (role upper-cased, `-` -> `_`: REDIS_PASSWORD_SCHEDULER,
#   _WORKER, _BACKUP, _KEDA, _ADMIN). A role listed in REDIS_ACL_REQUIRED (default
#   "admin scheduler worker") must have one (>= 16 characters, e.g. `openssl rand -hex 24`);
#   any other role without a password is rendered `off` (it cannot log in).
# Exit non-zero, writing nothing, on a missing required password or a malformed template.
# redis-0's `acl` init container runs it at every start from redis-secret; tests run it too.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 TEMPLATE OUT" >&2
  exit 2
fi
template="$1"
out="$2"
prefix="${HONUA_KEY_PREFIX:-honua}"
required=" ${REDIS_ACL_REQUIRED:-admin scheduler worker} "
log() { echo "render-redis-acl: $*" >&2; }

case "$prefix" in
  ''|*[!A-Za-z0-9_.-]*) log "HONUA_KEY_PREFIX '$prefix': use letters, digits, '_', '.', '-'"; exit 1;;
esac
[ -f "$template" ] || { log "no such template: $template"; exit 1; }

render_line() { # $1 = one joined `user ...` line
  local line="$1" name role var pw hash
  read -r _ name _ <<<"$line"
  case "$line" in
    user\ *) ;;
    *) log "not a user line: $line"; exit 1;;
  esac
  if [[ "$line" == *@password@* ]]; then
    role="${name#honua-}"
    var="REDIS_PASSWORD_$(tr 'a-z-' 'A-Z_' <<<"$role")"
    pw="${!var:-}"
    if [ -z "$pw" ]; then
      if [[ "$required" == *" $role "* ]]; then
        log "$var is not set: user $name needs a password (redis-secret key $role-password)"
        exit 1
      fi
      log "$var is not set: user $name is rendered off"
      line="${line/ on @password@/ off resetpass}"
      line="${line/@password@/resetpass}"
    else
      if [ "${#pw}" -lt 16 ]; then
        log "$var is shorter than 16 characters"
        exit 1
      fi
      hash="$(printf '%s' "$pw" | sha256sum | cut -d' ' -f1)"
      line="${line//@password@/#$hash}"
    fi
  fi
  line="${line//@prefix@/$prefix}"
  if [[ "$line" =~ @[a-z_]+@ ]]; then
    log "unknown placeholder in: $line"
    exit 1
  fi
  printf '%s\n' "$line"
}

tmp="$out.partial"
umask 077
: > "$tmp"
trap 'rm -f "$tmp"' EXIT
acc=""
users=0
while IFS= read -r raw || [ -n "$raw" ]; do
  trimmed="${raw#"${raw%%[![:space:]]*}"}"
  if [ -z "$acc" ] && { [ -z "$trimmed" ] || [ "${trimmed:0:1}" = "#" ]; }; then
    continue
  fi
  if [ "${trimmed: -1}" = "\\" ]; then
    acc+="${trimmed%\\} "
    continue
  fi
  acc+="$trimmed"
  # Collapse runs of spaces left by the continuations.
  acc="$(tr -s ' ' <<<"$acc")"
  render_line "$acc" >> "$tmp"
  users=$((users + 1))
  acc=""
done < "$template"
[ -z "$acc" ] || { log "the template ends inside a continued line"; exit 1; }
[ "$users" -gt 0 ] || { log "no users in $template"; exit 1; }
mv "$tmp" "$out"
trap - EXIT
log "wrote $users users to $out"
