#!lua flags=allow-oom
-- Index a public event id -> its dedupe id, for admin lookups (see RedisStore._index_alias). allow-oom: the claim
-- it indexes was accepted (answered 2xx); refused at maxmemory, the index was given up after a minute, and every
-- lookup and forget by the provider's id answered 404 "never seen" for an event the store holds. ~200 bytes, at
-- most one per claim the store accepted.
-- KEYS[1] - the alias key
-- ARGV[1] - dedupe id
-- ARGV[2] - time to live (ms)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
