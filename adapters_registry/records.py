"""What the registry hands out: frozen values, never ORM rows."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    aliases: dict[str, int]  # alias -> version number (a split's stable version)
    versions: list[int]
    created_at: datetime
    # alias -> its weighted split, {"v1": 90, "v2": 10, "base": 5}; absent: no split
    splits: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitEntry:
    """One way an alias's split sends callers: a version (None: the bare base), by weight."""

    version: AdapterVersion | None
    weight: int

    @property
    def label(self) -> str:
        return "base" if self.version is None else f"v{self.version.version}"


@dataclass(frozen=True)
class Shadow:
    """A running rollout's shadow comparisons: ``percent`` of the stable version's requests
    are answered again by ``candidate`` and the stable version, off the caller's path."""

    stable: AdapterVersion
    candidate: AdapterVersion
    percent: float


@dataclass(frozen=True)
class Resolution:
    """What a ``model`` names: its version, and the alias's weighted split if it has one
    (``version`` is then the split's stable version, where a rollback returns everyone)."""

    version: AdapterVersion
    split: tuple[SplitEntry, ...] = ()
    alias: str | None = None  # the alias resolved (None: a pinned version)
    shadow: Shadow | None = None  # the alias's running rollout shadows its stable version
