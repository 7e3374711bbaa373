-- Write queue reports only (the state 's' is unchanged): no comparison, so a limiter's report
-- never makes another's grant or start lose its compare-and-set (see cas.lua).
-- KEYS[1]: the schedule (a hash, see read.lua). ARGV[1]: the key's lifetime (ms) at least,
-- ARGV[2], ARGV[3], ...: pairs of a field and its new value ('' deletes the field).
-- Returns 1, or, for a value an earlier version wrote (a string), what read.lua returns (the
-- caller then converts it by compare-and-set).
local key = KEYS[1]
if redis.call('TYPE', key)['ok'] == 'string' then
  local t = redis.call('TIME')
  return {t[1], t[2], {'s', redis.call('GET', key)}}
end
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', key, ARGV[i])
  else
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
end
if redis.call('EXISTS', key) == 1 and redis.call('PTTL', key) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', key, ARGV[1])
end
return 1
