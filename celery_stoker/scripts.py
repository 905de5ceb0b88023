"""Every Lua script celery-stoker runs, each headed by what its KEYS, ARGV and reply mean.

One script touches the keys of one Stoker only (they share its hash tag), so
every script runs in one Cluster slot: the draining check reads the Stoker's
own copy of the draining set, and announcements go to the channel the caller
names with the command it names (``PUBLISH`` to the prefix's channel on a
single Redis, ``SPUBLISH`` to the Stoker's shard channel, in its slot, on a
Redis Cluster).  Every check comes before the first write,
so a script that is refused half-way leaves nothing half-applied.  Announcements
are best effort (``redis.pcall``, last): a refused or failed announcement never
aborts the write before it; followers then wait for the lease's expiry instead
of the message.  ``PROBE`` (and ``access.py``) find a Redis user's missing
permissions before any of these runs.

The lease value is JSON written by ``ACQUIRE`` (``{"v":1,"token":N,"since":ms,
"holder":id,"host":node,"app":name}``, and ``"lost":{"seen":N,"held":N}`` in a term
that found Redis behind the fleet; values from before ``app`` read as well)
or by ``RELEASE`` for a handoff (``{"v":1,"reserved_for":node,"since":ms}``);
``lease.Holder.parse`` reads it in Python and ``COMMIT`` finds the token in it as digits.

A waiter is alive while its worker's listener subscribes to its presence
channel (``keys.worker_channel``): ACQUIRE and RELEASE ask ``PUBSUB NUMSUB``
for the waiters they look at and forget those without a subscriber (a worker
killed without a clean stop), so a dead waiter is neither named at a release
nor kept for good.  They look at a bounded window (:data:`PRUNE_WINDOW`), never
the whole set.  A refused ``PUBSUB`` (an ACL from before it) trusts the waiter.
"""

from __future__ import annotations

#: How many waiters a script looks at for liveness: a joining follower the first
#: and the last this many (the oldest and the newest, where a fleet's dead ones
#: are), a release up to four times this many from the front.
PRUNE_WINDOW = 8

#: Lua shared by ACQUIRE and RELEASE: is waiter ``node`` alive?  Yes when its
#: presence channel (``prefix .. node``) has a subscriber; ``prefix`` '' (a Redis
#: Cluster, a caller without a listener) or a refused PUBSUB trusts every waiter.
_ALIVE = """
local function alive(prefix, node)
  if prefix == nil or prefix == '' then return true end
  local reply = redis.pcall('PUBSUB', 'NUMSUB', prefix .. node)
  if type(reply) ~= 'table' or reply.err then return true end
  return tonumber(reply[2]) ~= 0
end
"""

