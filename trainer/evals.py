"""Evaluation of a trained adapter, and the gates that decide whether it may ship.

Two eval sets, both JSONL in the OpenAI ``messages`` format, each line a *prompt*
(conversation ending on a user turn):

- **golden** (the target): ``{"messages": [...], "expected": "...", "match": "exact"}``,
  ``match`` one of ``exact`` (default), ``prefix``, ``contains``. A line may instead end
  on an assistant turn, which is then the expected answer. Scored by greedy generation.
- **regression** (must not change much): ``{"messages": [...]}``. Compared against the
  base itself (the adapter disabled through PEFT): mean per-token KL(base || adapter)
  on the base's own greedy answer, and the share of prompts answered identically.

A DPO run is also measured on its held-out preference pairs: the implicit reward of an
answer is ``beta * (log p_adapter(answer) - log p_base(answer))``; the preference
accuracy is the share of pairs whose reward prefers ``chosen``, the margin the mean of
``reward(chosen) - reward(rejected)``.

A gate is a threshold from the run config; every gate is evaluated and reported, and
the run is refused if any is missed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GenerationConfig

from adapters_registry import parse_json_object, prompt_ids, sha256_bytes, validate_messages
from trainer.config import RunConfig
from trainer.errors import DatasetError, LineProblem
from trainer.gate_result import GateResult
from trainer.hygiene import Message

MATCH_KINDS = ("exact", "prefix", "contains")
_GOLDEN_KEYS = frozenset({"messages", "expected", "match"})
_ANSWER_MARGIN = 8  # tokens generated past an exact/prefix answer's own length
_SHOWN = 200  # characters of a generated answer kept in a report


@dataclass(frozen=True)
class EvalItem:
    line: int
    messages: list[Message]  # the prompt: ends on a user turn
    expected: str | None = None  # golden sets only
    match: str = "exact"


@dataclass(frozen=True)
class EvalSet:
    path: Path
    sha256: str
    items: list[EvalItem]

    def prompts(self) -> list[tuple[int, list[Message]]]:
        return [(item.line, item.messages) for item in self.items]


def load_golden_jsonl(path: Path) -> EvalSet:
    """Golden prompts with expected answers; DatasetError lists every bad line."""
    return _load(Path(path), golden=True)


def load_regression_jsonl(path: Path) -> EvalSet:
    """Prompts the adapter must answer (nearly) as the base does."""
    return _load(Path(path), golden=False)


def _load(path: Path, *, golden: bool) -> EvalSet:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(path, [LineProblem(0, f"cannot read file: {exc}")]) from None
    items: list[EvalItem] = []
    problems: list[LineProblem] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        item, line_problems = _parse(number, line, golden)
        problems += [LineProblem(number, p) for p in line_problems]
        if item is not None:
            items.append(item)
    if not problems and not items:
        problems.append(LineProblem(0, "no prompts"))
    if problems:
        raise DatasetError(path, problems)
    return EvalSet(path, sha256_bytes(raw), items)


def _parse(number: int, line: bytes, golden: bool) -> tuple[EvalItem | None, list[str]]:
    record, problems = parse_json_object(line)
    if record is None:
        return None, problems
    allowed = _GOLDEN_KEYS if golden else frozenset({"messages"})
    extra = sorted(set(record) - allowed)
    problems = [f"unsupported key(s) {extra}; allowed: {sorted(allowed)}"] if extra else []
    messages: Any = record.get("messages")
    expected, match = record.get("expected"), record.get("match", "exact")
    ends_on_answer = isinstance(messages, list) and bool(messages) and _role(messages[-1]) == "assistant"
    if golden and expected is None and ends_on_answer:
        expected, messages = messages[-1].get("content"), messages[:-1]
    if messages is None:
        problems.append("missing 'messages'")
    elif isinstance(messages, list) and messages and _role(messages[-1]) == "assistant":
        problems.append("the last turn must be a user turn (the prompt to answer)")
    else:
        # a prompt is valid when answering it would make a valid conversation
        answer = [{"role": "assistant", "content": "-"}]
        problems += validate_messages([*messages, *answer] if isinstance(messages, list) else messages)
    if golden:
        if not isinstance(expected, str) or not expected.strip():
            problems.append(
                "'expected' must be a non-empty string (or end the messages on an assistant turn)"
            )
        if match not in MATCH_KINDS:
            problems.append(f"'match' must be one of {list(MATCH_KINDS)}, got {match!r}")
    if problems:
        return None, problems
    return EvalItem(number, list(messages), expected if golden else None, match), []


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


# -- running evals -------------------------------------------------------------------------


@dataclass(frozen=True)
class GoldenResult:
    score: float  # share of prompts answered as expected
    passed: int
    total: int
    items: list[dict[str, Any]]  # line, match, expected, got, ok

    def summary(self) -> dict[str, Any]:
        failed = [item["line"] for item in self.items if not item["ok"]]
        return {"score": self.score, "passed": self.passed, "total": self.total, "failed_lines": failed}


@dataclass(frozen=True)
class RegressionResult:
    mean_kl: float  # nats per token, averaged over prompts
    max_kl: float
    agreement: float  # share of prompts whose greedy answer equals the base's
    total: int
    items: list[dict[str, Any]]  # line, kl, same, base, adapter

    def summary(self) -> dict[str, Any]:
        return {"mean_kl": self.mean_kl, "max_kl": self.max_kl, "agreement": self.agreement,
                "total": self.total}


def is_match(got: str, expected: str, match: str) -> bool:
    got, expected = got.strip(), expected.strip()
    if match == "exact":
        return got == expected
    if match == "prefix":
        return got.startswith(expected)
    return expected in got


def golden_eval(
    model: Any, tokenizer: Any, golden: EvalSet, config: RunConfig, stop_ids: Collection[int],
    progress: bool = False,
) -> GoldenResult:
    """Greedy answers of the adapted model to every golden prompt, scored.

    ``stop_ids`` end a generation (``adapters_registry.prompts.stop_token_ids``, as served).
    """
    items = []
    for item in tqdm(golden.items, desc="golden eval", unit="prompt", disable=not progress, file=sys.stderr):
        assert item.expected is not None
        budget = config.eval_max_new_tokens
        if item.match != "contains":  # enough to see the whole answer and whatever follows it
            budget = len(tokenizer(item.expected, add_special_tokens=False)["input_ids"]) + _ANSWER_MARGIN
        answer = _greedy(model, tokenizer, item.messages, budget, stop_ids)
        got = tokenizer.decode(answer, skip_special_tokens=True)
        ok = is_match(got, item.expected, item.match)
        items.append({"line": item.line, "match": item.match, "expected": item.expected,
                      "got": got[:_SHOWN], "ok": ok})
    passed = sum(item["ok"] for item in items)
    return GoldenResult(passed / len(items), passed, len(items), items)


def regression_eval(
    model: Any, tokenizer: Any, regression: EvalSet, config: RunConfig, stop_ids: Collection[int],
    progress: bool = False,
) -> RegressionResult:
    """How far the adapter moves the base on prompts it should leave alone."""
    items = []
    for item in tqdm(regression.items, desc="regression eval", unit="prompt", disable=not progress,
                     file=sys.stderr):
        with model.disable_adapter():
            base_answer = _greedy(model, tokenizer, item.messages, config.eval_max_new_tokens, stop_ids)
        adapter_answer = _greedy(model, tokenizer, item.messages, config.eval_max_new_tokens, stop_ids)
        kl = _answer_kl(model, tokenizer, item.messages, base_answer)
        items.append({
            "line": item.line, "kl": kl, "same": base_answer == adapter_answer,
            "base": tokenizer.decode(base_answer, skip_special_tokens=True)[:_SHOWN],
            "adapter": tokenizer.decode(adapter_answer, skip_special_tokens=True)[:_SHOWN],
        })
    kls = [item["kl"] for item in items]
    agreement = sum(item["same"] for item in items) / len(items)
    return RegressionResult(sum(kls) / len(kls), max(kls), agreement, len(items), items)


@dataclass(frozen=True)
class PreferenceResult:
    accuracy: float  # share of pairs whose implicit reward prefers chosen (ties count half)
    margin: float  # mean reward(chosen) - reward(rejected)
    total: int
    items: list[dict[str, Any]]  # prompt, chosen_reward, rejected_reward, ok

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "margin": self.margin, "total": self.total}


EncodedPair = tuple[Sequence[int], Sequence[int], Sequence[int]]  # prompt, chosen, rejected ids


def preference_eval(model: Any, pairs: Sequence[EncodedPair], beta: float,
                    labels: Sequence[str] = ()) -> PreferenceResult:
    """DPO's implicit rewards of each pair, the base (adapter disabled) as the reference.

    ``labels`` name the pairs in the items (e.g. their prompts). TRL's DPOTrainer logs
    the same quantities per batch as ``rewards/accuracies`` and ``rewards/margins``.
    """
    items: list[dict[str, Any]] = []
    scores: list[float] = []
    margins: list[float] = []
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        rewards = []
        for answer in (chosen, rejected):
            policy = _answer_logp(model, prompt, answer)
            with model.disable_adapter():
                reference = _answer_logp(model, prompt, answer)
            rewards.append(beta * (policy - reference))
        margins.append(rewards[0] - rewards[1])
        scores.append(1.0 if margins[-1] > 0 else 0.5 if margins[-1] == 0 else 0.0)
        items.append({"pair": labels[i][:_SHOWN] if i < len(labels) else i,
                      "chosen_reward": rewards[0], "rejected_reward": rewards[1], "ok": margins[-1] > 0})
    return PreferenceResult(sum(scores) / len(scores), sum(margins) / len(margins), len(items), items)


def _answer_logp(model: Any, prompt: Sequence[int], answer: Sequence[int]) -> float:
    """Summed log-probability of ``answer`` after ``prompt``."""
    device = next(model.parameters()).device
    ids = torch.tensor([[*prompt, *answer]], device=device)
    keep = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1, device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=keep).logits.float()
    logps = F.log_softmax(logits, dim=-1)[0].gather(-1, torch.tensor(answer, device=device)[:, None])
    return float(logps.sum())


def _greedy(model: Any, tokenizer: Any, messages: Sequence[Message], max_new_tokens: int,
            stop_ids: Collection[int]) -> list[int]:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
    stop = sorted(stop_ids)
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0],
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation)
    return [int(t) for t in out[0, ids.shape[1]:]]


def _answer_kl(model: Any, tokenizer: Any, messages: Sequence[Message], answer: list[int]) -> float:
    """Mean KL(base || adapter) of the next-token distributions along the base's answer."""
    prompt = prompt_ids(tokenizer, messages)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + answer], device=device)
    keep = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1, device=device)
    with torch.no_grad():
        with model.disable_adapter():
            base = F.log_softmax(model(input_ids=ids, logits_to_keep=keep).logits.float(), dim=-1)
        adapted = F.log_softmax(model(input_ids=ids, logits_to_keep=keep).logits.float(), dim=-1)
    kl = F.kl_div(adapted, base, log_target=True, reduction="none").sum(-1).mean()
    return float(kl)


