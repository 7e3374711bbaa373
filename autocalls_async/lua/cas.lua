-- Compare and set one token's schedule: write only if nobody changed its state since we read it.
-- KEYS[1]: the schedule (a hash, see read.lua). ARGV[1]: field 's' as read ('' when there was
-- none), ARGV[2]: its new value ('' deletes the key: nothing left to remember), ARGV[3]: the
-- key's lifetime (ms), ARGV[4], ARGV[5], ...: pairs of a queue report's field and its new value
-- ('' deletes the field). Queue reports are not compared: they never decide when a grant is
-- made, only who gets it, and each limiter writes its own.
-- Returns 1 when written, or when 's' already holds the new value (our own write, committed
-- by an earlier attempt whose answer was lost). Otherwise another process wrote first: returns
-- what read.lua returns, so that the caller can apply its update again at once.
local key = KEYS[1]
local kind = redis.call('TYPE', key)['ok']
local current = ''
if kind == 'string' then
  current = redis.call('GET', key)
elseif kind == 'hash' then
  current = redis.call('HGET', key, 's')
  if current == false then current = '' end
end
if current == ARGV[1] then
  if kind == 'string' or ARGV[2] == '' then redis.call('DEL', key) end
  if ARGV[2] ~= '' then
    redis.call('HSET', key, 's', ARGV[2])
    for i = 4, #ARGV, 2 do
      if ARGV[i + 1] == '' then
        redis.call('HDEL', key, ARGV[i])
      else
        redis.call('HSET', key, ARGV[i], ARGV[i + 1])
      end
    end
    redis.call('PEXPIRE', key, ARGV[3])
  end
  return 1
end
if current == ARGV[2] then return 1 end
local t = redis.call('TIME')
if kind == 'string' then return {t[1], t[2], {'s', current}} end
return {t[1], t[2], redis.call('HGETALL', key)}
