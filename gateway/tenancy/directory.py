"""Who is calling, and which adapter version their ``model`` names.

API keys, name resolution and model listings, in front of the registry's database
behind a short TTL cache (``gateway.tenancy.freshness``): steady traffic never waits on the
database, and an alias move or a key revocation is still seen within the TTL.
Concurrent misses for one key share one lookup. Adapter residency (which files and
engine slots hold a version) is ``gateway.residency.manager``'s business, not this module's.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from adapters_registry import (
    ADAPTER_KINDS,
    AdapterInfo,
    AdapterVersion,
    AuthenticationError,
    Change,
    ModelRef,
    NotFoundError,
    Resolution,
    Shadow,
    Tenant,
    ValidationError,
    key_hash,
    parse_qualified_model,
)
from gateway.errors import AuthenticationFailedError, InvalidRequestError, ModelNotFoundError
from gateway.tenancy.freshness import GenerationWatch, TtlCache
from gateway.tenancy.splits import choose


@dataclass(frozen=True)
class RequestedModel:
    """A request's ``model``, parsed once: the bare base (``ref`` None) or one of the caller's
    own adapters, by name, alias or version."""

    text: str  # as the caller wrote it: echoed back as the answer's ``model``
    ref: ModelRef | None


def _own_model(tenant: Tenant, model: str) -> ModelRef:
    """``model`` in ``tenant``'s own namespace; ModelNotFoundError for anyone else's, and for
    anything malformed (it reads like an unknown name: 404)."""
    try:
        if "/" not in model:
            return ModelRef.parse(model)
        owner, ref = parse_qualified_model(model)
    except (ValidationError, NotFoundError):
        raise ModelNotFoundError(model) from None
    if owner != tenant.name:
        raise ModelNotFoundError(model)
    return ref


class _AffinityKeys:
    """Qualified model names, each with the version it last resolved to on this replica.

    A key follows its alias when the alias moves (on its next resolve); the oldest keys
    are forgotten past ``max_keys``, so memory stays bounded whatever callers send.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self._max_keys = max_keys
        self._version_of: OrderedDict[str, str] = OrderedDict()
        self._keys_of: dict[str, set[str]] = {}

    def note(self, key: str, ref: str) -> None:
        if key == ref:
            return  # ``acme/bot@v3`` is listed as the version itself
        old = self._version_of.get(key)
        if old != ref:
            if old is not None:
                self._drop(key, old)
            self._keys_of.setdefault(ref, set()).add(key)
        self._version_of[key] = ref
        self._version_of.move_to_end(key)
        while len(self._version_of) > self._max_keys:
            oldest, oldest_ref = self._version_of.popitem(last=False)
            self._drop(oldest, oldest_ref)

    def keys(self, ref: str) -> list[str]:
        return sorted(self._keys_of.get(ref, ()))

    def _drop(self, key: str, ref: str) -> None:
        keys = self._keys_of.get(ref)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys_of[ref]


class RegistryReads(Protocol):
    """What the directory reads from the registry (its tenancy and catalog services)."""

    def authenticate_until(self, api_key: str) -> tuple[Tenant, datetime | None]: ...

    def get_tenant(self, name: str) -> Tenant: ...

    def resolve_split(self, tenant: Tenant, model: ModelRef) -> Resolution: ...

    def list_adapters(self, tenant: Tenant) -> list[AdapterInfo]: ...


