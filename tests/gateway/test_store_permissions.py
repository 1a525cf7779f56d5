"""The gateway fetching what another user pushed: blobs are readable by the pusher's group,
and a gateway that may not read them answers 503 naming the fix, never a 500."""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from datetime import UTC, datetime
from pathlib import Path

import pytest

from adapters_registry import AdapterVersion, FilesystemStore, sha256_file, sha256_tree
from gateway.errors import AdapterUnavailableError
from gateway.residency.disk_cache import DiskCache, download

NOBODY = 65534


class StoreFetcher:
    """The registry's fetch over the store alone (the child has no database to open)."""

    def __init__(self, store: FilesystemStore) -> None:
        self.store = store

    def fetch(self, version: AdapterVersion, dest: Path) -> None:
        for rel, digest in version.files.items():
            self.store.get(digest, dest / rel)


def fetch_as(uid: int, gid: int, store: FilesystemStore, cache: Path, version: AdapterVersion,
             out: Path) -> str:
    """What the gateway's download answers in a forked child running as ``uid``:``gid``
    (the interpreter lives under /root, which that user cannot read: no new process)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                download(StoreFetcher(store), DiskCache(cache, 10**9), version)
                answer = "served"
            except AdapterUnavailableError as exc:
                answer = f"503 {exc}"
        except BaseException:
            answer = traceback.format_exc()
        out.write_text(answer)
        os._exit(0)
    os.waitpid(pid, 0)
    return out.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
@pytest.mark.parametrize(("group", "served"), [(0, True), (NOBODY, False)],
                         ids=["pusher's group", "another group"])
def test_a_gateway_running_as_another_user_fetches_or_answers_503(group: int, served: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="lgw-uid-"))  # test folders are root's, mode 0700
    try:
        os.chmod(root, 0o755)
        store = FilesystemStore(root / "store")  # the pusher: root
        weights = root / "adapter_model.safetensors"
        weights.write_bytes(b"not really weights")
        digest = sha256_file(weights)
        store.put(weights, digest)
        assert (os.stat(store._path(digest)).st_mode & 0o777) == 0o640
        cache = root / "cache"
        cache.mkdir()
        os.chown(cache, NOBODY, group)
        out = root / "answer.txt"
        out.touch()
        os.chown(out, NOBODY, group)
        files = {weights.name: digest}
        version = AdapterVersion(lora_int_id=1, tenant="acme", adapter="bot", version=1,
                                 content_sha256=sha256_tree(files), files=files, base_model_id="b",
                                 base_revision="r", template_id="t", size_bytes=18,
                                 created_at=datetime.now(UTC))
        answer = fetch_as(NOBODY, group, store, cache, version, out)
        assert "Traceback" not in answer, answer
        if served:
            assert answer == "served"
        else:
            assert answer.startswith("503 ") and "may not read the artifact store" in answer
            assert "readable by the gateway's user or group" in answer
    finally:
        shutil.rmtree(root, ignore_errors=True)
