-- drop_entry: set aside an entry that cannot be processed (unreadable, unknown process)
-- with its reason and its fields (at most MAX_COPIED_FIELDS, then `fields_total`), and
-- acknowledge it. With a consumer given, only its owner may drop it.
-- KEYS[1] the stream, KEYS[2] the quarantine stream
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] reason ('' to drop without keeping a copy),
-- ARGV[4] owner consumer ('' to skip the owner check)
-- Returns 'ok' | 'stale'
local stream, quarantine = KEYS[1], KEYS[2]
local group, id, reason, owner = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if owner ~= '' then
  local p = pending_entry(stream, group, id)
  if not p or p[2] ~= owner then
    return 'stale'
  end
end
if reason ~= '' then
  local e = redis.call('XRANGE', stream, id, id)[1]
  local args = {quarantine, 'MAXLEN', '~', 100000, '*', E_SOURCE, stream, E_ENTRY_ID, id, E_REASON, reason}
  if e then
    append_fields(args, e[2])
  end
  redis.call('XADD', unpack(args))
end
ack(stream, group, id)
return 'ok'
