"""`registry push` of adapters from anywhere: the corpus (tests/adapters_registry/corpus.py)
as one table through the CLI, archive safety, size limits before copying, clear errors.

Every defective case must exit 3 naming each of its violations and store nothing; the
valid plain PEFT folder and its archives must register. No case may raise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from adapters_registry import Limits
from adapters_registry.intake import stage
from adapters_registry.template import AdapterTemplate, expected_tensors, max_weights_bytes
from adapters_registry.violations import OTHER_FILES_BYTES
from lora_gateway.cli import main
from tests.adapters_registry.corpus import ARCHIVES, CASES, OVERSIZED_BYTES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli(tiny_base, tmp_path_factory):
    """An in-process `lora-gateway registry` with tiny-llama, its template and tenant acme."""
    home = tmp_path_factory.mktemp("intake-cli")
    common = ["--db", f"sqlite:///{home / 'reg.db'}", "--artifacts", str(home / "art")]

    def call(*args: str) -> tuple[int, str, str]:
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["registry", args[0], *common, *args[1:]])
        return code, out.getvalue(), err.getvalue()

    assert call("add-base", "tiny-llama", str(tiny_base.path), "--alias", "acme-hub/tiny-llama")[0] == 0
    call.template = call("add-template", "tiny-llama", "--r", "8", "--alpha", "16")[1].strip()  # type: ignore[attr-defined]
    assert call("add-tenant", "acme")[0] == 0
    call.home = home  # type: ignore[attr-defined]
    return call


def blobs(home: Path) -> set[Path]:
    return {p for p in (home / "art").rglob("*") if p.is_file()}


SOURCES = [pytest.param(name, codes, id=name) for name, codes in {**CASES, **ARCHIVES}.items()]


@pytest.mark.parametrize(("name", "codes"), SOURCES)
def test_corpus_through_the_cli(cli, corpus: Path, name: str, codes: list[str]) -> None:
    before = blobs(cli.home)
    adapter = "bot-" + name.replace("_", "-").replace(".", "-")
    code, out, err = cli("push", f"acme/{adapter}", str(corpus / name), "--base", "tiny-llama")
    assert "Traceback" not in err
    if not codes:
        assert code == 0, err
        assert out.startswith(f"registered acme/{adapter}@v1")
        return
    assert code == 3, (code, err)
    for violation in codes:
        assert f"[{violation}]" in err, (violation, err)
    assert blobs(cli.home) == before  # nothing stored
    assert "escaped" not in {p.name for p in corpus.parent.rglob("*")}


def test_template_or_base_must_be_named_without_a_manifest(cli, corpus: Path) -> None:
    code, _, err = cli("push", "acme/nameless", str(corpus / "valid"))
    assert code == 2 and "--template" in err and "--base" in err
    code, _, err = cli("push", "acme/named", str(corpus / "valid"), "--template", cli.template)
    assert code == 0, err
    code, _, err = cli("push", "acme/elsewhere", str(corpus / "valid"), "--base", "other-base")
    assert code == 2 and "no registered template" in err


def test_a_known_alias_of_the_base_is_accepted(cli, corpus: Path, tmp_path: Path) -> None:
    adapter = shutil.copytree(corpus / "valid", tmp_path / "aliased")
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text().replace('"tiny-llama"', '"acme-hub/tiny-llama"'))
    code, _, err = cli("push", "acme/aliased", str(adapter), "--base", "tiny-llama")
    assert code == 0, err


@pytest.mark.parametrize(("make", "needle"), [
    (lambda p: p, "does not exist"),
    (lambda p: (p.parent / "dangling").symlink_to(p) or p.parent / "dangling", "dangling symlink"),
    (lambda p: (os.mkfifo(p), p)[1], "is a FIFO"),
    (lambda p: (p.write_text("{}"), p)[1], "not a folder or a .tar"),
], ids=["missing", "dangling", "fifo-path", "plain-file"])
def test_unusable_paths_exit_4(cli, tmp_path: Path, make, needle: str) -> None:
    path = make(tmp_path / "adapter")
    code, _, err = cli("push", "acme/bot", str(path), "--base", "tiny-llama")
    assert code == 4 and needle in err and "Traceback" not in err, err


def test_sparse_2gib_file_is_refused_before_any_copy(cli, corpus: Path) -> None:
    """The push runs under a 64 MiB file-size limit (RLIMIT_FSIZE): had intake copied the
    2.3 GiB sparse file, the write would fail; instead its size refuses it unread."""
    assert (corpus / "oversized" / "adapter_model.safetensors").stat().st_size == OVERSIZED_BYTES
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({64 << 20}, {64 << 20}))\n"
        "from lora_gateway.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    tmp = cli.home / "tmp"
    tmp.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script, "registry", "push", "--db", f"sqlite:///{cli.home / 'reg.db'}",
         "--artifacts", str(cli.home / "art"), "acme/sparse", str(corpus / "oversized"),
         "--base", "tiny-llama"],
        capture_output=True, text=True, timeout=120,
        env=os.environ | {"PYTHONPATH": str(REPO), "TMPDIR": str(tmp)})
    assert "Traceback" not in result.stderr
    assert result.returncode == 3, result.stderr
    assert (f"[file_too_large] adapter_model.safetensors is {OVERSIZED_BYTES} bytes, over the "
            f"{OTHER_FILES_BYTES}-byte per-file limit (the most an adapter of base tiny-llama's "
            "templates can need); it was not copied") in result.stderr
    assert list(tmp.iterdir()) == []  # staging removed


def test_the_template_bounds_every_file_before_a_byte_is_staged(cli, corpus: Path, tmp_path: Path) -> None:
    """1 GiB is under the 2 GiB per-file limit, but tiny-llama's rank-8 template makes
    adapters of a few hundred KiB: a member, a folder's file or an upload that size is
    refused by its declared size, never extracted or copied (the data is not even there)."""
    gib = 1 << 30
    valid = sorted((corpus / "valid").iterdir())
    archive = tmp_path / "gib.tar"
    with tarfile.open(archive, "w") as tar:
        for f in valid:
            tar.add(f, arcname=f.name)
        member = tarfile.TarInfo("training_args.json")
        member.size = gib  # the header alone
        tar.fileobj.write(member.tobuf(tar.format, tar.encoding, tar.errors))  # type: ignore[union-attr]
    folder = shutil.copytree(corpus / "valid", tmp_path / "folder")
    with (folder / "training_args.json").open("wb") as f:
        f.truncate(gib)  # sparse
    bound = (f"over the {OTHER_FILES_BYTES}-byte per-file limit (the most an adapter of base "
             "tiny-llama's templates can need)")
    for source, refusal in (
            (archive, f"[file_too_large] archive member 'training_args.json' is {gib} bytes, {bound}; "
                      "it was not extracted"),
            (folder, f"[file_too_large] training_args.json is {gib} bytes, {bound}; it was not copied")):
        code, _, err = cli("push", "acme/gib", str(source), "--base", "tiny-llama")
        assert code == 3 and "Traceback" not in err, err
        assert refusal in err, err
    # Named by its template, the bound is that template's.
    code, _, err = cli("push", "acme/gib", str(folder), "--template", cli.template)
    assert code == 3 and f"limit (the most template {cli.template}'s adapters can need)" in err, err
    assert cli("push", "acme/fits", str(corpus / "valid"), "--base", "tiny-llama")[0] == 0


def test_the_weights_bound_covers_every_tensor_in_the_widest_dtype(tiny_contract) -> None:
    contract = tiny_contract
    template = AdapterTemplate(contract.model_id, contract.revision, r=8, lora_alpha=16)
    shapes = expected_tensors(contract, template)
    data = sum(a * b for a, b in shapes.values())
    assert max_weights_bytes(contract, template, {"BF16"}) == 2 * data + 1024 * len(shapes) + (1 << 20)
    assert max_weights_bytes(contract, template, {"BF16", "F32"}) == 4 * data + 1024 * len(shapes) + (1 << 20)
    limits = Limits().within(5 << 30, "why")
    default = Limits()
    assert (limits.max_file_bytes, limits.max_total_bytes) == (default.max_file_bytes,
                                                               default.max_total_bytes)
    limits = Limits().within(1 << 20, "why")
    assert limits.max_file_bytes == OTHER_FILES_BYTES and limits.basis == " (why)"
    total = limits.max_total_bytes
    assert total == (1 << 20) + OTHER_FILES_BYTES < limits.max_archive_bytes < 2 * total


def test_zip_bomb_is_refused_by_its_declared_size_before_inflating(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_model.safetensors", b"\0" * (32 << 20))  # 32 MiB -> ~32 KiB
    limits = Limits(max_file_bytes=1 << 20, max_total_bytes=2 << 20)
    staged = stage(bomb, tmp_path / "staged", limits)
    assert [v.code for v in staged.refused] == ["file_too_large"]
    assert "over the 1048576-byte per-file limit; it was not extracted" in staged.refused[0].message
    assert list((tmp_path / "staged").iterdir()) == []


def test_a_member_inflating_past_its_header_stops_there(tmp_path: Path) -> None:
    """A lying header (declares 1 KiB, inflates to 32 MiB) is cut at the declared size and
    refused as an invalid archive; no more than the limit is ever written."""
    bomb = tmp_path / "liar.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_model.safetensors", b"\0" * (32 << 20))
    raw = bytearray(bomb.read_bytes())
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.find(sig)
        raw[at + offset: at + offset + 4] = (1024).to_bytes(4, "little")
    bomb.write_bytes(bytes(raw))
    staged = stage(bomb, tmp_path / "staged", Limits(max_file_bytes=1 << 20))
    assert not staged.complete and [v.code for v in staged.refused] == ["archive_invalid"]
    assert sum(p.stat().st_size for p in (tmp_path / "staged").iterdir()) <= 1 << 20


def test_member_count_and_total_limits(tmp_path: Path) -> None:
    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w") as tar:
        for i in range(5):
            src = tmp_path / f"f{i}"
            src.write_bytes(b"x" * 100)
            tar.add(src, arcname=f"f{i}")
    staged = stage(archive, tmp_path / "a", Limits(max_files=3))
    assert not staged.complete and staged.refused[0].code == "too_many_files"
    staged = stage(archive, tmp_path / "b", Limits(max_total_bytes=250))
    assert not staged.complete and "total more than 250 bytes" in staged.refused[0].message
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["f0", "f1"]


def test_unreadable_file_exits_4_as_a_non_root_user(corpus: Path, nobody) -> None:
    adapter = nobody.copy(corpus / "valid")
    os.chown(adapter / "adapter_model.safetensors", 0, 0)
    os.chmod(adapter / "adapter_model.safetensors", 0)
    code, err = nobody.cli("push", "acme/bot", str(adapter), "--base", "tiny-llama")
    assert code == 4, err
    assert "cannot read" in err and "permission denied" in err and "Traceback" not in err
