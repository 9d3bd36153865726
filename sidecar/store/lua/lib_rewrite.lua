-- Not a script of its own: its text stands in for `--#include lib_rewrite` in the scripts that rewrite an event
-- hash (ack.lua, replay.lua), put there by `redis_store.script_source`.
-- Rewrite hash `key` to exactly `fields` (a flat name/value list). DEL + HSET gives the hash the compact encoding
-- again, but while its slot is being migrated (CLUSTER SETSLOT MIGRATING) a key this script deleted is "not local"
-- any more: the HSET fails the script half way, the event deleted. Probed with a key that does not exist: in a
-- migrating slot its access is refused (pcall returns the error); there the hash is rewritten in place.
local function rewrite(key, fields)
  if type(redis.pcall('EXISTS', key .. ':migrating?')) ~= 'table' then
    redis.call('DEL', key)
    redis.call('HSET', key, unpack(fields))
    return
  end
  redis.call('HSET', key, unpack(fields))
  local keep = {}
  for i = 1, #fields, 2 do keep[fields[i]] = true end
  for _, name in ipairs(redis.call('HKEYS', key)) do
    if not keep[name] then redis.call('HDEL', key, name) end
  end
  redis.call('PERSIST', key)
end
