-- Add one replica's requests to a day's use (by 15-minute slot and inbound key), and return
-- the day's use by every replica. Attribution only: nothing is admitted by it.
-- KEYS[1] the day's hash ("slot/key" -> requests)
-- ARGV[1] how long to keep it after this write (ms)   ARGV[2..] field, count, field, count…
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], tonumber(ARGV[i + 1]))
end
if #ARGV > 1 then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
end
return redis.call('HGETALL', KEYS[1])
