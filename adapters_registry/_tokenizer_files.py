"""A tokenizer or chat template shipped beside an adapter must be the base's own.

TRL, Axolotl and friends often save the tokenizer with the adapter. When they do, its
hashes are compared with the base contract's; when they do not, the version's record
says so ("not shipped").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from adapters_registry.contract import BaseContract, chat_template_sha256, tokenizer_sha256
from adapters_registry.errors import ContractError
from adapters_registry.violations import Violation

TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
)


def check_tokenizer_files(adapter_dir: Path, readable: set[str], contract: BaseContract) -> list[Violation]:
    """Violations for a shipped tokenizer or chat template that is not the base's."""
    out: list[Violation] = []
    shipped = readable & TOKENIZER_FILES
    if shipped - {"chat_template.jinja"}:
        if "tokenizer.json" not in readable:
            out.append(Violation(
                "tokenizer_incomplete", f"the adapter ships {sorted(shipped)} but no tokenizer.json, "
                f"so its tokenizer cannot be compared with base {contract.model_id}'s: add "
                "tokenizer.json or remove them", "tokenizer.json"))
        else:
            out += _compare("tokenizer", tokenizer_sha256, adapter_dir, contract.tokenizer_sha256,
                            contract, "it was trained with another tokenizer")
    if shipped_chat_template(adapter_dir, readable):
        out += _compare("chat_template", chat_template_sha256, adapter_dir,
                        contract.chat_template_sha256, contract, "it was trained on other prompts")
    return out


def _compare(what: str, digest_of: Callable[[Path], str], adapter_dir: Path, expected: str,
             contract: BaseContract, why: str) -> list[Violation]:
    words = what.replace("_", " ")
    try:
        digest = digest_of(adapter_dir)
    except (ContractError, RecursionError) as exc:
        return [Violation(f"{what}_mismatch", f"the shipped {words} is unreadable: {exc}", what)]
    if digest == expected:
        return []
    return [Violation(f"{what}_mismatch", f"the shipped {words} hashes to {digest[:12]}…, but base "
                      f"{contract.model_id}'s is {expected[:12]}…: {why}", what)]


def shipped_chat_template(adapter_dir: Path, readable: set[str]) -> bool:
    """Whether the adapter carries a chat template (a .jinja file or in tokenizer_config)."""
    if "chat_template.jinja" in readable:
        return True
    if "tokenizer_config.json" not in readable:
        return False
    try:
        cfg = json.loads((adapter_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return True  # unreadable: the comparison reports it
    return isinstance(cfg, dict) and bool(cfg.get("chat_template"))
