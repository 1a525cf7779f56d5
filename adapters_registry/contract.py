"""The base model contract: what an adapter must match to run on a served base.

Derived from a Hugging Face model directory (config.json, tokenizer files, weight
files) without importing torch, so the registry and the gateway can check it cheaply.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters_registry.errors import ContractError
from adapters_registry.hashing import sha256_bytes, sha256_file, sha256_json, sha256_tree

# Architectures whose attention/MLP projections carry the Llama module names and shapes.
# Others are refused rather than guessed: a wrong shape map would let bad adapters through.
LLAMA_LIKE = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)
WEIGHT_SUFFIXES = (".safetensors",)
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor")
# Fields that describe a base without changing what runs on it: never a mismatch.
_NOT_SHAPE = frozenset({"license", "aliases"})


@dataclass(frozen=True)
class BaseContract:
    """Everything about a base that decides whether an adapter fits it."""

    model_id: str
    revision: str
    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tokenizer_sha256: str
    chat_template_sha256: str
    dtype: str
    rope: dict[str, Any] = field(default_factory=dict)
    license: str | None = None
    # Other ids the same weights are known by (e.g. the hub id they were converted from):
    # an adapter_config.json naming one of them names this base.
    aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseContract:
        return cls(**data)

    @property
    def contract_sha256(self) -> str:
        return sha256_json(self.to_dict())

    def mismatches(self, other: BaseContract) -> list[str]:
        """Fields that differ from ``other``, each as 'field: ours != theirs'."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{key}: {mine[key]!r} != {theirs[key]!r}"
            for key in mine
            if key not in _NOT_SHAPE and mine[key] != theirs[key]
        ]


def read_chat_template(model_dir: Path) -> str:
    """The chat template text the base ships (chat_template.jinja or tokenizer_config)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    template = tok_cfg.get("chat_template")
    if isinstance(template, str) and template:
        return template
    raise ContractError(f"{model_dir}: no chat template (chat_template.jinja or tokenizer_config)")


def tokenizer_sha256(model_dir: Path) -> str:
    """Hash of the tokenizer's vocabulary, merges and special tokens (not its chat template)."""
    if not (model_dir / "tokenizer.json").is_file():
        raise ContractError(f"{model_dir}: tokenizer.json is missing (a fast tokenizer is required)")
    parts: dict[str, Any] = {"tokenizer.json": _read_json(model_dir / "tokenizer.json")}
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    tok_cfg.pop("chat_template", None)
    parts["tokenizer_config.json"] = tok_cfg
    if (model_dir / "special_tokens_map.json").is_file():
        parts["special_tokens_map.json"] = _read_json(model_dir / "special_tokens_map.json")
    return sha256_json(parts)


def chat_template_sha256(model_dir: Path) -> str:
    return sha256_bytes(read_chat_template(model_dir).encode("utf-8"))


def weights_revision(model_dir: Path) -> str:
    """A content hash of the weight files: the revision when no hub revision exists."""
    files = {
        p.name: sha256_file(p)
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    }
    if not files:
        raise ContractError(f"{model_dir}: no .safetensors weight files")
    return sha256_tree(files)


def derive_contract(model_dir: Path, model_id: str, *, license: str | None = None,
                    aliases: list[str] | None = None) -> BaseContract:
    """Read a model directory into its contract; refuses what it cannot describe exactly."""
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json")
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in LLAMA_LIKE:
        raise ContractError(
            f"{model_dir}: architecture {archs!r} is not supported; "
            f"supported: {sorted(LLAMA_LIKE)}"
        )
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        contract = BaseContract(
            model_id=model_id,
            revision=weights_revision(model_dir),
            architecture=archs[0],
            hidden_size=hidden,
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            tokenizer_sha256=tokenizer_sha256(model_dir),
            chat_template_sha256=chat_template_sha256(model_dir),
            dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            rope={k: cfg[k] for k in _ROPE_KEYS if cfg.get(k) is not None},
            license=license,
            aliases=sorted(set(aliases or ())),
        )
    except KeyError as exc:
        raise ContractError(f"{model_dir}/config.json: missing field {exc.args[0]!r}") from None
    return contract


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ContractError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ContractError(f"{path}: expected a JSON object")
    return data
