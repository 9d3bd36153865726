-- Bind a single-use value a provider signs (Mailgun's token) to the body it came with, for as long as its signed
-- timestamp can pass the freshness check. The same value with the same body again is the same delivery (a
-- provider retry: the claim answers it as a duplicate); with another body it is a captured signature carrying
-- a forged payload (Mailgun signs only timestamp and token, not the body).
-- KEYS[1] - the nonce key
-- ARGV[1] - digest of the body
-- ARGV[2] - time to live (ms)
-- returns 1 when the value is new or came with this body before, 0 when it came with another body
local bound = redis.call('GET', KEYS[1])
if bound then
  if bound == ARGV[1] then return 1 end
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
