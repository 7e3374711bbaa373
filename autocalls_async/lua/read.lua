-- Read one token's schedule together with Redis's clock, atomically.
-- KEYS[1]: the schedule. Returns {seconds, microseconds, value or false}.
local t = redis.call('TIME')
return {t[1], t[2], redis.call('GET', KEYS[1])}
