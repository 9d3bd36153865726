#!lua flags=allow-oom
-- Take one due event for a new attempt: due -> in flight, scored by its lease deadline.
-- The score is re-checked inside the script, so among any number of replicas reading the same due list, exactly
-- one takes the event; an in-flight event whose taker died is due again once its lease deadline passes.
-- KEYS[1] - the event hash
-- KEYS[2] - the shard's schedule zset
-- ARGV[1] - now (ms)
-- ARGV[2] - lease deadline (ms)
-- ARGV[3] - schedule member
-- returns {attempt, meta, body, first_seen_ms, event_id, history} or false when not due / not takeable
local score = redis.call('ZSCORE', KEYS[2], ARGV[3])
if not score or tonumber(score) > tonumber(ARGV[1]) then
  return false
end
local st = redis.call('HGET', KEYS[1], 'st')
if st ~= 'p' and st ~= 'f' then
  -- forgotten, delivered or dead: the schedule entry is stale
  redis.call('ZREM', KEYS[2], ARGV[3])
  return false
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 'st', 'f')
local v = redis.call('HMGET', KEYS[1], 'meta', 'body', 'first', 'eid', 'hist')
return {n, v[1], v[2], v[3], v[4], v[5] or ''}
