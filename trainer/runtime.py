"""How the trainer's tools run on this machine: torch threads, atomic output folders, versions.

Shared by training, merging, composition and serving parity, so each of them sizes its
thread pool, writes its output folder and records its library versions the same way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

__all__ = ["atomic_dir", "available_cpus", "library_versions", "threads_for", "torch_threads"]

# Used when running from a source tree, where the distribution's metadata is absent.
_SOURCE_VERSION = "0.1.0"
_PARALLEL_MIN_PARAMS = 20_000_000


def threads_for(model: Any) -> int:
    """The torch thread count that runs ``model`` fastest here."""
    # Matrices of a few-million-parameter model are too small to split: on 2 shared cores
    # two OpenMP threads mostly wait on each other (measured 10-40x slower than one).
    if sum(p.numel() for p in model.parameters()) < _PARALLEL_MIN_PARAMS:
        return 1
    return available_cpus()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """A fresh directory beside ``final`` that becomes ``final`` only if the block succeeds.

    With ``replace``, an existing ``final`` (a scratch folder, never an adapter version)
    is removed first.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        if replace and final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def library_versions() -> dict[str, str]:
    """The versions that decide an artifact's bytes, for its manifest or record."""
    try:
        project = metadata.version("lora-gateway")
    except metadata.PackageNotFoundError:
        project = _SOURCE_VERSION
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lora-gateway": project,
    }
