"""Every deployment manifest parses, and every command in them names a real job and a real config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from vtplatform.config import load_config

CLUSTER = ROOT / "cluster"
MANIFESTS = sorted(CLUSTER.rglob("*.yaml"))


def _documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _entrypoints(path: Path) -> list[str]:
    """Job commands: RayJob entrypoints (also inside ConfigMaps), and `python jobs/...` in comments."""
    found = []
    for doc in _documents(path):
        for node in _walk(doc):
            if isinstance(node, dict) and "entrypoint" in node:
                found.append(node["entrypoint"])
            if isinstance(node, str) and "kind: RayJob" in node:  # a RayJob embedded in a ConfigMap
                found += _entrypoints_from_text(node)
    found += [m.group(1) for m in re.finditer(r"^#.*?(python jobs/\S+.*)$", path.read_text(), re.M)]
    return found


def _entrypoints_from_text(text: str) -> list[str]:
    return [
        n["entrypoint"]
        for d in yaml.safe_load_all(text)
        if d
        for n in _walk(d)
        if isinstance(n, dict) and "entrypoint" in n
    ]


def _check_command(command: str) -> None:
    """The script is a real job, every flag is one it takes, and its config loads with its overrides."""
    args = shlex.split(command.split("python", 1)[1])
    script = ROOT / args[0]
    assert script.is_file() and script.parent.name == "jobs", f"{command!r} does not name a jobs/ script"
    known = script.read_text() + (ROOT / "vtplatform" / "cli.py").read_text()
    config, overrides = None, []
    for i, arg in enumerate(args[1:], start=1):
        if arg == "-o":
            overrides.append(args[i + 1])
        elif arg.startswith("--"):
            flag, _, value = arg.partition("=")
            assert f'"{flag}"' in known, f"{command!r}: {script.name} takes no {flag}"
            if flag == "--config":
                config = value or args[i + 1]
    if config is not None:
        assert (ROOT / config).is_file(), f"{command!r} names a missing config"
        load_config(ROOT / config, overrides)  # it loads, and every override names a real key


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(ROOT)) for p in MANIFESTS])
def test_manifest_parses_and_names_real_jobs_and_configs(path):
    docs = _documents(path)
    assert docs, f"{path} is empty"
    for command in _entrypoints(path):
        _check_command(command)


def test_kuberay_objects():
    kinds = {d["kind"]: d for p in (CLUSTER / "kuberay").glob("*.yaml") for d in _documents(p)}
    assert {"RayCluster", "RayJob", "CronJob"} <= set(kinds)
    cluster = kinds["RayCluster"]["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no tasks
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and cluster["enableInTreeAutoscaling"]
    jobs = [d for p in (CLUSTER / "kuberay").glob("rayjob-*.yaml") for d in _documents(p)]
    assert {Path(shlex.split(j["spec"]["entrypoint"])[1]).name for j in jobs} == {"extract.py", "tag.py"}
    assert all(j["spec"]["clusterSelector"]["ray.io/cluster"] == kinds["RayCluster"]["metadata"]["name"] for j in jobs)
    cron = kinds["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and len(cron["schedule"].split()) == 5


def test_aws_launcher():
    (aws,) = _documents(CLUSTER / "aws.yaml")
    types = aws["available_node_types"]
    assert types[aws["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"cpu_decode", "gpu"} <= set(types) and types["gpu"]["max_workers"] > types["gpu"]["min_workers"]
    assert any("--num-cpus=0" in c for c in aws["head_start_ray_commands"])


def test_runtime_env_and_dockerfile():
    (env,) = _documents(CLUSTER / "runtime_env.yaml")
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for item in src.split():
            assert (ROOT / item).exists(), f"Dockerfile copies a missing {item}"
    assert "paddlepaddle-gpu" in dockerfile and "pip install -e ." in dockerfile and "ffmpeg" in dockerfile


def test_readme_commands_name_real_jobs_and_configs():
    commands = re.findall(r"(python jobs/[^\n`|]+)", (ROOT / "README.md").read_text())
    assert len(commands) >= 8
    for command in commands:
        command = command.split("#")[0].replace("...", "").replace("[", " ").replace("]", " ").replace("\\", " ")
        script = ROOT / shlex.split(command)[1]
        assert script.is_file(), command
        config = re.search(r"--config[ =](\S+)", command)
        if config and not config.group(1).isupper():
            assert (ROOT / config.group(1)).is_file(), command
