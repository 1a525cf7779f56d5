"""Artifacts: an adapter's files from intake to the store and back. A push checks and
uploads a version's files, then the catalog commits its row; a fetch verifies every file
against its digest; verify re-hashes the store's blobs and repairs them; gc deletes the
unreferenced ones.

Registration order is check → upload blobs → commit the row, so a failure at any step
leaves no visible version (blobs without a row are unreferenced and harmless: gc
collects them after a grace period).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Set
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adapters_registry._audit import record
from adapters_registry._tokenizer_files import TOKENIZER_FILES, shipped_chat_template
from adapters_registry.catalog import Catalog
from adapters_registry.compat import CONFIG_FILE, Limits, Violation, check_adapter
from adapters_registry.db import AdapterRow, AdapterVersionRow, TenantRow
from adapters_registry.errors import (
    ConflictError,
    DatabaseError,
    IncompatibleAdapterError,
    ManifestError,
    ValidationError,
)
from adapters_registry.hashing import check_record, sha256_file
from adapters_registry.intake import stage, staging_folder
from adapters_registry.manifest import MANIFEST_FILE, AdapterManifest
from adapters_registry.names import shown, validate_name
from adapters_registry.records import AdapterVersion
from adapters_registry.store import ArtifactStore, BlobState
from adapters_registry.template import AdapterTemplate, max_weights_bytes
from adapters_registry.tenancy import Tenancy

logger = logging.getLogger(__name__)

INTAKE_FORMAT = "lora-gateway/intake@1"
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


class Artifacts:
    """Adapter files in ``store``; ``limits`` bound what an intake accepts."""

    def __init__(self, db: Engine, store: ArtifactStore, limits: Limits, catalog: Catalog,
                 tenancy: Tenancy, *, actor: str) -> None:
        self.db = db
        self.store = store
        self.limits = limits
        self.actor = actor
        self._catalog = catalog
        self._tenancy = tenancy

    def push(self, tenant_name: str, name: str, source: Path, *, template_id: str | None = None,
             base: str | None = None, aliases: Iterable[str] = ()) -> AdapterVersion:
        """Check and register a new immutable version of ``tenant/name``.

        ``source`` is a PEFT adapter folder (with or without our trainer's manifest.json)
        or a .tar, .tar.gz or .zip of one. The template comes from ``template_id``, else
        the manifest, else the one template registered for ``base``.
        """
        validate_name("adapter", name)
        aliases = [validate_name("alias", a) for a in aliases]
        if template_id is not None:
            validate_name("template", template_id)
        if base is not None:
            validate_name("base", base)
        tenant = self._tenancy.get_tenant(tenant_name)
        ref = f"{tenant.name}/{name}"
        with staging_folder() as tmp:
            # Check and upload one private copy, so the files cannot change in between.
            limits = self.intake_limits(template_id, base)
            staged = stage(Path(source), tmp / "adapter", limits)
            if not staged.complete:
                raise IncompatibleAdapterError(ref, staged.refused)
            template = self._template_for(staged.path, template_id, base, ref)
            contract = self._catalog.get_base(template.base_model_id, template.base_revision)
            violations = check_adapter(staged.path, contract, template, limits,
                                       refused=staged.refused)
            if violations:
                raise IncompatibleAdapterError(ref, violations)
            files = {p.name: sha256_file(p) for p in sorted(staged.path.iterdir())}
            outcomes = {rel: self.store.put(staged.path / rel, digest) for rel, digest in files.items()}
            repaired = [rel for rel, outcome in outcomes.items() if outcome == "repaired"]
            uploaded = [rel for rel, outcome in outcomes.items() if outcome == "stored"]
            if repaired:
                logger.warning("%s: re-pushing repaired corrupted blob(s) of %s", ref, repaired)
            size = sum((staged.path / rel).stat().st_size for rel in files)
            record_ = _intake_record(staged.path, staged.kind, files)
        try:
            return self._catalog.insert_version(tenant, name, template, files, size, record_,
                                                aliases, repaired)
        except IntegrityError:
            raise ConflictError(f"{ref}: a concurrent registration won; push again") from None
        except DatabaseError as exc:
            left = (f" ({len(uploaded)} file(s) it uploaded stay unreferenced until `registry gc` "
                    "collects them)" if uploaded else
                    " (every file it needs was stored already: nothing was left behind)")
            raise DatabaseError(f"{exc}; {ref} was not registered{left}") from None

    def intake_limits(self, template_id: str | None, base: str | None) -> Limits:
        """``limits`` tightened, before a byte is staged, to the largest adapter the template
        can make: the named one's, else the largest of every template the manifest may name.
        NotFoundError for an unknown ``template_id``."""
        if template_id is not None:
            template = self._catalog.get_template(validate_name("template", template_id))
            bases = [(self._catalog.get_base(template.base_model_id, template.base_revision), template)]
            basis = f"the most template {template_id}'s adapters can need"
        else:
            bases = self._catalog.templates(None if base is None else validate_name("base", base))
            basis = ("the most an adapter of any registered template can need" if base is None
                     else f"the most an adapter of base {base}'s templates can need")
        if not bases:
            return self.limits  # the template lookup after staging says what is missing
        dtypes = self.limits.allowed_dtypes
        return self.limits.within(max(max_weights_bytes(c, t, dtypes) for c, t in bases), basis)

    def _template_for(self, staged: Path, template_id: str | None, base: str | None,
                      ref: str) -> AdapterTemplate:
        if template_id is None and (staged / MANIFEST_FILE).is_file():
            try:
                template_id = AdapterManifest.read(staged).template_id
            except ManifestError as exc:
                raise IncompatibleAdapterError(ref, [Violation("manifest_invalid", str(exc))]) from None
        if template_id is None:
            if base is None:
                raise ValidationError(
                    f"{ref}: the adapter has no manifest.json naming its template; name its "
                    "template (--template tpl-…) or its base (--base MODEL_ID)")
            template_id = self._catalog.only_template(base)
        template = self._catalog.get_template(template_id)
        if base is not None and base != template.base_model_id:
            raise ValidationError(f"template {template_id} is for base {template.base_model_id!r}, "
                                  f"not {shown(base)}")
        return template

    def fetch(self, version: AdapterVersion, dest: Path) -> None:
        """Write the version's files into ``dest``, each verified against its sha256.

        TamperedRecordError, writing nothing, if the record's names or digests were altered."""
        check_record(version.content_sha256, version.files)
        for rel, digest in version.files.items():
            self.store.get(digest, Path(dest) / rel)

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

    def collect_garbage(self, *, grace: timedelta = timedelta(hours=1), dry_run: bool = False,
                        keep: Set[str] = frozenset()) -> GcReport:
        """Delete blobs no live version references (nor ``keep``: fine-tuning files and
        checkpoints) and older than ``grace``.

        Blobs are uploaded before their version's row commits, so a young unreferenced
        blob may belong to a push in flight: the grace period keeps it. Corrupted blobs
        that are referenced are kept: ``verify`` finds them and repairs them.
        """
        with Session(self.db) as s:
            referenced = {digest for files in s.scalars(select(AdapterVersionRow.files).where(
                AdapterVersionRow.state != "deleted")) for digest in files.values()} | set(keep)
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


def _intake_record(staged: Path, kind: str, files: dict[str, str]) -> dict[str, Any]:
    """What the version's files prove beyond the check: stored as the version's record."""
    cfg = json.loads((staged / CONFIG_FILE).read_text(encoding="utf-8"))
    manifest = AdapterManifest.read(staged) if MANIFEST_FILE in files else None
    names = set(files)
    return {
        "format": INTAKE_FORMAT,
        "source": kind,
        "manifest": asdict(manifest) if manifest else None,
        "adapter_config_base": cfg.get("base_model_name_or_path"),
        "adapter_config_revision": cfg.get("revision"),
        # "matches base" only ever reaches a record: a mismatch refused the push.
        "tokenizer": "matches base" if "tokenizer.json" in names else "not shipped",
        "chat_template": "matches base" if shipped_chat_template(staged, names) else "not shipped",
        "tokenizer_files": sorted(names & TOKENIZER_FILES),
    }


__all__ = ["REPAIR_COMMAND", "Artifacts", "BlobProblem", "GcReport", "VerifyReport"]
