"""Blob integrity (verify, repair) and garbage collection: a part of the Registry service."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from adapters_registry._audit import record
from adapters_registry.db import AdapterRow, AdapterVersionRow, TenantRow
from adapters_registry.hashing import sha256_file
from adapters_registry.intake import stage, staging_folder
from adapters_registry.store import ArtifactStore, BlobState

if TYPE_CHECKING:
    from adapters_registry.compat import Limits

logger = logging.getLogger(__name__)

# The command that repairs what verify finds; the gateway's 503 message names it too
# (PATH: the adapter's original folder or archive).
REPAIR_COMMAND = "lora-gateway registry verify --repair PATH"


@dataclass(frozen=True)
class GcReport:
    orphans: list[str]  # deleted, or that would be with dry_run
    kept_young: int
    referenced: int
    dry_run: bool


@dataclass(frozen=True)
class BlobProblem:
    """One stored blob that is missing or no longer hashes to its name."""

    digest: str
    state: BlobState  # "missing" or "corrupt"
    used_by: list[str]  # "tenant/name@vN:file" for every live version that needs it
    repaired: bool = False


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    problems: list[BlobProblem] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[BlobProblem]:
        return [p for p in self.problems if not p.repaired]


class IntegrityMixin:
    db: Engine
    actor: str
    store: ArtifactStore
    limits: Limits

    def verify_blobs(self, *, repair_from: Path | None = None) -> VerifyReport:
        """Re-hash every blob a live version uses; with ``repair_from`` (a folder or archive
        holding the same files), rewrite each bad blob whose content it has."""
        used = self._blob_users()
        problems = []
        for digest in sorted(used):
            state = self.store.verify(digest)
            if state != "ok":
                problems.append(BlobProblem(digest, state, used[digest]))
        if problems and repair_from is not None:
            problems = self._repair(problems, repair_from)
        with Session(self.db) as s, s.begin():
            record(s, self.actor, "blobs.verify", self.store.describe(), checked=len(used),
                   problems=len(problems), repaired=sum(p.repaired for p in problems))
        return VerifyReport(len(used), problems)

    def _blob_users(self) -> dict[str, list[str]]:
        used: dict[str, list[str]] = defaultdict(list)
        with Session(self.db) as s:
            q = (select(TenantRow.name, AdapterRow.name, AdapterVersionRow.version, AdapterVersionRow.files)
                 .join(AdapterRow, AdapterVersionRow.adapter_id == AdapterRow.id)
                 .join(TenantRow, AdapterRow.tenant_id == TenantRow.id)
                 .where(AdapterVersionRow.state != "deleted"))
            for tenant, name, version, files in s.execute(q):
                for rel, digest in sorted(files.items()):
                    used[digest].append(f"{tenant}/{name}@v{version}:{rel}")
        return used

    def _repair(self, problems: list[BlobProblem], source: Path) -> list[BlobProblem]:
        with staging_folder() as tmp:
            # The same safe intake as a push; only files that hash to a wanted digest are used.
            staged = stage(Path(source), tmp / "repair", self.limits)
            have = {sha256_file(p): p for p in staged.path.iterdir()}
            out = []
            for problem in problems:
                src = have.get(problem.digest)
                if src is not None:
                    self.store.put(src, problem.digest)
                    fixed = self.store.verify(problem.digest) == "ok"
                    if fixed:
                        logger.info("repaired blob %s from %s", problem.digest[:12], source)
                    problem = BlobProblem(problem.digest, problem.state, problem.used_by, fixed)
                out.append(problem)
        return out

    def collect_garbage(self, *, grace: timedelta = timedelta(hours=1),
                        dry_run: bool = False) -> GcReport:
        """Delete blobs no live version references and older than ``grace``.

        Blobs are uploaded before their version's row commits, so a young unreferenced
        blob may belong to a push in flight: the grace period keeps it. Corrupted blobs
        that are referenced are kept: ``verify`` finds them and repairs them.
        """
        with Session(self.db) as s:
            referenced = {digest for files in s.scalars(select(AdapterVersionRow.files).where(
                AdapterVersionRow.state != "deleted")) for digest in files.values()}
        cutoff = datetime.now(UTC) - grace
        orphans, young = [], 0
        for digest, modified in self.store.list_blobs():
            if digest in referenced:
                continue
            if modified > cutoff:
                young += 1
            else:
                orphans.append(digest)
        if not dry_run:
            for digest in orphans:
                self.store.delete(digest)
            with Session(self.db) as s, s.begin():
                record(s, self.actor, "gc.run", self.store.describe(), deleted=len(orphans),
                       kept_young=young)
        return GcReport(sorted(orphans), young, len(referenced), dry_run)
