"""adapters_registry: stores LoRA adapters and refuses what the served base cannot run.

What other parts (the gateway, the trainer, the command) may use is named here, and
only here (tests/test_architecture.py checks it): the ``Registry`` service and the
records it hands out, the checks it runs, the errors it raises, and the shared helpers
the gateway and the trainer must agree with it on (content hashing, prompt rendering,
API key hashing, change notices).
"""

from adapters_registry._audit import AuditEntry
from adapters_registry.answer_stats import AnswerStats
from adapters_registry.artifacts import REPAIR_COMMAND, Artifacts, BlobProblem, GcReport, VerifyReport
from adapters_registry.catalog import Catalog
from adapters_registry.changes import ADAPTER_KINDS, CHANNEL_SQL, Change, listen_params
from adapters_registry.compat import CONFIG_FILE, WEIGHTS_FILE, Limits, Violation, check_adapter
from adapters_registry.contract import BaseContract, derive_contract
from adapters_registry.datasets import (
    FileCheck,
    FileFormat,
    check_fine_tune_file,
    parse_json_object,
    prompt_problems,
    read_answer,
    to_trainer_jsonl,
    validate_messages,
)
from adapters_registry.errors import (
    ArtifactError,
    AuthenticationError,
    ChatTemplateRenderError,
    ChecksumMismatchError,
    ConflictError,
    ContractError,
    DatabaseError,
    DatabaseUnreachableError,
    IncompatibleAdapterError,
    LimitReachedError,
    ManifestError,
    NotFoundError,
    RegistryError,
    SourceError,
    TamperedRecordError,
    TemplateError,
    TooLargeError,
    ValidationError,
)
from adapters_registry.files import FileObject, Files
from adapters_registry.hashing import (
    canonical_json,
    check_digest,
    check_record,
    is_digest,
    sha256_bytes,
    sha256_file,
    sha256_json,
    sha256_tree,
)
from adapters_registry.job_queue import JOB_KEY, JobQueue
from adapters_registry.jobs import Checkpoint, Job, JobEvent, JobLimits, JobRequest, Jobs
from adapters_registry.keys import key_hash
from adapters_registry.limits import LIMITS, LimitSpec, TenantLimits
from adapters_registry.manifest import AdapterManifest
from adapters_registry.names import (
    AdapterRef,
    ModelRef,
    parse_adapter_ref,
    parse_qualified_model,
    validate_name,
)
from adapters_registry.options import add_registry_options
from adapters_registry.peft_config import template_from_adapter_config
from adapters_registry.prompts import prompt_ids, render_chat, stop_token_ids
from adapters_registry.records import (
    AdapterInfo,
    AdapterVersion,
    ApiKeyInfo,
    Resolution,
    Shadow,
    SplitEntry,
    Tenant,
)
from adapters_registry.rollouts import DEFAULT_STEPS as DEFAULT_ROLLOUT_STEPS
from adapters_registry.rollouts import Rollout, RolloutRules
from adapters_registry.s3 import S3Config, S3Store
from adapters_registry.service import Registry
from adapters_registry.splits import split_from_labels
from adapters_registry.store import ArtifactStore, FilesystemStore
from adapters_registry.template import AdapterTemplate, expected_tensors
from adapters_registry.tenancy import Tenancy
from adapters_registry.usage import UsageCounts, UsageRecord

__all__ = [
    "ADAPTER_KINDS",
    "CHANNEL_SQL",
    "CONFIG_FILE",
    "DEFAULT_ROLLOUT_STEPS",
    "JOB_KEY",
    "LIMITS",
    "REPAIR_COMMAND",
    "WEIGHTS_FILE",
    "AdapterInfo",
    "AdapterManifest",
    "AdapterRef",
    "AdapterTemplate",
    "AdapterVersion",
    "AnswerStats",
    "ApiKeyInfo",
    "ArtifactError",
    "ArtifactStore",
    "Artifacts",
    "AuditEntry",
    "AuthenticationError",
    "BaseContract",
    "BlobProblem",
    "Catalog",
    "Change",
    "ChatTemplateRenderError",
    "Checkpoint",
    "ChecksumMismatchError",
    "ConflictError",
    "ContractError",
    "DatabaseError",
    "DatabaseUnreachableError",
    "FileCheck",
    "FileFormat",
    "FileObject",
    "Files",
    "FilesystemStore",
    "GcReport",
    "IncompatibleAdapterError",
    "Job",
    "JobEvent",
    "JobLimits",
    "JobQueue",
    "JobRequest",
    "Jobs",
    "LimitReachedError",
    "LimitSpec",
    "Limits",
    "ManifestError",
    "ModelRef",
    "NotFoundError",
    "Registry",
    "RegistryError",
    "Resolution",
    "Rollout",
    "RolloutRules",
    "S3Config",
    "S3Store",
    "Shadow",
    "SourceError",
    "SplitEntry",
    "TamperedRecordError",
    "TemplateError",
    "Tenancy",
    "Tenant",
    "TenantLimits",
    "TooLargeError",
    "UsageCounts",
    "UsageRecord",
    "ValidationError",
    "VerifyReport",
    "Violation",
    "add_registry_options",
    "canonical_json",
    "check_adapter",
    "check_digest",
    "check_fine_tune_file",
    "check_record",
    "derive_contract",
    "expected_tensors",
    "is_digest",
    "key_hash",
    "listen_params",
    "parse_adapter_ref",
    "parse_json_object",
    "parse_qualified_model",
    "prompt_ids",
    "prompt_problems",
    "read_answer",
    "render_chat",
    "sha256_bytes",
    "sha256_file",
    "sha256_json",
    "sha256_tree",
    "split_from_labels",
    "stop_token_ids",
    "template_from_adapter_config",
    "to_trainer_jsonl",
    "validate_messages",
    "validate_name",
]
