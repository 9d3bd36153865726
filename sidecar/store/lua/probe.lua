-- Run once per store node at start: which of the commands the other scripts call is this connection's user not
-- allowed to run (ACL, a managed service's restrictions) or does the server not know (rename-command "")? A script
-- that meets one half way has already written what came before it (scripts are not rolled back): a claim stored
-- without its schedule entry, answered `duplicate` to every resend and never delivered.
-- KEYS[1] - a probe hash, KEYS[2] - a probe sorted set, KEYS[3] - a probe string (all in one slot, deleted again)
-- returns the names of the commands refused for want of permission or unknown (other errors, e.g. OOM, are not
-- counted: the probe is about what the user may run)
local denied = {}
local function try(name, ...)
  local r = redis.pcall(name, ...)
  if type(r) == 'table' and r.err then
    local e = r.err
    if string.find(e, "can't run this command", 1, true) or string.find(e, 'Unknown Redis command', 1, true)
        or string.find(e, 'NOPERM', 1, true) or string.find(e, 'no permissions', 1, true) then
      denied[#denied + 1] = string.lower(name)
    end
  end
end
try('TIME')
try('EXISTS', KEYS[1])
try('HGET', KEYS[1], 'p')
try('HMGET', KEYS[1], 'p')
try('HEXISTS', KEYS[1], 'p')
try('HKEYS', KEYS[1])
try('GET', KEYS[3])
try('ZSCORE', KEYS[2], 'p')
try('ZCARD', KEYS[2])
try('ZRANK', KEYS[2], 'p')
try('ZCOUNT', KEYS[2], '-inf', '+inf')
try('ZRANGE', KEYS[2], 0, 0)
try('HSET', KEYS[1], 'p', '1')
try('HINCRBY', KEYS[1], 'n', 1)
try('HDEL', KEYS[1], 'p')
try('PEXPIRE', KEYS[1], 60000)
try('PERSIST', KEYS[1])
try('ZADD', KEYS[2], 0, 'p')
try('ZREM', KEYS[2], 'p')
try('SET', KEYS[3], '1', 'PX', 60000)
try('DEL', KEYS[1], KEYS[2], KEYS[3])
return denied
