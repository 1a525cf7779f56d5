"""Peers' path-escape failures as regression tests, on the fake engine (issue 10, item 7).

vLLM #46287: the filesystem LoRA resolver joined a request's adapter name to its cache
folder, so ``..`` and absolute names loaded adapters from anywhere. AIBrix #2296: a
``lora_name`` reached ``os.path.join(local_dir, …)`` and then ``shutil.rmtree``. Here a
request's ``model`` is never a path, but a registry row is: its content digest names the
cache folder and its file names are joined to it. Every hostile name, reference, archive
member or altered row below gets a clear 4xx/503 (or a refused registration), and nothing
is read or written outside the cache and staging folders.

The real engine adds nothing to these; the integration module covers the rest of item 7.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from adapters_registry.db import AdapterVersionRow
from adapters_registry.errors import TamperedRecordError
from adapters_registry.hashing import sha256_tree
from gateway.errors import AdapterUnavailableError
from tests.gateway.conftest import Gateway
from tests.gateway.test_adapter_cache import Env, tier_of
from tests.gateway.test_admin_api import ADMIN, admin
from tests.gateway.test_upload import upload


def tree(root: Path) -> list[str]:
    """Every path under ``root`` (relative), to compare a folder's layout before and after."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _cache(gw: Gateway) -> Path:
    return Path(gw.client.app.state.services.settings.cache_dir)  # type: ignore[attr-defined]


HOSTILE_MODELS = [
    "..", "../pirate", "../globex/pirate", "support-bot/../../etc", "/etc/passwd",
    "%2e%2e%2fpirate", "..%2F..%2Fetc", "support-bot%00", "support-bot\x00", "support-bot\n",
    "support-bot@v1/..", "support-bot:../prod", "ｓupport-bot", "support\u2010bot",
    "support-bot\u2215..", "C:\\Windows", "support-bot\\..\\pirate", "．．",
]


@pytest.mark.parametrize("model", HOSTILE_MODELS)
def test_hostile_model_names_are_404_and_touch_no_folder(gw: Gateway, model: str) -> None:
    cache = _cache(gw)
    before = tree(cache)
    r = gw.chat("acme", model)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    assert tree(cache) == before and gw.engine.add_calls == []


@pytest.mark.parametrize("ref", ["acme/..", "../acme/support-bot", "acme/../globex/pirate",
                                 "/etc/passwd", "acme/support-bot%2f..", "acme\x00/support-bot",
                                 "ａcme/support-bot"])
def test_hostile_refs_on_the_admin_cache_routes(gateway_factory, ref: str) -> None:
    gw = gateway_factory(admin_api_key=ADMIN)
    cache = _cache(gw)
    r = gw.client.post("/admin/v1/cache/prefetch", headers=admin(),
                       json={"adapters": [ref], "into": "disk"})
    assert r.status_code == 200 and r.json()["failed"] == 1, r.text
    error = r.json()["data"][0]["error"]
    assert (error["code"], error["type"]) in {("model_not_found", "invalid_request_error"),
                                              ("invalid_request", "invalid_request_error")}, error
    assert error["message"]
    for route, body in (("evict", {"adapter": ref, "from": "all"}), ("pin", {"adapter": ref})):
        r = gw.client.post(f"/admin/v1/cache/{route}", headers=admin(), json=body)
        assert r.status_code in (400, 404), (route, r.text)
    assert tree(cache) == [] and gw.engine.add_calls == []


def _tamper(registry, version, **values) -> None:
    """Change a version's row behind the registry's back (an attacker with database access)."""
    with Session(registry.db) as s, s.begin():
        s.execute(update(AdapterVersionRow).where(AdapterVersionRow.id == version.lora_int_id)
                  .values(**values))


def _altered_rows(version) -> dict[str, dict[str, object]]:
    files = dict(version.files)
    weights = files.pop("adapter_model.safetensors")
    escaping = {**files, "../../escaped.safetensors": weights}
    absolute = {**files, "/tmp/lgw-peer-absolute.safetensors": weights}
    return {
        "digest-dotdot": {"content_sha256": "../../outside"},
        "digest-absolute": {"content_sha256": "/tmp/lgw-peer-outside"},
        "digest-not-hex": {"content_sha256": "Z" * 64},
        "file-dotdot": {"files": escaping, "content_sha256": sha256_tree(escaping)},
        "file-absolute": {"files": absolute, "content_sha256": sha256_tree(absolute)},
        "file-nul": {"files": {**files, "a\x00b": weights}},
        "file-digest-path": {"files": {**files, "adapter_model.safetensors": "../" + weights[3:]}},
        "files-changed-not-content": {"files": files},
    }


ALTERED = ["digest-dotdot", "digest-absolute", "digest-not-hex", "file-dotdot", "file-absolute",
           "file-nul", "file-digest-path", "files-changed-not-content"]


@pytest.mark.parametrize("case", ALTERED)
def test_a_tampered_registry_row_is_a_503_and_writes_nothing(gw: Gateway, case: str,
                                                             tmp_path: Path) -> None:
    reg = gw.env.registry  # type: ignore[attr-defined]
    version = reg.resolve(reg.get_tenant("acme"), "support-bot")
    rows = _altered_rows(version)
    assert sorted(rows) == sorted(ALTERED)
    _tamper(reg, version, **rows[case])
    cache = _cache(gw)
    before, around = tree(cache), tree(cache.parent)
    r = gw.chat("acme", "support-bot")
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "adapter_unavailable" and "registry record was altered" in error["message"]
    assert "acme/support-bot@v1" in error["message"]
    assert tree(cache) == before and tree(cache.parent) == around
    assert not Path("/tmp/lgw-peer-absolute.safetensors").exists()
    assert not Path("/tmp/lgw-peer-outside").exists()
    assert gw.engine.add_calls == []
    # The other tenant is untouched.
    assert gw.chat("globex", "pirate").status_code == 200


