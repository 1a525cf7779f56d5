"""Build a model directory once and publish it atomically.

A build writes into a temporary sibling of its target and is renamed into place
only when complete, with a stamp naming its recipe key written last. So a crash
leaves at worst an orphaned ``.<name>.*.tmp`` directory, never a half-built
model at the target, and two concurrent builders of the same recipe both end up
with one complete copy (the loser discards its own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STAMP_NAME = "recipe.json"


def is_complete(target: Path, recipe_key: str) -> bool:
    """True when ``target`` holds a finished build of exactly this recipe."""
    try:
        stamp = json.loads((target / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(stamp, dict) and stamp.get("recipe_key") == recipe_key


def build_once(
    target: Path,
    recipe_key: str,
    build: Callable[[Path], None],
    stamp: Mapping[str, Any],
) -> bool:
    """Make ``target`` a complete build of ``recipe_key``; True if this call published it.

    ``build`` fills an empty directory; ``stamp`` is extra provenance for the
    stamp file (keep it deterministic so equal recipes give equal directories).
    """
    if is_complete(target, recipe_key):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        content = {**stamp, "recipe_key": recipe_key}
        (tmp / STAMP_NAME).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return _publish(tmp, target, recipe_key)
    finally:
        # After a successful rename tmp no longer exists; otherwise it is ours to remove.
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path, recipe_key: str) -> bool:
    error: OSError | None = None
    for _ in range(2):
        try:
            # rename(2) of a directory is atomic and refuses a non-empty target,
            # so it never mixes our files into another builder's.
            os.rename(tmp, target)
            return True
        except OSError as exc:
            error = exc
            if is_complete(target, recipe_key):
                logger.info("%s was completed by another builder; discarding ours", target)
                return False
        # The target exists but is not a finished build of this recipe (e.g. a
        # copy interrupted by hand): move it out of the way, then try once more.
        logger.warning("replacing incomplete base directory %s", target)
        stale = target.with_name(f".{target.name}.{uuid.uuid4().hex}.stale")
        with contextlib.suppress(FileNotFoundError):  # another builder moved it first
            os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    if is_complete(target, recipe_key):
        return False
    raise OSError(f"could not publish the built base into {target}") from error
