-- Prepended to every script (store/redis.py, _Script): the store's clock.
--
-- One clock for every gateway instance: the Redis server's, read inside the
-- atomic step, so instances with skewed clocks still agree on when a lesson
-- started, ends and may start again. `arg` is the caller's now ('' = TIME;
-- tests pass one). Seconds "." microseconds as a string, parsed once.
local function store_now(arg)
  if arg ~= '' then return arg end
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.rep('0', 6 - #t[2]) .. t[2]
end
