-- Compare and set one token's schedule: write only if nobody wrote since we read it.
-- KEYS[1]: the schedule. ARGV[1]: the value read ('' when there was none),
-- ARGV[2]: the new value ('' deletes: nothing left to remember), ARGV[3]: its lifetime (ms).
-- Returns 1 when written, 0 when another process wrote first (read again and retry).
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
