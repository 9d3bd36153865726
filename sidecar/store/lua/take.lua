#!lua flags=allow-oom
-- Take one due event for a new attempt: due -> in flight, scored by its lease deadline.
-- The score is re-checked inside the script, so among any number of replicas reading the same due list, exactly
-- one takes the event; an in-flight event whose taker died is due again once its lease deadline passes.
-- KEYS[1] - the event hash
-- KEYS[2] - the shard's schedule zset
-- KEYS[3] - the shard's stats hash, optional: its `<route>:pending` is counted down for an event found gone
-- ARGV[1] - now (ms)
-- ARGV[2] - lease deadline (ms)
-- ARGV[3] - schedule member
-- ARGV[4] - lease (ms), optional: the deadline written is at least the store's TIME + lease, so a replica whose
--           carried clock is behind (its monotonic clock stood still: a VM resumed from a pause, a host resumed
--           from suspend) never writes a lease that has already run out (another replica would take the event
--           while this one sends it)
-- returns {attempt, meta, body, first_seen_ms, event_id, history, run, burial ('' or burying.lua's note)}, false
-- when not due / not takeable, or {-1} when the schedule entry's event is gone from the store (no version of this
-- code leaves one so: it was evicted, under a maxmemory-policy other than noeviction, or deleted by hand): the
-- entry is dropped, and the caller says so
local score = redis.call('ZSCORE', KEYS[2], ARGV[3])
if not score or tonumber(score) > tonumber(ARGV[1]) then
  return false
end
local st = redis.call('HGET', KEYS[1], 'st')
if st ~= 'p' and st ~= 'f' then
  -- forgotten, delivered or dead: the schedule entry is stale
  redis.call('ZREM', KEYS[2], ARGV[3])
  if not st then
    if KEYS[3] then
      local route = string.match(ARGV[3], '^([^:]+):')
      if route and tonumber(redis.call('HGET', KEYS[3], route .. ':pending') or '0') > 0 then
        redis.call('HINCRBY', KEYS[3], route .. ':pending', -1)
      end
    end
    return {-1}
  end
  return false
end
local deadline = tonumber(ARGV[2])
if ARGV[4] then
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[4])
  if floor > deadline + 1000 then deadline = floor end  -- behind by more than a round trip's slack
end
redis.call('ZADD', KEYS[2], string.format('%d', deadline), ARGV[3])
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 'st', 'f')
local v = redis.call('HMGET', KEYS[1], 'meta', 'body', 'first', 'eid', 'hist', 'run', 'bur')
return {n, v[1], v[2], v[3], v[4], v[5] or '', v[6] or v[3], v[7] or ''}
