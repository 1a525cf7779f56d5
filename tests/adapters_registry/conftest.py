"""A tiny Llama base, its contract and template, and one compatible PEFT adapter.

Built once per session (a few seconds, mostly importing torch); tests copy the adapter
before breaking it. Variants are trained by nobody: PEFT's freshly initialised weights
have exactly the names and shapes a trained adapter has, which is all the check reads.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adapters_registry.contract import BaseContract, derive_contract
from adapters_registry.hashing import sha256_bytes
from adapters_registry.manifest import AdapterManifest
from adapters_registry.template import AdapterTemplate

BASE_ID = "tiny-llama"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A registry checks every adapter against the base it is served on.",
    "Tenants own adapters; versions are immutable; aliases move.",
]


@dataclass(frozen=True)
class Kit:
    """The session's base, contract, template and known-good adapter."""

    base_dir: Path
    contract: BaseContract
    template: AdapterTemplate
    good: Path  # a compatible adapter directory: copy it, never mutate it
    model: LlamaForCausalLM  # the base (hidden 64) that `good` was made for
    narrow_model: LlamaForCausalLM  # same layout with hidden 32, for wrong-shape adapters

    def manifest(self, **changes: Any) -> AdapterManifest:
        """A manifest that matches this base and template, with ``changes`` applied."""
        fields: dict[str, Any] = {
            "base_model_id": self.contract.model_id,
            "base_revision": self.contract.revision,
            "template_id": self.template.template_id,
            "tokenizer_sha256": self.contract.tokenizer_sha256,
            "chat_template_sha256": self.contract.chat_template_sha256,
            "rope": self.contract.rope,
            "dataset_sha256": sha256_bytes(b"\n".join(s.encode() for s in SENTENCES)),
            "seed": 0,
            "versions": {"peft": peft.__version__, "transformers": transformers.__version__},
        }
        return AdapterManifest(**(fields | changes))

    def save_peft(self, out: Path, *, narrow: bool = False, safe: bool = True, **lora: Any) -> Path:
        """Save a fresh PEFT adapter for the template, with ``lora`` overriding its fields."""
        base = copy.deepcopy(self.narrow_model if narrow else self.model)
        config = LoraConfig(**(self.template.peft_config_kwargs() | lora), task_type="CAUSAL_LM")
        get_peft_model(base, config).save_pretrained(out, safe_serialization=safe)
        return out


def _tiny_llama(vocab_size: int, hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def _build_base(out: Path) -> LlamaForCausalLM:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    model = _tiny_llama(len(fast), hidden=64)
    model.save_pretrained(out, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    root = tmp_path_factory.mktemp("compat")
    base_dir = root / "base"
    model = _build_base(base_dir)
    contract = derive_contract(base_dir, BASE_ID)
    template = AdapterTemplate(
        base_model_id=contract.model_id,
        base_revision=contract.revision,
        r=8,
        lora_alpha=16,
        target_modules=frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}),
    )
    narrow = _tiny_llama(model.config.vocab_size, hidden=32)
    kit = Kit(base_dir, contract, template, root / "good", model, narrow)
    kit.save_peft(kit.good)
    kit.manifest().write(kit.good)
    return kit


@pytest.fixture
def adapter(kit: Kit, tmp_path: Path) -> Path:
    """A private copy of the good adapter, free to break."""
    return Path(shutil.copytree(kit.good, tmp_path / "adapter"))


@dataclass
class Nobody:
    """A world-readable folder and a way to run `lora-gateway registry` in it as nobody."""

    dir: Path
    db: str
    artifacts: Path

    def copy(self, src: Path) -> Path:
        """A copy of ``src`` that nobody owns (test folders are root's, mode 0700)."""
        dest = Path(shutil.copytree(src, self.dir / src.name))
        for path in [dest, *dest.iterdir()]:
            os.chown(path, NOBODY, NOBODY)
        return dest

    def cli(self, *args: str, db: str | None = None, artifacts: Path | None = None) -> tuple[int, str]:
        """(exit code, stderr) of the command run by uid/gid 65534 with real permissions.

        A forked child drops root and calls the CLI in-process: the interpreter lives under
        /root, which nobody cannot read, and every module the CLI needs is already imported.
        """
        from lora_gateway.cli import main

        argv = ["registry", args[0], "--db", db or self.db, "--artifacts",
                str(artifacts or self.artifacts), *args[1:]]
        err = self.dir / f"stderr-{os.getpid()}-{len(argv)}.txt"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                sys.stderr = open(err, "w")  # noqa: SIM115 - the child exits right after
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                code = main(argv)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        text = err.read_text()
        err.unlink()
        return os.waitstatus_to_exitcode(status), text


NOBODY = 65534


@pytest.fixture
def nobody(tiny_base) -> Iterator[Nobody]:
    """A registry (tiny-llama, its template, tenant acme) in a fresh folder that nobody
    owns: tests take permissions away from there."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as another user")
    from lora_gateway.cli import main

    root = Path(tempfile.mkdtemp(prefix="lgw-nobody-", dir="/tmp"))
    root.chmod(0o755)
    try:
        db = f"sqlite:///{root / 'reg.db'}"
        common = ["--db", db, "--artifacts", str(root / "art")]
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["registry", "add-base", *common, "tiny-llama", str(tiny_base.path)]) == 0
            assert main(["registry", "add-template", *common, "tiny-llama"]) == 0
            assert main(["registry", "add-tenant", *common, "acme"]) == 0
        for path in [root, *root.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
        yield Nobody(root, db, root / "art")
    finally:
        shutil.rmtree(root, ignore_errors=True)

