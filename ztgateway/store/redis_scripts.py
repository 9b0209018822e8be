"""The Redis store's Lua scripts: each durable write and its announcement in one atomic step.

Redis runs a script without interleaving any other command, so "write, bump `ver`, PUBLISH the
change" cannot be split by a crash or by another replica's write (redis.py's docstring gives the
consistency argument). Touches are scripts too, so that a write-behind batch can check what it
must never undo (a revocation, a lock) on the server, not in a copy that may be stale. The
shared counters (token buckets, the TOTP replay guard, one-time claims) are here for the same
reason: a read-modify-write from Python would let replicas race.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

# --- Lua: every durable write and its announcement happen in one atomic step ---------------
# ARGV[1] is always the channel, ARGV[2] the message, then script-specific arguments.

_CREATE_IF_ABSENT = """
local created = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('HSET', KEYS[1], 'ver', 1)
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  created = 1
end
return {created, redis.call('HGETALL', KEYS[1])}
"""

_UPDATE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('PUBLISH', ARGV[1], ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

_UPSERT = """
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local ver = redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return ver
"""

# A session hash written before the ID token was kept apart has it in `data`: moved to its field
# (`id_token`) before `data` is replaced, by any replica, a touch included. A substring search
# first; only a match decodes the JSON.
_KEEP_LOGOUT_HINT = """
local function keep_id_token(key)
  local old = redis.call('HGET', key, 'data')
  if old and string.find(old, '"id_token"', 1, true) then
    local ok, d = pcall(cjson.decode, old)
    if ok and type(d) == 'table' and type(d.extra) == 'table'
        and type(d.extra.id_token) == 'string' and d.extra.id_token ~= '' then
      redis.call('HSETNX', key, 'id_token', d.extra.id_token)
    end
  end
end
"""

# Sessions: `data` (JSON, rewritten by touches), `revoked` ('0'/'1') and `revocation` (JSON
# [revoked_at, reason]) kept apart, so that neither a touch nor a later save can undo or
# overwrite a revocation, and revoking does not rewrite the activity others wrote. `id_token`
# (a browser session's OIDC ID token, for logout) is written by saves only, and never reloaded.
# ARGV[3] id, ARGV[4] data, ARGV[5] revocation or '', ARGV[6] expires_at, ARGV[7] key TTL ms,
# ARGV[8] ID token or '' (none given: the stored one stays)
_SAVE_SESSION = (
    _KEEP_LOGOUT_HINT
    + """
local revoked = redis.call('HGET', KEYS[1], 'revoked') == '1'
if revoked and ARGV[5] == '' then
  return 0
end
keep_id_token(KEYS[1])
redis.call('HSET', KEYS[1], 'data', ARGV[4])
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'id_token', ARGV[8])
end
if not revoked then
  if ARGV[5] == '' then
    redis.call('HSET', KEYS[1], 'revoked', '0')
  else
    redis.call('HSET', KEYS[1], 'revoked', '1', 'revocation', ARGV[5])
  end
end
local ver = redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return ver
"""
)

# ARGV[3] the revocation. 0: unknown or already revoked (someone else won).
_REVOKE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'revoked') == '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'revoked', '1', 'revocation', ARGV[3])
local ver = redis.call('HINCRBY', KEYS[1], 'ver', 1)
redis.call('PUBLISH', ARGV[1], ARGV[2])
return ver
"""

# --- Lua: write-behind touches (not announced; never undo a durable change) -------------------

_TOUCH_SESSION = (
    _KEEP_LOGOUT_HINT
    + """
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HGET', KEYS[1], 'revoked') ~= '1' then
  keep_id_token(KEYS[1])
  redis.call('HSET', KEYS[1], 'data', ARGV[1])
  return 1
end
return 0
"""
)

_TOUCH_DEVICE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[1], 'last_ip', ARGV[2])
  return 1
end
return 0
"""

# ARGV[1] user, ARGV[2] history, ARGV[3] full record (only if the user has none yet)
_TOUCH_USER = """
redis.call('HSET', KEYS[1], 'history', ARGV[2])
if redis.call('HSETNX', KEYS[1], 'record', ARGV[3]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[1])
end
return 1
"""

# --- Lua: shared counters ----------------------------------------------------------------

# Token bucket. ARGV: rate, burst, now. Returns the wait in seconds as a string (Lua numbers
# come back from Redis truncated to integers). A caller whose clock is behind the bucket's
# stamp neither refills nor moves the stamp back.
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(b[1])
local stamp = tonumber(b[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
end
local elapsed = now - stamp
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
if now > stamp then stamp = now end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
elseif rate > 0 then
  wait = (1 - tokens) / rate
else
  wait = 3600
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'stamp', string.format('%.17g', stamp))
local ttl = 3600
if rate > 0 then ttl = math.ceil(burst / rate) + 1 end
redis.call('EXPIRE', KEYS[1], ttl)
return string.format('%.17g', wait)
"""

# TOTP replay guard: store ARGV[1] only if greater than the stored value. 1 if stored.
_ADVANCE = """
local cur = tonumber(redis.call('GET', KEYS[1]))
local v = tonumber(ARGV[1])
if cur ~= nil and cur >= v then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


# Sign-ins in flight, per source: KEYS[1] a hash state -> "<expires>\n<data>", KEYS[2] a sorted
# set of the same states by arrival. ARGV: state, value, ttl ms, per_source, arrival.
_PUT_LOGIN = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if excess > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, excess - 1)
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, excess - 1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# Single use: read and delete in one step. ARGV[1] the state.
_TAKE_LOGIN = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return value
"""

# WebAuthn credentials: KEYS[1] the credential's hash (user, data, sign_count, last_used_at),
# KEYS[2] the user's sorted set of credential ids by registration time.
# ARGV: credential id, user, data, sign count, created at, the per-user maximum.
_ADD_CREDENTIAL = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[6]) then return 0 end
redis.call('HSET', KEYS[1], 'user', ARGV[2], 'data', ARGV[3], 'sign_count', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
return 1
"""

# WebAuthn Level 2 §7.2 step 21 (`use_webauthn_credential`): the counter must grow (0 -> 0 is an
# authenticator without one). ARGV: presented count, now.
_USE_CREDENTIAL = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'sign_count'))
if cur == nil then return 0 end
local v = tonumber(ARGV[1])
if v > cur or (cur == 0 and v == 0) then
  redis.call('HSET', KEYS[1], 'sign_count', ARGV[1], 'last_used_at', ARGV[2])
  return 1
end
return 0
"""

# ARGV: credential id, user (a credential is removed only for its own user).
_REMOVE_CREDENTIAL = """
if redis.call('HGET', KEYS[1], 'user') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

_SET_ONCE = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""


SCRIPTS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "create": _CREATE_IF_ABSENT,
        "update": _UPDATE_IF_EXISTS,
        "upsert": _UPSERT,
        "save_session": _SAVE_SESSION,
        "revoke_session": _REVOKE_SESSION,
        "touch_session": _TOUCH_SESSION,
        "touch_device": _TOUCH_DEVICE,
        "touch_user": _TOUCH_USER,
        "bucket": _BUCKET,
        "advance": _ADVANCE,
        "put_login": _PUT_LOGIN,
        "take_login": _TAKE_LOGIN,
        "set_once": _SET_ONCE,
        "add_credential": _ADD_CREDENTIAL,
        "use_credential": _USE_CREDENTIAL,
        "remove_credential": _REMOVE_CREDENTIAL,
    }
)
"""By the name `RedisStore` calls each by (`self._scripts[name]`)."""