class TenantDirectory:
    """Keys to tenants, and a tenant's ``model`` to the adapter version it names."""

    def __init__(self, registry: RegistryReads, *, served_base: tuple[str, str], ttl: float,
                 base_name: str | None = None, watch: GenerationWatch | None = None,
                 outage_grace: float = 0.0) -> None:
        self._registry = registry
        self._served_base = served_base  # (model_id, revision)
        self._base_name = base_name  # the bare base's public name, if it is served
        # Both serve their last answers while the database is away (gateway.tenancy.freshness).
        self._keys: TtlCache[str, tuple[Tenant, datetime | None]] = TtlCache(
            ttl, watch=watch, outage_grace=outage_grace)
        self._models: TtlCache[tuple[int, ModelRef], Resolution] = TtlCache(
            ttl, watch=watch, outage_grace=outage_grace)
        self._affinity = _AffinityKeys()

    async def authenticate(self, api_key: str) -> Tenant:
        async def load() -> tuple[Tenant, datetime | None]:
            try:
                return await asyncio.to_thread(self._registry.authenticate_until, api_key)
            except AuthenticationError as exc:
                raise AuthenticationFailedError(str(exc)) from None

        digest = key_hash(api_key)  # never a secret as a cache key
        tenant, expires_at = await self._keys.get_or_load(digest, load)
        if expires_at is not None and expires_at <= datetime.now(UTC):
            # Expiry sends no change notice: a cached key must not outlive it by a TTL.
            self._keys.invalidate(digest)
            tenant, _ = await self._keys.get_or_load(digest, load)  # the registry refuses it now
        return tenant

    def parse(self, tenant: Tenant, model: str) -> RequestedModel:
        """A request's ``model``, the one place it is read: the bare base's name (where the
        base is served), else a name in the caller's namespace (``name``, ``name:alias``,
        ``name@vN``) or qualified with the caller's own tenant (``acme/name…``, the affinity
        key routers see). Another tenant's qualified name is refused before any lookup, with
        the very 404 a nonexistent name gets: nothing about other tenants can be learned."""
        if model == self._base_name:
            return RequestedModel(model, None)
        return RequestedModel(model, _own_model(tenant, model))

    async def resolve(self, tenant: Tenant, model: RequestedModel) -> AdapterVersion:
        """The version an adapter's ``model`` (parsed by ``parse``) names (an alias's stable
        version), built for the served base; ModelNotFoundError otherwise."""
        return (await self._resolution(tenant, model)).version

    async def pick(self, tenant: Tenant, model: RequestedModel,
                   caller: str | None) -> tuple[AdapterVersion | None, str, Shadow | None]:
        """The version that serves this request, and its label (``v3``; ``base`` when an
        alias's split sends the caller to the bare base): the alias's split chooses by
        ``caller`` (``gateway.tenancy.splits``), else the one version ``model`` names.
        Third: the alias's rollout's shadow comparisons, when it sent the caller to the
        stable version (``gateway.engine.shadow`` decides whether this one is shadowed)."""
        resolution = await self._resolution(tenant, model)
        if not resolution.split:
            return resolution.version, f"v{resolution.version.version}", None
        # Keyed by the alias, however the caller spelled it (``bot``, ``acme/bot:prod``).
        key = f"{tenant.id}/{resolution.version.adapter}:{resolution.alias}"
        entry = choose(resolution.split, key, caller)
        shadow = resolution.shadow
        if shadow is not None and entry.version != shadow.stable:
            shadow = None
        return entry.version, entry.label, shadow

    async def _resolution(self, tenant: Tenant, model: RequestedModel) -> Resolution:
        ref = model.ref
        if ref is None:
            raise ModelNotFoundError(model.text)

        async def load() -> Resolution:
            try:
                resolution = await asyncio.to_thread(self._registry.resolve_split, tenant, ref)
            except NotFoundError:
                raise ModelNotFoundError(model.text) from None
            version = resolution.version
            if (version.base_model_id, version.base_revision) != self._served_base:
                # Built for another base (or revision): its shapes were never checked
                # against this one, and vLLM may serve garbage silently. Not ours to serve.
                # (A split's versions share their adapter's template, hence its base.)
                raise ModelNotFoundError(model.text)
            return resolution

        resolution = await self._models.get_or_load((tenant.id, ref), load)
        self._affinity.note(f"{tenant.name}/{ref}", resolution.version.ref)
        return resolution

    def affinity_keys(self, ref: str) -> list[str]:
        """Every routing key of version ``ref``: itself, and the qualified names that last
        resolved to it here (``acme/bot``, ``acme/bot:canary``)."""
        return [ref, *self._affinity.keys(ref)]

    async def resolve_ref(self, ref: str) -> AdapterVersion:
        """An operator's ``tenant/name``, ``tenant/name:alias`` or ``tenant/name@vN``."""
        try:
            tenant_name, model = parse_qualified_model(ref)
        except ValidationError as exc:
            raise InvalidRequestError(str(exc), param="adapter") from None
        except NotFoundError:
            raise ModelNotFoundError(ref) from None
        try:
            tenant = await asyncio.to_thread(self._registry.get_tenant, tenant_name)
            return await self.resolve(tenant, RequestedModel(ref, model))
        except (NotFoundError, ModelNotFoundError):
            raise ModelNotFoundError(ref) from None

    def invalidate(self, change: Change | None) -> int:
        """Forget the keys or resolutions ``change`` may have made stale (None: all of them)."""
        if change is None:
            dropped = len(self._keys) + len(self._models)
            self._keys.invalidate()
            self._models.invalidate()
            return dropped
        if change.kind == "keys":
            return self._keys.invalidate_where(lambda _, grant: grant[0].id == change.tenant_id)
        if change.kind in ADAPTER_KINDS:
            # By value: every name that reached this adapter (alias, @vN, or the bare name).
            return self._models.invalidate_where(
                lambda _, r: (r.version.tenant, r.version.adapter) == (change.tenant, change.adapter))
        return 0

    async def list_adapters(self, tenant: Tenant) -> list[AdapterInfo]:
        return await asyncio.to_thread(self._registry.list_adapters, tenant)
