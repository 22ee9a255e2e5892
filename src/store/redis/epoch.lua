-- The store's epoch: a value written once, read back by every replica, and its clock: a
-- counter every look bumps. A replica that finds no epoch (a first start, or a Redis that lost
-- its data: FLUSHALL, a restart without persistence), or the clock at or below what it saw
-- before (a restart from an older snapshot, a failover to a stale replica: the epoch came back
-- but what was written since did not, locks included), writes a new epoch and starts the
-- recovery windows; one that finds another epoch than it knew learns that the store lost its
-- data and another replica noticed first.
-- KEYS[1] epoch   KEYS[2] locks' recovery window   KEYS[3] counts' recovery window
-- KEYS[4] clock
-- ARGV[1] the epoch this replica knows ('' for none)   ARGV[2] the highest clock it saw
-- ARGV[3] a random suffix for a new epoch   ARGV[4] the counts' window (ms)
-- ARGV[5] this replica's lock life (ms)
-- -> {epoch, status, clock}: 0 as known (or learnt at a first look), 1 changed (a loss another
--    replica noticed first), 2 this replica found it gone and wrote a new one
-- Redis 6 replicates a script's writes after TIME only this way; Redis 7 always does.
if redis.replicate_commands then
  redis.replicate_commands()
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local counts, locks = tonumber(ARGV[4]), tonumber(ARGV[5])
-- A window never shortened, only lengthened to end `ends` (Unix ms, Redis's clock).
local function until_at_least(key, ends)
  local left = ends - now
  if left > 0 and redis.call('PTTL', key) < left then
    redis.call('SET', key, '1', 'PX', left)
  end
end
local stored = redis.call('GET', KEYS[1])
local clock = redis.call('INCR', KEYS[4])
local went_back = stored and stored == ARGV[1] and clock <= tonumber(ARGV[2])
if stored and not went_back and (stored == ARGV[1] or ARGV[1] == '') then
  return {stored, 0, clock}
end
if stored and not went_back then
  -- No refresh lock for a lock's life after the loss was first noticed: a holder this
  -- replica does not know of (paused, cut off) may still be waiting for its answer.
  local noticed = tonumber(string.match(stored, '^(%d+)-')) or now
  until_at_least(KEYS[2], noticed + locks)
  return {stored, 1, clock}
end
local epoch = now .. '-' .. ARGV[3]
redis.call('SET', KEYS[1], epoch)
until_at_least(KEYS[3], now + counts)
if ARGV[1] ~= '' then
  until_at_least(KEYS[2], now + math.max(locks, counts))
else
  -- Whether a loss or a first start is not known here: long enough for a replica that knew
  -- the old epoch to notice (a heartbeat), which then lengthens it to a lock's life.
  until_at_least(KEYS[2], now + counts)
end
return {epoch, 2, clock}
