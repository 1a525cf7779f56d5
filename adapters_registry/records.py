"""What the registry hands out: frozen values, never ORM rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str


@dataclass(frozen=True)
class ApiKeyInfo:
    """What can be shown about a key after creation: never the key itself."""

    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable adapter version, as the gateway serves it."""

    lora_int_id: int
    tenant: str
    adapter: str
    version: int
    content_sha256: str
    files: dict[str, str]  # relative path -> sha256
    base_model_id: str
    base_revision: str
    template_id: str
    size_bytes: int
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.tenant}/{self.adapter}@v{self.version}"


@dataclass(frozen=True)
class AdapterInfo:
    tenant: str
    name: str
    template_id: str
    default_alias: str
    aliases: dict[str, int]  # alias -> version number
    versions: list[int]
    created_at: datetime
