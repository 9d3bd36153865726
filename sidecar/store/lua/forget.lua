-- Forget an event's claim so the provider's next send of it is processed as new. Refused while the event is
-- pending or in flight: the stored request is then the only copy, and dropping it would lose the event.
-- KEYS[1] - the event hash
-- KEYS[2] - the shard's schedule zset
-- KEYS[3] - this forget's marker: "<token> <state>" for a minute, so that the same forget run again (the client
--           resends it after a lost answer) is answered as the first run was, not "no such event"
-- ARGV[1] - schedule member
-- ARGV[2] - the caller's token (unique per forget call)
-- returns the state the event had: '' (no such event), 'f' or 'p' (refused, nothing changed), 'd' or 'x' (forgotten)
local done = redis.call('GET', KEYS[3])
if done then
  local token, was = string.match(done, '^(%S+) (%S+)$')
  if token == ARGV[2] then
    return was
  end
end
local st = redis.call('HGET', KEYS[1], 'st')
if not st then
  return ''
end
if st == 'f' or st == 'p' then
  return st
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.pcall('SET', KEYS[3], ARGV[2] .. ' ' .. st, 'PX', 60000)
return st
