"""adapters_registry: stores LoRA adapters and refuses what the served base cannot run."""

from adapters_registry._audit import AuditEntry
from adapters_registry._integrity import REPAIR_COMMAND, BlobProblem, GcReport, VerifyReport
from adapters_registry.compat import Limits, Violation, check_adapter
from adapters_registry.contract import BaseContract, derive_contract
from adapters_registry.limits import LIMITS, LimitSpec, TenantLimits
from adapters_registry.manifest import AdapterManifest
from adapters_registry.names import (
    AdapterRef,
    ModelRef,
    parse_adapter_ref,
    parse_qualified_model,
    validate_name,
)
from adapters_registry.records import AdapterInfo, AdapterVersion, ApiKeyInfo, Tenant
from adapters_registry.s3 import S3Config, S3Store
from adapters_registry.service import Registry
from adapters_registry.store import ArtifactStore, FilesystemStore
from adapters_registry.template import AdapterTemplate, expected_tensors

__all__ = [
    "LIMITS",
    "REPAIR_COMMAND",
    "AdapterInfo",
    "AdapterManifest",
    "AdapterRef",
    "AdapterTemplate",
    "AdapterVersion",
    "ApiKeyInfo",
    "ArtifactStore",
    "AuditEntry",
    "BaseContract",
    "BlobProblem",
    "FilesystemStore",
    "GcReport",
    "LimitSpec",
    "Limits",
    "ModelRef",
    "Registry",
    "S3Config",
    "S3Store",
    "Tenant",
    "TenantLimits",
    "VerifyReport",
    "Violation",
    "check_adapter",
    "derive_contract",
    "expected_tensors",
    "parse_adapter_ref",
    "parse_qualified_model",
    "validate_name",
]
