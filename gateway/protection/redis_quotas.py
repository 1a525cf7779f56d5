"""Quotas in Redis: every replica sees one state per tenant, changed by atomic Lua scripts.

The scripts read the clock from Redis (``TIME``), so replicas with skewed clocks agree, and
mirror ``gateway.protection.quotas``'s bucket arithmetic exactly. Keys carry the tenant id in a hash
tag, so a tenant's keys live in one Redis Cluster slot. Any Redis failure is raised as a
ConnectionError: what to do then (fail open or closed) is the Quotas service's decision.
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.protection.quotas import LEASE_TTL_S, WINDOW_S, Limits, Verdict, admit_verdict, charge_verdict

_LEVEL = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) + tonumber(now_t[2]) / 1000000
local window = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local function level(key, cap)
  if cap <= 0 then return 0 end
  local v = redis.call('HMGET', key, 'level', 'at', 'cap')
  if not v[1] then return cap end
  local l = tonumber(v[1]) + (cap - tonumber(v[3])) + math.max(0, now - tonumber(v[2])) * cap / window
  if l > cap then l = cap end
  return l
end
local function store(key, l, cap)
  redis.call('HSET', key, 'level', tostring(l), 'at', tostring(now), 'cap', tostring(cap))
  redis.call('EXPIRE', key, math.ceil(window) * 2)
end
"""

# KEYS: requests bucket, tokens bucket, leases (zset: lease -> expiry)
# ARGV: window, lease ttl, rpm, tpm, concurrency (0: unlimited), lease id
_ADMIT = _LEVEL + """
local rpm, tpm, conc, lease = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local req, tok = level(KEYS[1], rpm), level(KEYS[2], tpm)
local inflight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[3])
end
local refused = ''
if conc > 0 and inflight >= conc then refused = 'concurrency'
elseif rpm > 0 and req < 1 then refused = 'requests'
elseif tpm > 0 and tok < 1 then refused = 'tokens' end
if refused == '' then
  if rpm > 0 then req = req - 1; store(KEYS[1], req, rpm) end
  if conc > 0 then
    redis.call('ZADD', KEYS[3], now + ttl, lease)
    redis.call('EXPIRE', KEYS[3], math.ceil(ttl) * 2)
  end
end
return {refused, tostring(req), tostring(tok)}
"""

# KEYS: tokens bucket, leases.  ARGV: window, lease ttl, tpm, tokens, check (1/0), lease id
_CHARGE = _LEVEL + """
local tpm, n, check, lease = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1', ARGV[6]
if redis.call('ZSCORE', KEYS[2], lease) then
  redis.call('ZADD', KEYS[2], 'XX', now + ttl, lease)
end
local tok = level(KEYS[1], tpm)
local refused = check and n > tok
if not refused then tok = tok - n; store(KEYS[1], tok, tpm) end
return {refused and 1 or 0, tostring(tok)}
"""


class RedisQuotaStore:
    """Quotas shared by every gateway replica that uses the same Redis."""

    def __init__(self, url: str, *, prefix: str = "lgw:quota", timeout_s: float = 0.5) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                              socket_connect_timeout=timeout_s)
        self._prefix = prefix
        self._admit = self._redis.register_script(_ADMIT)
        self._charge = self._redis.register_script(_CHARGE)

    def _keys(self, tenant_id: int) -> tuple[str, str, str]:
        base = f"{self._prefix}:{{{tenant_id}}}"
        return f"{base}:requests", f"{base}:tokens", f"{base}:leases"

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise ConnectionError(f"redis: {exc}") from None

    async def admit(self, tenant_id: int, limits: Limits, lease: str) -> Verdict:
        try:
            refused, req, tok = await self._admit(keys=self._keys(tenant_id), args=[
                WINDOW_S, LEASE_TTL_S, limits.rpm or 0, limits.tpm or 0, limits.concurrency or 0,
                lease])
        except RedisError as exc:
            raise ConnectionError(f"redis: {exc}") from None
        return admit_verdict(refused.decode() or None, limits, _num(req), _num(tok))

    async def charge(self, tenant_id: int, limits: Limits, lease: str, tokens: int, *,
                     check: bool) -> Verdict:
        if limits.tpm is None:
            return Verdict()
        _, tokens_key, leases_key = self._keys(tenant_id)
        try:
            refused, tok = await self._charge(keys=[tokens_key, leases_key], args=[
                WINDOW_S, LEASE_TTL_S, limits.tpm, tokens, 1 if check else 0, lease])
        except RedisError as exc:
            raise ConnectionError(f"redis: {exc}") from None
        return charge_verdict(bool(refused), limits.tpm, _num(tok), tokens)

    async def release(self, tenant_id: int, lease: str) -> None:
        try:
            await self._redis.zrem(self._keys(tenant_id)[2], lease)
        except RedisError as exc:
            raise ConnectionError(f"redis: {exc}") from None

    async def close(self) -> None:
        await self._redis.aclose()


def _num(raw: bytes) -> float:
    value = float(raw)
    return value if math.isfinite(value) else 0.0
