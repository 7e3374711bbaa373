-- Read one token's schedule together with Redis's clock, atomically.
-- KEYS[1]: the schedule, a hash: field 's' holds the shared state (JSON), each field
-- 'q:<limiter>' one limiter's report of its queue (JSON). Returns {seconds, microseconds,
-- {field, value, ...}}. A string value (written by an earlier version) reads as field 's'.
local t = redis.call('TIME')
if redis.call('TYPE', KEYS[1])['ok'] == 'string' then
  return {t[1], t[2], {'s', redis.call('GET', KEYS[1])}}
end
return {t[1], t[2], redis.call('HGETALL', KEYS[1])}
