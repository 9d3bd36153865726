-- Forget an event's claim so the provider's next send of it is processed as new. Refused while the event is
-- pending or in flight: the stored request is then the only copy, and dropping it would lose the event.
-- KEYS[1] - the event hash
-- KEYS[2] - the shard's schedule zset
-- ARGV[1] - schedule member
-- returns the state the event had: '' (no such event), 'f' or 'p' (refused, nothing changed), 'd' or 'x' (forgotten)
local st = redis.call('HGET', KEYS[1], 'st')
if not st then
  return ''
end
if st == 'f' or st == 'p' then
  return st
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return st
