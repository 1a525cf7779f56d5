"""What a gateway does as it starts: open the registry (waiting for a database that is
not there yet), check the served base against its contract, and pin and prefetch the
configured adapters (again in the background when a store or database was away)."""

from __future__ import annotations

import asyncio
import logging
import time

from adapters_registry import (
    ArtifactError,
    BaseContract,
    DatabaseError,
    DatabaseUnreachableError,
    NotFoundError,
    Registry,
    derive_contract,
)
from gateway.config import GatewaySettings
from gateway.errors import BaseMismatchError, GatewayError
from gateway.residency.manager import AdapterManager
from gateway.tenancy.directory import TenantDirectory

logger = logging.getLogger(__name__)


def verify_base(registry: Registry, settings: GatewaySettings) -> BaseContract:
    """The served checkpoint must match a registered contract exactly, field by field."""
    on_disk = derive_contract(settings.base_model_dir, settings.base_model_id)
    try:
        registered = registry.get_base(settings.base_model_id, on_disk.revision)
    except NotFoundError:
        raise BaseMismatchError(
            f"{settings.base_model_dir} (revision {on_disk.revision[:12]}) is not a registered "
            f"revision of base {settings.base_model_id}; register it first"
        ) from None
    problems = registered.mismatches(on_disk)
    if problems:
        raise BaseMismatchError(f"{settings.base_model_dir} does not match the registered "
                                f"contract of {settings.base_model_id}: {'; '.join(problems)}")
    return registered


async def open_registry(settings: GatewaySettings) -> tuple[Registry, BaseContract]:
    """The registry, and the served base checked against it.

    A database that cannot be reached yet (a replica starting while PostgreSQL restarts)
    is waited for, up to ``startup_wait_seconds``, saying so at each try; anything else
    it answers (no such base, schema behind, authentication) is final at once."""
    deadline = time.monotonic() + settings.startup_wait_seconds
    pause = 0.25
    while True:
        registry: Registry | None = None
        try:
            registry = await asyncio.to_thread(
                lambda: Registry.open(settings.database_url, settings.artifacts_dir, actor="gateway",
                                      s3_endpoint_url=settings.s3_endpoint_url,
                                      s3_region=settings.s3_region,
                                      migrate=settings.migrate_on_start))
            return registry, await asyncio.to_thread(verify_base, registry, settings)
        except DatabaseUnreachableError as exc:
            if registry is not None:
                registry.close()
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            pause = min(pause * 2, 2.0, left)
            logger.warning("waiting for the registry database (%.0fs more at most, "
                           "startup_wait_seconds): %s", left, exc)
            await asyncio.sleep(pause)
        except BaseException:
            if registry is not None:
                registry.close()
            raise


async def warm_up(tenants: TenantDirectory, adapters: AdapterManager,
                  settings: GatewaySettings) -> tuple[dict[str, str], list[tuple[str, bool]]]:
    """Pin, then prefetch, the configured adapters; a failure is logged and reported, not fatal.

    A typo in one ref must not keep every tenant's traffic from being served; the admin
    API's /cache shows what failed (and the log says why). Returns the failures, and the
    jobs worth trying again (their store or database was away: ``keep_warming``).
    """
    errors: dict[str, str] = {}
    again: list[tuple[str, bool]] = []
    jobs = [(ref, True) for ref in dict.fromkeys(settings.pinned_adapters)]
    jobs += [(ref, False) for ref in dict.fromkeys(settings.prefetch_adapters)]
    for ref, pin in jobs:
        problem, retry = await _warm(tenants, adapters, ref, pin)
        if problem is not None:
            errors[ref] = problem
            logger.error("could not %s %s at start-up%s: %s", "pin" if pin else "prefetch", ref,
                         " (trying again in the background)" if retry else "", problem)
            if retry:
                again.append((ref, pin))
    return errors, again


async def _warm(tenants: TenantDirectory, adapters: AdapterManager, ref: str,
                pin: bool) -> tuple[str | None, bool]:
    """(why it failed, or None; whether trying again may succeed)."""
    try:
        version = await tenants.resolve_ref(ref)
        await (adapters.pin(version) if pin else adapters.prefetch(version, "engine"))
    except GatewayError as exc:
        return exc.message, exc.status >= 500
    except (DatabaseError, ArtifactError) as exc:
        return str(exc), True
    return None, False


async def keep_warming(tenants: TenantDirectory, adapters: AdapterManager,
                       jobs: list[tuple[str, bool]], errors: dict[str, str]) -> None:
    """Tries the start-up pins and prefetches that failed while a service was away again,
    backing off to every 30s, until each is done or fails for good; ``errors`` follows."""
    delay = 1.0
    while jobs:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)
        left = []
        for ref, pin in jobs:
            problem, retry = await _warm(tenants, adapters, ref, pin)
            if problem is None:
                errors.pop(ref, None)
                logger.info("%s %s (it failed at start-up)", "pinned" if pin else "prefetched", ref)
            else:
                errors[ref] = problem
                if retry:
                    left.append((ref, pin))
        jobs = left


__all__ = ["keep_warming", "open_registry", "verify_base", "warm_up"]
