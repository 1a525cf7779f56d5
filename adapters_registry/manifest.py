"""The manifest the trainer writes beside every adapter and the registry checks."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters_registry.errors import ManifestError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "lora-gateway/adapter-manifest@1"


@dataclass(frozen=True)
class AdapterManifest:
    """Provenance of one adapter: what it was trained on, from what, and how."""

    base_model_id: str
    base_revision: str
    template_id: str
    tokenizer_sha256: str
    chat_template_sha256: str
    rope: dict[str, Any]
    dataset_sha256: str
    seed: int
    versions: dict[str, str]
    run_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    def write(self, adapter_dir: Path) -> Path:
        path = Path(adapter_dir) / MANIFEST_FILE
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, adapter_dir: Path) -> AdapterManifest:
        path = Path(adapter_dir) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"{MANIFEST_FILE} is missing") from None
        except OSError as exc:
            raise ManifestError(f"cannot read {MANIFEST_FILE}: {exc}") from None
        except RecursionError:
            raise ManifestError(f"{MANIFEST_FILE} is nested too deeply to be a manifest") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{MANIFEST_FILE} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{MANIFEST_FILE}: format must be {MANIFEST_FORMAT!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        missing = sorted(
            name
            for name, f in cls.__dataclass_fields__.items()
            if name not in data and f.default is MISSING and f.default_factory is MISSING
        )
        if unknown or missing:
            raise ManifestError(
                f"{MANIFEST_FILE}: unknown fields {unknown}, missing fields {missing}"
            )
        wrong = [
            f"{name} must be {kind.__name__}"
            for name, kind in _FIELD_TYPES.items()
            if not isinstance(data[name], kind) or isinstance(data[name], bool)
        ]
        if wrong:
            raise ManifestError(f"{MANIFEST_FILE}: {'; '.join(wrong)}")
        return cls(**data)


_FIELD_TYPES: dict[str, type] = {
    "base_model_id": str, "base_revision": str, "template_id": str, "tokenizer_sha256": str,
    "chat_template_sha256": str, "rope": dict, "dataset_sha256": str, "seed": int,
    "versions": dict, "run_config": dict, "metrics": dict,
}
