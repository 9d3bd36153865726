-- One page of dead letters in (dead_at, id) order, positioned by the last item of the previous page (not by an
-- offset), so a cursor stays valid while items are added or removed. Read-only; one script so that locating the
-- cursor and reading the page see the same index.
-- All keys share the {dlq} hash tag.
-- KEYS[1] - the index zset: all dead letters, or one route's (score = dead_at ms, member = id)
-- KEYS[2] - item data hash (id -> JSON)
-- ARGV[1] - cursor dead_at (ms), or '' to start at the beginning
-- ARGV[2] - cursor id (ids are compared bytewise, as the zset orders equal scores)
-- ARGV[3] - lowest dead_at to include (ms, or '-inf')
-- ARGV[4] - highest dead_at to include (ms, or '+inf')
-- ARGV[5] - page size (>= 1)
-- returns {total, more, id, dead_at, item JSON, id, dead_at, item JSON, ...}: `total` counts every item in the
-- dead_at window (not only those after the cursor); `more` is 1 when items follow the page.
-- (A last_status filter needs each item's JSON: dlq_scan.lua does that in bounded steps.)
local key, data = KEYS[1], KEYS[2]
local limit = tonumber(ARGV[5])

--#include lib_dlq_order

local first = 0
if ARGV[3] ~= '-inf' then first = redis.call('ZCOUNT', key, '-inf', '(' .. ARGV[3]) end
local stop = redis.call('ZCOUNT', key, '-inf', ARGV[4])  -- exclusive end rank
local start = first
if ARGV[1] ~= '' then start = math.max(first, rank_after(key, ARGV[1], ARGV[2])) end

local out = {math.max(stop - first, 0), 0}
local last = math.min(start + limit, stop) - 1
if last >= start then
  local page = redis.call('ZRANGE', key, start, last, 'WITHSCORES')
  for i = 1, #page, 2 do
    table.insert(out, page[i])
    table.insert(out, page[i + 1])
    table.insert(out, redis.call('HGET', data, page[i]) or '')
  end
end
if start + limit < stop then out[2] = 1 end
return out
