"""POST /admin/v1/tenants/{tenant}/adapters/{name}/versions: an archive upload runs the
registry's own check; the whole corpus as one table, plus the byte limit."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from adapters_registry import Limits
from tests.adapters_registry.corpus import ARCHIVES, CASES
from tests.gateway.test_admin_api import ADMIN, admin

# The folders as a client would upload them: a .tar.gz of the folder's entries as they
# are (a symlink stays a link, a FIFO a FIFO). "oversized" is huge_member.tar's job.
# In an archive, a link or a FIFO is an unsafe member: never extracted.
IN_ARCHIVE = {"symlink": ["archive_unsafe_member"], "fifo": ["archive_unsafe_member"]}
FOLDERS = {name: IN_ARCHIVE.get(name, codes) for name, codes in CASES.items() if name != "oversized"}
SOURCES = [pytest.param(name, codes, id=name) for name, codes in {**FOLDERS, **ARCHIVES}.items()]


def archive_bytes(corpus: Path, name: str) -> bytes:
    path = corpus / name
    if path.is_file():
        return path.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for entry in sorted(path.iterdir()):
            tar.add(entry, arcname=entry.name, recursive=False)
    return buf.getvalue()


def upload(gw, name: str, body: bytes, **params: str):
    url = f"/admin/v1/tenants/acme/adapters/{name}/versions"
    return gw.client.post(url, content=body, params={"base": "tiny-llama", **params},
                          headers=admin() | {"content-type": "application/octet-stream"})


@pytest.mark.parametrize(("name", "codes"), SOURCES)
def test_corpus_through_the_upload_endpoint(gateway_factory, corpus: Path, name: str,
                                            codes: list[str]) -> None:
    gw = gateway_factory(admin_api_key=ADMIN)
    adapter = "up-" + name.replace("_", "-").replace(".", "-")
    r = upload(gw, adapter, archive_bytes(corpus, name))
    body = r.json()
    if not codes:
        assert r.status_code == 201, body
        assert body["version"] == f"acme/{adapter}@v1"
        chat = gw.chat("acme", adapter)
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
        return
    assert r.status_code == 422, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "incompatible_adapter"
    for violation in codes:
        assert f"[{violation}]" in body["error"]["message"], (violation, body)
    assert gw.chat("acme", adapter).status_code == 404


def test_upload_limits_and_bad_bodies(gateway_factory, corpus: Path) -> None:
    gw = gateway_factory(admin_api_key=ADMIN)
    body = archive_bytes(corpus, "valid.tar.gz")
    assert gw.client.post("/admin/v1/tenants/acme/adapters/x/versions", content=body).status_code == 401
    services = gw.client.app.state.services  # type: ignore[attr-defined]
    services.admin_registry.limits = Limits(max_archive_bytes=len(body) - 1)
    r = upload(gw, "too-big", body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    services.admin_registry.limits = Limits()
    # Under the 4 GiB archive limit, but more than any tiny-llama adapter can be: refused by
    # its declared length, before a byte is read.
    bound = services.admin_registry.intake_limits(base="tiny-llama").max_archive_bytes
    assert bound < (100 << 20)
    r = gw.client.post("/admin/v1/tenants/acme/adapters/gib/versions", params={"base": "tiny-llama"},
                       content=iter([b"x"]), headers=admin() | {"content-length": str(1 << 30)})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["message"] == (
        f"the upload is {1 << 30} bytes, over the {bound}-byte limit (the most an adapter of base "
        "tiny-llama's templates can need)")
    r = upload(gw, "not-an-archive", b"hello")
    err = r.json()["error"]
    assert r.status_code == 400 and "not a folder or a .tar" in err["message"]
    assert err["code"] == "invalid_archive" and err["message"].startswith("the upload is")
    assert "/tmp" not in err["message"] and "lgw-upload" not in err["message"]  # no server path
    assert upload(gw, "bot%0A", body).status_code == 400  # "bot\\n"
    assert upload(gw, "ok", body, template="tpl-nope").status_code == 400
    assert upload(gw, "ok", body, alias="canary").status_code == 201
    dup = upload(gw, "ok", body)
    assert dup.status_code == 409 and "identical content is already v1" in dup.json()["error"]["message"]
    missing = gw.client.post("/admin/v1/tenants/nobody/adapters/x/versions", content=body, headers=admin())
    assert missing.status_code == 404


def test_uploads_are_not_held_to_the_request_body_limit(gateway_factory, corpus: Path) -> None:
    """Chat bodies stay small (max_request_bytes); an archive only meets the registry's limit."""
    gw = gateway_factory(admin_api_key=ADMIN, max_request_bytes=1024)
    body = archive_bytes(corpus, "valid.tar.gz")
    assert len(body) > 1024
    assert upload(gw, "big-upload", body).status_code == 201
    big_chat = gw.chat("acme", "big-upload", content="x" * 2048)
    assert big_chat.status_code == 413  # the limit still holds everywhere else


def test_verify_endpoint_reports_a_corrupt_blob_with_its_users(gateway_factory) -> None:
    gw = gateway_factory(admin_api_key=ADMIN)
    assert gw.client.post("/admin/v1/verify", headers=admin()).json()["problems"] == []
    version = gw.env.registry.resolve(gw.env.registry.get_tenant("acme"), "support-bot")
    digest = version.files["adapter_model.safetensors"]
    blob = next(p for p in Path(gw.env.artifacts).rglob(digest + "*") if p.is_file())
    blob.write_bytes(b"rot")
    report = gw.client.post("/admin/v1/verify", headers=admin()).json()
    assert [p["digest"] for p in report["problems"]] == [digest]
    assert report["problems"][0]["state"] == "corrupt"
    assert "acme/support-bot@v1" in report["problems"][0]["used_by"][0]
    assert "lora-gateway registry verify --repair" in report["repair"]
