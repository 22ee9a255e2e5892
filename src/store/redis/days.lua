-- The counts of one upstream's windows of one length (days; or the fixed windows of
-- per_second, per_minute, per_hour), kept in one hash whose fields name a window by its span
-- in Unix ms ("start-end"). A day of another schedule that overlaps the one being counted (a
-- changed day_starts) is the same count: reserving moves it into this day, so it is never
-- counted twice; a day that ended before this one started is forgotten; once a later day has
-- started this one grants nothing more. Never grants past the limit.
-- KEYS[1] the hash   KEYS[2] the store's epoch   KEYS[3] the counts' recovery window
-- ARGV[1] operation: reserve | restore | release | used
-- ARGV[2] start ms   ARGV[3] end ms
-- reserve: ARGV[4] limit, ARGV[5] want, ARGV[6] the count and ARGV[7] the version the
--          caller last saw: field "v" counts every reserve and release, so a hash whose
--          version is not above the one seen went back in time (Redis flushed, or failed
--          over to a stale replica) and takes that count back first; ARGV[8] the epoch the
--          caller knows -> {granted, used, v}; {-1, 0, 0} the epoch is not the caller's
--          (the store may have lost its data: look at it first); {-2, ms left, 0} the store
--          lost its data a moment ago and grants nothing while the replicas write back
-- restore: ARGV[4] a count and ARGV[5] the version the caller saw: the window's count is at
--          least that from now on (after a loss), and its version past it -> {0, used, v}
-- release: ARGV[4] count, ARGV[5] the epoch the caller knows -> 0; -1 (nothing given back)
--          the epoch is not the caller's: the count since written back may not hold them
-- used:    -> {used, v, the store's epoch or ''}
local op, start, finish = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if op == 'release' and redis.call('GET', KEYS[2]) ~= ARGV[5] then
  return -1
end
if op == 'reserve' then
  if redis.call('GET', KEYS[2]) ~= ARGV[8] then
    return {-1, 0, 0}
  end
  local recovering = redis.call('PTTL', KEYS[3])
  if recovering > 0 then
    return {-2, recovering, 0}
  end
end
local me = ARGV[2] .. '-' .. ARGV[3]
local fields = redis.call('HGETALL', KEYS[1])
local mine, others, ended, count, over = nil, {}, {}, 0, false
for i = 1, #fields, 2 do
  local s, e = string.match(fields[i], '^(%d+)-(%d+)$')
  if s then
    s, e = tonumber(s), tonumber(e)
    local n = tonumber(fields[i + 1])
    if fields[i] == me then
      mine = n
      count = count + n
    elseif e <= start then
      ended[#ended + 1] = fields[i]
    elseif s >= finish then
      over = true
    else
      others[#others + 1] = {fields[i], n}
      count = count + n
    end
  end
end
if op == 'used' then
  return {count, tonumber(redis.call('HGET', KEYS[1], 'v') or '0'),
    redis.call('GET', KEYS[2]) or ''}
end
if op == 'release' and mine == nil and #others == 0 then
  -- Nothing left to give back to (the window ended, or the hash expired): leave no key.
  return 0
end
local version = redis.call('HINCRBY', KEYS[1], 'v', 1)
if op == 'restore' and tonumber(ARGV[5]) >= version then
  -- Versions go on from the highest any replica saw, so that a count given back later is
  -- not taken for another loss.
  version = tonumber(ARGV[5]) + 1
  redis.call('HSET', KEYS[1], 'v', version)
end
if op == 'release' then
  local left = tonumber(ARGV[4])
  if mine then
    local taken = math.min(left, mine)
    left = left - taken
    redis.call('HSET', KEYS[1], me, mine - taken)
  end
  for _, other in ipairs(others) do
    if left == 0 then break end
    local taken = math.min(left, other[2])
    left = left - taken
    redis.call('HSET', KEYS[1], other[1], other[2] - taken)
  end
  return 0
end
-- reserve, restore
if over then
  return {0, count, version}
end
for _, field in ipairs(ended) do redis.call('HDEL', KEYS[1], field) end
for _, other in ipairs(others) do redis.call('HDEL', KEYS[1], other[1]) end
local granted = 0
if op == 'restore' then
  count = math.max(count, tonumber(ARGV[4]))
else
  local limit, want = tonumber(ARGV[4]), tonumber(ARGV[5])
  if version <= tonumber(ARGV[7]) then
    count = math.max(count, tonumber(ARGV[6]))
  end
  granted = math.max(0, math.min(want, limit - count))
end
redis.call('HSET', KEYS[1], me, count + granted)
-- The hash outlives its last reservation by two windows (at least a minute), then goes; an
-- expiry relative to Redis's own clock, so a replica's clock ahead or behind cannot make it
-- expire at once.
redis.call('PEXPIRE', KEYS[1], math.max(2 * (finish - start), 60000))
return {granted, count + granted, version}