#: Take the lease if nobody holds it (or it is reserved for this worker).
#:
#: KEYS[1] lease, KEYS[2] token counter, KEYS[3] the Stoker's draining mark, KEYS[4] waiters.
#: ARGV[1] holder id, ARGV[2] this worker's node name, ARGV[3] TTL in ms,
#: ARGV[4] the highest token the caller has seen, ARGV[5] channel, ARGV[6] Stoker name,
#: ARGV[7] the publish command (PUBLISH or SPUBLISH), ARGV[8] the holder's Celery app
#: (so a worker of another app sharing the prefix can say so), ARGV[9] the presence
#: channels' prefix ('' or absent: trust every waiter).
#: Reply: ``{1, value, ttl ms, fresh}`` taken (``fresh`` 1 when the counter was
#: missing: Redis lost its data, or this is the first term ever).  When the
#: counter Redis holds is below ARGV[4] (a restored snapshot, a replica promoted
#: without the last writes: Redis holds less history than the fleet has seen) the
#: value carries ``"lost":{"seen":ARGV[4],"held":counter or 0}``, for the whole term;
#: ``{0, value, pttl, rank}`` held by another (this worker joins the waiters, and
#: the first and last :data:`PRUNE_WINDOW` of them without a live listener are
#: dropped; ``rank`` is its place among them, 0 = first to try after a release, -1 unknown);
#: ``{2, value or '', pttl}`` this worker is draining (it leaves the waiters).
#: A new term is announced as ``acquired <ttl> <name> <node> <its former rank>``.
ACQUIRE = (
    _ALIVE
    + """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local current = redis.call('GET', KEYS[1])
if redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then
  redis.pcall('ZREM', KEYS[4], ARGV[2])
  return {2, current or '', redis.call('PTTL', KEYS[1])}
end
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if current then
  local ok, data = pcall(cjson.decode, current)
  if not (ok and type(data) == 'table' and data.reserved_for == ARGV[2]) then
    -- Waiter bookkeeping is best effort (redis.pcall): a full Redis refuses ZADD,
    -- and the follower must still learn who holds the lease.
    redis.pcall('ZADD', KEYS[4], 'NX', now_ms, ARGV[2])
    if ARGV[9] and ARGV[9] ~= '' then
      local seen = {[ARGV[2]] = true}
      for _, window in ipairs({{0, WINDOW - 1}, {-WINDOW, -1}}) do
        local nodes = redis.pcall('ZRANGE', KEYS[4], window[1], window[2])
        if type(nodes) == 'table' and not nodes.err then
          for _, node in ipairs(nodes) do
            if not seen[node] then
              seen[node] = true
              if not alive(ARGV[9], node) then redis.pcall('ZREM', KEYS[4], node) end
            end
          end
        end
      end
    end
    local rank = redis.pcall('ZRANK', KEYS[4], ARGV[2])
    if type(rank) ~= 'number' then rank = -1 end
    return {0, current, redis.call('PTTL', KEYS[1]), rank}
  end
end
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local floor = tonumber(ARGV[4])
local fresh = 0
local counted = 0
if redis.call('EXISTS', KEYS[2]) == 0 then
  fresh = 1
else
  counted = redis.call('INCR', KEYS[2])
end
-- The counter always equals the newest token issued here: one below a token the
-- caller saw means Redis lost writes it had acknowledged.
local held = math.max(counted - 1, 0)
local lost = ''
if floor > held then
  lost = string.format(',"lost":{"seen":%d,"held":%d}', floor, held)
end
-- Above the counter, the caller's highest token and the clock: a lost
-- increment (an unreplicated write before a failover) cannot repeat a token.
local token = math.max(counted, floor + 1, now_us)
redis.call('SET', KEYS[2], string.format('%d', token))
local value = string.format('{"v":1,"token":%d,"since":%d,"holder":%s,"host":%s,"app":%s%s}',
  token, now_ms, cjson.encode(ARGV[1]), cjson.encode(ARGV[2]), cjson.encode(ARGV[8] or ''), lost)
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
local rank = redis.pcall('ZRANK', KEYS[4], ARGV[2])
if type(rank) ~= 'number' then rank = -1 end
redis.pcall('ZREM', KEYS[4], ARGV[2])
redis.pcall(ARGV[7], ARGV[5], 'acquired ' .. ARGV[3] .. ' ' .. ARGV[6] .. ' ' .. ARGV[2] ..
  ' ' .. rank)
return {1, value, tonumber(ARGV[3]), fresh}
"""
).replace("WINDOW", str(PRUNE_WINDOW))

#: Extend the holder's lease, unless it is asked to drain or hand over.
#:
#: KEYS[1] lease, KEYS[2] the Stoker's draining mark, KEYS[3] handoff request.
#: ARGV[1] the exact lease value the holder wrote, ARGV[2] TTL in ms,
#: ARGV[3] channel, ARGV[4] Stoker name, ARGV[5] node name, ARGV[6] token,
#: ARGV[7] the publish command.
#: Reply: ``{1, ''}`` renewed (announced as ``renewed <ttl> <name>``);
#: ``{0, ''}`` not ours any more (``{0, 'gone'}``: no lease at all, e.g. evicted);
#: ``{2, ''}`` asked to drain; ``{3, node or ''}`` asked to hand over (to that
#: node, or to anyone).  On 2 and 3 nothing is
#: written but the consumed handoff request: the holder steps down and releases.
RENEW = """
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  if not current then return {0, 'gone'} end
  return {0, ''}
end
if redis.call('SISMEMBER', KEYS[2], ARGV[5]) == 1 then
  return {2, ''}
end
local request = redis.call('GET', KEYS[3])
if request then
  local token, to = string.match(request, '^(%d+) ?(.*)$')
  if token == ARGV[6] then
    redis.call('DEL', KEYS[3])
    return {3, to}
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.pcall(ARGV[7], ARGV[3], 'renewed ' .. ARGV[2] .. ' ' .. ARGV[4])
return {1, ''}
"""

