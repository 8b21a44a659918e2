-- release: a held lesson connection closed; its activity lasted until now.
-- Mirrors MemoryStore.release: only a live lease counts (one that lapsed
-- stopped being activity at its expiry).
--
-- KEYS[1] clock hash   KEYS[2] conns zset
-- ARGV    now ('' = Redis TIME), conn_id
-- Returns 1 if a live lease was released, else 0.

local now_s = store_now(ARGV[1])  -- _clock.lua
local now = tonumber(now_s)

local expiry = redis.call('ZSCORE', KEYS[2], ARGV[2])
if not expiry then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
if tonumber(expiry) <= now then return 0 end
local last = redis.call('HGET', KEYS[1], 'last')
if last and now > tonumber(last) then  -- last = max(last, now)
  redis.call('HSET', KEYS[1], 'last', now_s)
end
return 1
