"""The Dockerfiles (parsed with Docker's own parser; nothing is built here) stay in step
with the package, ./dev and the chart that runs them."""

from __future__ import annotations

import re
import tomllib

import dockerfile
import pytest

from tests.helm.chart import CHART, REPO, profile

DOCKER = REPO / "docker"


def _commands(flavor: str) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKER / f"Dockerfile.{flavor}")))


def _final_stage(commands: list[dockerfile.Command]) -> list[dockerfile.Command]:
    starts = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    assert len(starts) >= 2, "multi-stage: build tools stay out of the image"
    return commands[starts[-1]:]


@pytest.mark.parametrize(("flavor", "extra"), [("gpu", "gpu"), ("cpu", "cpu")])
def test_image_installs_the_package_with_its_engine(flavor: str, extra: str) -> None:
    runs = " ".join(c.value[0] for c in _commands(flavor) if c.cmd == "RUN")
    assert f'pip install ".[{extra},postgres,s3,redis]"' in runs
    copied = {c.value[0] for c in _commands(flavor) if c.cmd == "COPY" and not c.flags}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"packages the image would miss: {sorted(packages - copied)}"


@pytest.mark.parametrize("flavor", ["gpu", "cpu"])
def test_image_runs_lora_gateway_as_the_charts_non_root_user(flavor: str) -> None:
    final = _final_stage(_commands(flavor))
    (user,) = [c.value[0] for c in final if c.cmd == "USER"]
    uid, _, gid = user.partition(":")
    pod = profile("values.yaml")["podSecurityContext"]
    assert (int(uid), int(gid)) == (pod["runAsUser"], pod["runAsGroup"]) and int(uid) != 0
    assert [c.value for c in final if c.cmd == "ENTRYPOINT"] == [("lora-gateway",)]
    env = dict(zip(*[iter(v for c in final if c.cmd == "ENV" for v in c.value)] * 2, strict=True))
    assert env["HOME"] == "/tmp"  # the chart's read-only root leaves /tmp writable


@pytest.mark.parametrize("flavor", ["gpu", "cpu"])
def test_chart_default_image_is_the_one_the_dockerfile_builds(flavor: str) -> None:
    chart = (CHART / "Chart.yaml").read_text()
    app_version = re.search(r'^appVersion: "([^"]+)"', chart, re.M)
    assert app_version
    repository = profile("values.yaml")["image"]["repository"]
    text = (DOCKER / f"Dockerfile.{flavor}").read_text()
    assert f"-t {repository}:{app_version[1]}-{flavor} ." in text


def test_cpu_image_pins_the_torch_build_dev_installs() -> None:
    dev = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", (REPO / "dev").read_text())
    assert dev
    args = [c.value[0] for c in _commands("cpu") if c.cmd == "ARG"]
    assert f"TORCH_SPEC={dev[1]}" in args