#: A stepping-down holder's last extension: a whole TTL for ``shutdown`` and the
#: release, and the term marked closing (no event of it may start any more), in
#: one round trip.
#:
#: KEYS[1] lease, KEYS[2] the term's closing mark.
#: ARGV[1] the exact lease value the holder wrote, ARGV[2] TTL in ms, ARGV[3] token,
#: ARGV[4] channel, ARGV[5] Stoker name, ARGV[6] the publish command.
#: Reply: ``{1, ''}`` extended and marked (announced as ``renewed <ttl> <name>``);
#: ``{0, ''}`` not ours any more, nothing written (``{0, 'gone'}``: no lease at all).
CLOSE = """
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  if not current then return {0, 'gone'} end
  return {0, ''}
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.pcall(ARGV[6], ARGV[4], 'renewed ' .. ARGV[2] .. ' ' .. ARGV[5])
return {1, ''}
"""

#: Give the lease up (or keep it for one worker: a handoff) and name who tries first.
#:
#: KEYS[1] lease, KEYS[2] waiters, KEYS[3] the Stoker's draining mark.
#: ARGV[1] the exact lease value the holder wrote, ARGV[2] channel, ARGV[3] Stoker
#: name, ARGV[4] node to reserve the lease for ('' for none), ARGV[5] TTL in ms,
#: ARGV[6] the publish command, ARGV[7] the presence channels' prefix ('': trust
#: every waiter), ARGV[8] ``ordered`` when ARGV[9..] are in the holder's order of
#: preference (the least loaded first: ``balance.py``), '' when they are not,
#: ARGV[9..] the node names the holder sees alive (none: do not filter).
#: Reply: ``{1, node}`` released, naming that node ('' for none); ``{0, ''}`` not
#: ours (nothing written).
#: Announced as ``released 0 <name> <node>``: that node tries at once; the others
#: try only if no new term is announced shortly after.  The node is the reserved
#: one if its listener is alive and it is not draining (a handoff to a worker that
#: died or began to drain meanwhile is a plain release); else, when ``ordered``,
#: the first of ARGV[9..] that is a live waiter; else the longest-waiting live
#: waiter.  A draining waiter is never named.  Waiters looked at and found dead
#: (no listener, or not among ARGV[9..]) are dropped; at most 4 * :data:`PRUNE_WINDOW`
#: of each list are looked at.
RELEASE = (
    _ALIVE
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0, ''}
end
local function draining(node)
  return redis.call('SISMEMBER', KEYS[3], node) == 1
end
local reserved = ARGV[4]
if reserved ~= '' and (draining(reserved) or not alive(ARGV[7], reserved)) then
  reserved = ''