# -- gates ------------------------------------------------------------------------------------


def _gate(name: str, measured: float, threshold: float, comparison: str) -> GateResult:
    ok = {">=": measured >= threshold, "<=": measured <= threshold, ">": measured > threshold}[comparison]
    return GateResult(name, measured, threshold, comparison, ok and math.isfinite(measured))


def check_gates(
    config: RunConfig,
    val_perplexity: float | None,
    golden: GoldenResult | None,
    regression: RegressionResult | None,
    preference: PreferenceResult | None = None,
) -> list[GateResult]:
    """Every configured gate whose measurement exists, evaluated (none is skipped silently:
    a gate whose eval set is missing is simply not configured)."""
    gates = []
    if preference is not None:
        if config.preference_min_accuracy is not None:
            gates.append(_gate("preference_accuracy", preference.accuracy,
                               config.preference_min_accuracy, ">="))
        if config.preference_min_margin is not None:
            gates.append(_gate("preference_margin", preference.margin, config.preference_min_margin, ">"))
    if config.max_val_perplexity is not None and val_perplexity is not None:
        gates.append(_gate("val_perplexity", val_perplexity, config.max_val_perplexity, "<="))
    if golden is not None:
        gates.append(_gate("golden_score", golden.score, config.golden_min_score, ">="))
    if regression is not None:
        gates.append(_gate("regression_kl", regression.mean_kl, config.regression_max_kl, "<="))
        if config.regression_min_agreement is not None:
            gates.append(_gate("regression_agreement", regression.agreement,
                               config.regression_min_agreement, ">="))
    return gates


def eval_report(
    gates: Sequence[GateResult],
    golden: GoldenResult | None,
    regression: RegressionResult | None,
    *,
    detailed: bool,
    preference: PreferenceResult | None = None,
) -> dict[str, Any]:
    """The eval section of a manifest (``detailed=False``) or of ``eval_report.json``."""
    report: dict[str, Any] = {"passed": all(g.passed for g in gates), "gates": [asdict(g) for g in gates]}
    if preference is not None:
        report["preference"] = preference.summary() | ({"items": preference.items} if detailed else {})
    if golden is not None:
        report["golden"] = golden.summary() | ({"items": golden.items} if detailed else {})
    if regression is not None:
        report["regression"] = regression.summary() | ({"items": regression.items} if detailed else {})
    return report
