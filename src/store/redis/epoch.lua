-- The store's epoch: a value written once, read back by every replica. A replica that finds
-- none (a first start, or a Redis that lost its data: FLUSHALL, a restart without persistence)
-- writes a new one and starts the recovery windows; one that finds another than it knew
-- learns that the store lost its data and another replica noticed first.
-- KEYS[1] epoch   KEYS[2] locks' recovery window   KEYS[3] counts' recovery window
-- ARGV[1] the epoch this replica knows ('' for none)   ARGV[2] a new epoch, "<now ms>-<random>"
-- ARGV[3] now (ms)   ARGV[4] the counts' window (ms)   ARGV[5] this replica's lock life (ms)
-- -> {epoch, status}: 0 as known (or learnt at a first look), 1 changed (a loss another
--    replica noticed first), 2 none was there (this replica wrote it)
local stored = redis.call('GET', KEYS[1])
local now, counts, locks = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
-- A window never shortened, only lengthened to end `ends` (Unix ms).
local function until_at_least(key, ends)
  local left = ends - now
  if left > 0 and redis.call('PTTL', key) < left then
    redis.call('SET', key, '1', 'PX', left)
  end
end
if stored and (stored == ARGV[1] or ARGV[1] == '') then
  return {stored, 0}
end
if stored then
  -- No refresh lock for a lock's life after the loss was first noticed: a holder this
  -- replica does not know of (paused, cut off) may still be waiting for its answer.
  local noticed = tonumber(string.match(stored, '^(%d+)-')) or now
  until_at_least(KEYS[2], noticed + locks)
  return {stored, 1}
end
redis.call('SET', KEYS[1], ARGV[2])
until_at_least(KEYS[3], now + counts)
if ARGV[1] ~= '' then
  until_at_least(KEYS[2], now + math.max(locks, counts))
else
  -- Whether a loss or a first start is not known here: long enough for a replica that knew
  -- the old epoch to notice (a heartbeat), which then lengthens it to a lock's life.
  until_at_least(KEYS[2], now + counts)
end
return {ARGV[2], 2}
