"""Typed dependencies: handlers read like their signatures."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from adapters_registry import Registry, Tenant
from gateway.api.request import ScopeDep
from gateway.config import GatewaySettings
from gateway.engine.serving import OpenAIService
from gateway.errors import AuthenticationFailedError, RouteNotFoundError
from gateway.observability.metrics import GatewayMetrics
from gateway.protection.admission import FairAdmission
from gateway.protection.quotas import Quotas
from gateway.residency.manager import AdapterManager
from gateway.tenancy.directory import TenantDirectory


@dataclass
class Services:
    """What the lifespan built, handed to handlers."""

    settings: GatewaySettings
    tenants: TenantDirectory
    adapters: AdapterManager
    openai: OpenAIService
    metrics: GatewayMetrics
    admin_registry: Registry  # the same database and store, audited as "admin"
    quotas: Quotas
    admission: FairAdmission
    tenant_registry: Registry  # the same again, for tenants' own files and jobs, audited as "tenant-api"
    ready: bool = True
    draining: bool = False  # SIGTERM received: finishing requests in flight, then exiting
    warmup_errors: dict[str, str] = field(default_factory=dict)  # ref -> why


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def check_admin(request: Request, services: Services, *, missing: str = "Not Found") -> None:
    """The admin identity: the one admin key from the settings, never a tenant's. Without a
    configured admin key, RouteNotFoundError(``missing``), as if the route were not there."""
    expected = services.settings.admin_api_key
    if expected is None:
        raise RouteNotFoundError(missing)
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                             expected.get_secret_value().encode()):
        raise AuthenticationFailedError("invalid admin key")


async def authenticate(request: Request, scope: ScopeDep, services: ServicesDep) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationFailedError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    with scope.trace.stage("auth"):
        tenant = await services.tenants.authenticate(key.strip())
    scope.identify(tenant)
    return tenant


TenantDep = Annotated[Tenant, Depends(authenticate)]
