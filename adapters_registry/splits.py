"""An alias's weighted split (progressive delivery, A/B) as the registry stores and shows it:
entries by label (``v3``, ``base``), what makes a split valid, and the running rollout's
shadow share a resolution carries (``catalog.Catalog.resolve_split``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters_registry.db import AdapterVersionRow, AliasSplitRow, RolloutRow
from adapters_registry.errors import ValidationError
from adapters_registry.records import AdapterVersion, Shadow, SplitEntry

__all__ = ["shadow_of", "split_from_labels", "split_labels", "split_problems"]

MAX_SPLIT_ENTRIES = 8
MAX_SPLIT_WEIGHT = 1_000_000


def split_from_labels(labels: Mapping[str, object]) -> dict[int | None, int]:
    """{"v1": 90, "v2": 10, "base": 5} (as the CLI and the admin API take a split) as
    ``set_split`` takes it; ValidationError naming every entry that is neither."""
    out: dict[int | None, Any] = {}
    bad = []
    for label, weight in labels.items():
        if label == "base":
            out[None] = weight
        elif label[:1] == "v" and label[1:].isdigit() and int(label[1:]) >= 1:
            out[int(label[1:])] = weight
        else:
            bad.append(repr(label))
    if bad:
        raise ValidationError(f"split entries are vN (a version) or base (the bare base), "
                              f"not {', '.join(bad)}")
    return out


def split_problems(weights: Mapping[int | None, int]) -> list[str]:
    """Every reason ``weights`` (version, None for the base -> weight) is no split."""
    problems = []
    if not any(v is not None for v in weights):
        problems.append("name at least one version (a split of the base alone serves no adapter)")
    if len(weights) > MAX_SPLIT_ENTRIES:
        problems.append(f"{len(weights)} entries; at most {MAX_SPLIT_ENTRIES}")
    for v, weight in weights.items():
        label = "base" if v is None else f"v{v}"
        if isinstance(weight, bool) or not isinstance(weight, int):
            problems.append(f"{label}: weight {weight!r} is not an integer")
        elif not 1 <= weight <= MAX_SPLIT_WEIGHT:
            problems.append(f"{label}: weight {weight} is outside 1..{MAX_SPLIT_WEIGHT} "
                            "(leave an entry out to send it nothing)")
    return problems


def split_labels(s: Session, adapter_id: int, alias: str) -> dict[str, int]:
    """An alias's split as {"v1": 90, "v2": 10, "base": 5}; empty without one."""
    out = {}
    for row in s.scalars(select(AliasSplitRow).filter_by(adapter_id=adapter_id, alias=alias)
                         .order_by(AliasSplitRow.slot)):
        label = "base" if row.version_id is None else \
            f"v{s.get_one(AdapterVersionRow, row.version_id).version}"
        out[label] = row.weight
    return out


def shadow_of(s: Session, adapter_id: int, alias: str | None, stable: AdapterVersion,
              split: tuple[SplitEntry, ...]) -> Shadow | None:
    """The alias's running rollout's shadow share, if it has one."""
    rollout = s.scalar(select(RolloutRow).filter_by(adapter_id=adapter_id, alias=alias,
                                                    active=True, state="running"))
    if rollout is None or stable.version != rollout.stable_version:
        return None
    percent = float((rollout.rules or {}).get("shadow_percent", 0))
    candidate = next((e.version for e in split if e.version is not None
                      and e.version.version == rollout.candidate_version), None)
    if candidate is None or percent <= 0:
        return None
    return Shadow(stable, candidate, percent)
