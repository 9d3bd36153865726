-- Not a script of its own: its text stands in for `--#include lib_dlq_order` in the scripts that page through a
-- dead-letter index in (dead_at, id) order (dlq_page.lua, dlq_scan.lua), put there by `redis_store.script_source`.

-- Bytewise less-or-equal (Lua's `<=` on strings follows the server's locale; the zset does not).
local function le(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a <= #b
end

-- First rank in zset `key` whose (score, member) sorts after (score, id): binary search among the members with
-- that score.
local function rank_after(key, score, id)
  local lo = redis.call('ZCOUNT', key, '-inf', '(' .. score)
  local hi = redis.call('ZCOUNT', key, '-inf', score)
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local m = redis.call('ZRANGE', key, mid, mid)[1]
    if le(m, id) then lo = mid + 1 else hi = mid end
  end
  return lo
end
