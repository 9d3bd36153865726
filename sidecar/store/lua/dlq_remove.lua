-- Remove one dead letter, only if it is still the version the caller read (same dead_at): an event replayed and
-- buried again meanwhile has a new version under the same id, which must stay.
-- All keys share the {dlq} hash tag.
-- KEYS[1] - all dead letters zset
-- KEYS[2] - item data hash
-- KEYS[3] - item body hash
-- KEYS[4] - the item's route zset
-- KEYS[5] - taken hash (dlq_take.lua): the item's mark goes with it
-- ARGV[1] - item id
-- ARGV[2] - dead_at (ms) the caller read
-- returns 1 when removed, 0 when gone or replaced by a newer version
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
return 1