end
local first = reserved
if first == '' and ARGV[8] == 'ordered' then
  for i = 9, math.min(#ARGV, 8 + 4 * WINDOW) do
    if redis.call('ZRANK', KEYS[2], ARGV[i]) and not draining(ARGV[i]) then
      if alive(ARGV[7], ARGV[i]) then
        first = ARGV[i]
        break
      end
      redis.pcall('ZREM', KEYS[2], ARGV[i])
    end
  end
end
if first == '' then
  local live = {}
  for i = 9, #ARGV do live[ARGV[i]] = true end
  for _, node in ipairs(redis.call('ZRANGE', KEYS[2], 0, 4 * WINDOW - 1)) do
    if draining(node) then
      redis.pcall('ZREM', KEYS[2], node)  -- it would not try: its next ACQUIRE says so
    elseif (#ARGV < 9 or live[node]) and alive(ARGV[7], node) then
      first = node
      break
    else
      redis.pcall('ZREM', KEYS[2], node)
    end
  end
end
if reserved ~= '' then
  local clock = redis.call('TIME')
  redis.call('SET', KEYS[1], string.format('{"v":1,"reserved_for":%s,"since":%d}',
    cjson.encode(reserved), tonumber(clock[1]) * 1000), 'PX', ARGV[5])
else
  redis.call('DEL', KEYS[1])
end
if first ~= '' then
  redis.pcall(ARGV[6], ARGV[2], 'released 0 ' .. ARGV[3] .. ' ' .. first)
else
  redis.pcall(ARGV[6], ARGV[2], 'released 0 ' .. ARGV[3])
end
return {1, first}
"""
).replace("WINDOW", str(PRUNE_WINDOW))

#: Who holds the lease, and for how long still.
#:
#: KEYS[1] lease.  Reply: ``{value or nil, pttl}``.
OBSERVE = """
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""

#: Store a Stoker's state and record, only under the current term and state version.
#:
#: KEYS[1] lease, KEYS[2] state hash, KEYS[3] record hash.
#: ARGV[1] token, ARGV[2] '1' to write the state, ARGV[3..5] body, content type,
#: encoding, ARGV[6] time, ARGV[7] the state version the event started from ('' for
#: any), ARGV[8..] record field/value pairs.
#: Reply: 1 stored, 0 the term is over, -1 the state changed since the event read
#: it (nothing written on 0 and -1).  The token is compared as digits in the
#: lease's JSON, so no float rounding applies.
COMMIT = """
local lease = redis.call('GET', KEYS[1])
if not lease then return 0 end
local token = string.match(lease, '"token":(%d+)')
if token ~= ARGV[1] then return 0 end
local version = tonumber(redis.call('HGET', KEYS[2], 'version') or '0') or 0
if ARGV[2] == '1' and ARGV[7] ~= '' and version ~= tonumber(ARGV[7]) then return -1 end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'body', ARGV[3], 'content_type', ARGV[4],
             'content_encoding', ARGV[5], 'token', ARGV[1], 'updated_at', ARGV[6],
             'version', string.format('%d', version + 1))
end
for i = 8, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
return 1
"""

#: Which of the commands the scripts above run this Redis user may not run.
#:
#: KEYS[1] a scratch key under the prefix (it lives 1 s at most), ARGV[1] the channel,
#: ARGV[2] the publish command the lease scripts use (PUBLISH, or SPUBLISH on a cluster).
#: Reply: the refused commands' names, lower case (empty: all allowed).  Every
#: call is ``redis.pcall``: a refusal (or an OOM) is an answer, not an abort.  The
#: announcement it publishes (``probe 0 -``) names no Stoker, so listeners drop it.
PROBE = """
local refused = {}
local function try(name, ...)
  local reply = redis.pcall(name, ...)
  if type(reply) == 'table' and reply.err then
    local text = reply.err
    if string.find(text, 'NOPERM', 1, true) or string.find(text, "can't run this command", 1, true)
        or string.find(text, 'no permissions', 1, true) then
      table.insert(refused, string.lower(name))
    end
  end
end
local k = KEYS[1]
try('SET', k, '1', 'PX', 1000)
try('GET', k)
try('INCR', k)
try('PTTL', k)
try('PEXPIRE', k, 1000)
try('EXISTS', k)
try('DEL', k)
try('HSET', k, 'f', 'v')
try('HGET', k, 'f')
try('HGETALL', k)
try('DEL', k)
try('ZADD', k, 0, 'm')
try('ZRANK', k, 'm')
try('ZRANGE', k, 0, -1)
try('ZREM', k, 'm')
try('SADD', k, 'm')
try('SISMEMBER', k, 'm')
try('SMEMBERS', k)
try('SREM', k, 'm')
try('LPUSH', k, 'm')
try('LTRIM', k, 0, 0)
try('LRANGE', k, 0, -1)
try('DEL', k)
try('TIME')
try(ARGV[2], ARGV[1], 'probe 0 -')
return refused
"""
