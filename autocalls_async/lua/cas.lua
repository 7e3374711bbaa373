-- Compare and set one token's schedule: write only if nobody wrote since we read it.
-- KEYS[1]: the schedule. ARGV[1]: the value read ('' when there was none),
-- ARGV[2]: the new value ('' deletes: nothing left to remember), ARGV[3]: its lifetime (ms).
-- Returns 1 when written, or when the key already holds the new value (our own write,
-- committed by an earlier attempt whose answer was lost). Otherwise another process wrote
-- first: returns {seconds, microseconds, value} as read.lua does, so that the caller can apply
-- its update to the new value at once, without another round trip to read it.
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current == ARGV[1] then
  if ARGV[2] == '' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
  return 1
end
if current == ARGV[2] then return 1 end
local t = redis.call('TIME')
return {t[1], t[2], current}