def test_a_tampered_digest_never_reaches_rmtree(registry_env, tmp_path: Path) -> None:
    """AIBrix #2296's rmtree: evicting or prefetching a version whose digest is a path."""
    env = Env(registry_env, tmp_path)
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "keep.txt").write_text("not the cache's")
    good = env.version("acme", "support-bot")
    bad = dataclasses.replace(good, content_sha256="../outside")

    async def main() -> None:
        assert await tier_of(env.manager, good) == "remote_fetch"
        for attempt in (env.manager.evict(bad, "all"), env.manager.prefetch(bad, "disk"),
                        tier_of(env.manager, bad)):
            with pytest.raises(AdapterUnavailableError, match="registry record was altered"):
                await attempt

    asyncio.run(main())
    assert (victim / "keep.txt").read_text() == "not the cache's"
    assert [p.name for p in env.cache_dir.iterdir()] == [good.content_sha256]


def test_the_cache_folder_adopts_only_real_digest_folders(registry_env, tmp_path: Path) -> None:
    """At start-up the cache is rebuilt from its folder: a stray folder, or a link named
    like a digest that leads outside, is neither served nor ever evicted (rmtree'd)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x" * 4096)
    good = Env(registry_env, tmp_path).version("acme", "support-bot")  # makes tmp_path/cache
    cache = tmp_path / "cache"
    (cache / "notes").mkdir()
    (cache / good.content_sha256).symlink_to(outside, target_is_directory=True)
    env = Env(registry_env, tmp_path, disk_bytes=1)  # over budget at once: evicts what it may
    assert len(env.disk) == 0
    with pytest.raises(AdapterUnavailableError, match="could not be fetched"):
        asyncio.run(tier_of(env.manager, good))  # refused: the link is not served
    env.disk.shrink(set())
    assert env.engine.add_calls == []
    assert tree(outside) == ["keep.txt"] and (cache / "notes").is_dir()


def test_registry_fetch_refuses_an_escaping_file_name(registry_env, tmp_path: Path) -> None:
    reg = registry_env.registry
    good = reg.resolve(reg.get_tenant("acme"), "support-bot")
    files = {"../escaped.json": good.files["adapter_config.json"]}
    dest = tmp_path / "fetch" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(TamperedRecordError, match="not a plain file name"):
        reg.fetch(dataclasses.replace(good, files=files, content_sha256=sha256_tree(files)), dest)
    assert tree(tmp_path / "fetch") == ["dest"]


# -- uploads: hostile adapter names and archive members ------------------------------------


def _valid_files(registry_env, trained_adapters) -> list[Path]:
    return sorted(p for p in trained_adapters["acme"].iterdir() if p.is_file())


def _tar(files: list[Path], extra: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
        for item in extra:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
            else:
                info = tarfile.TarInfo(item[0])
                info.size = len(item[1])
                tar.addfile(info, io.BytesIO(item[1]))
    return buf.getvalue()


def _zip(files: list[Path], extra: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in files:
            zf.write(f, f.name)
        for name, data in extra.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


ARCHIVES = {
    # A link, then a file written "through" it: the classic two-step escape.
    "link-then-file": lambda f, out: _tar([p for p in f if p.name != "README.md"], [
        _link("README.md", str(out / "escaped.md")), ("README.md", b"through the link")]),
    "hardlink": lambda f, out: _tar(f, [_link("notes.txt", str(out / "x"), tarfile.LNKTYPE)]),
    "dir-link": lambda f, out: _tar(f, [_link("sub", str(out)), ("sub/escaped.txt", b"x")]),
    "backslash-dotdot": lambda f, out: _zip(f, {"..\\..\\escaped.txt": b"x"}),
    "fullwidth-dots": lambda f, out: _zip(f, {"．．/escaped.txt": b"x"}),
    "url-encoded": lambda f, out: _tar(f, [("%2e%2e%2fescaped.txt", b"x")]),
    "nul-in-name": lambda f, out: _zip(f, {"escaped.txt\x00.json": b"x"}),
    "absolute-zip": lambda f, out: _zip(f, {str(out / "escaped.txt"): b"x"}),
}


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_hostile_archive_members_are_refused_inside_staging(
        gateway_factory, registry_env, trained_adapters, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    staging, out = tmp_path / "tmp", tmp_path / "out"
    staging.mkdir(), out.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))  # where uploads and staging land
    gw = gateway_factory(admin_api_key=ADMIN)
    cache = _cache(gw)
    before = tree(cache)
    r = upload(gw, "hostile", ARCHIVES[case](_valid_files(registry_env, trained_adapters), out))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "incompatible_adapter"
    assert tree(out) == [] and tree(staging) == [] and tree(cache) == before
    assert gw.chat("acme", "hostile").status_code == 404


@pytest.mark.parametrize("name", ["..", ".", "%2e%2e", "a%2fb", "bot%00", "ｂot", "bot\u200b"])
def test_hostile_adapter_names_on_upload_are_refused(gateway_factory, registry_env,
                                                     trained_adapters, name: str) -> None:
    gw = gateway_factory(admin_api_key=ADMIN)
    r = upload(gw, name, _tar(_valid_files(registry_env, trained_adapters), []))
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert [a.name for a in registry_env.registry.list_adapters(
        registry_env.registry.get_tenant("acme"))] == ["support-bot"]
