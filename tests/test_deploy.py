"""Tests for the Dockerfile and deploy/kubernetes: read statically, checked against the code.

Neither Docker nor Kubernetes runs here, so these tests parse the files and hold them to the
facts they depend on: the HTTP routes (http.py), the config loader (a ConfigMap's config must
load, with its secret files), the shard syntax, and each other (port, user, config path).
"""

from __future__ import annotations

import fnmatch
import json
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from deribit_keeper.config import DEFAULT_CONFIG_PATH, KeeperConfig, parse_config
from deribit_keeper.http import HEALTH_PATH, READY_PATH
from deribit_keeper.shard import Shard, select

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KEEPER_IMAGE = "/deribit-keeper:"  # how the keeper's container is recognised in a manifest
Doc = dict[str, Any]


# ---- Kubernetes ------------------------------------------------------------------------------


def documents(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def only(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def workload(docs: list[Doc]) -> Doc:
    (found,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    return found


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = workload(docs)["spec"]["template"]["spec"]
    return spec


def containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def keeper(spec: Doc) -> Doc:
    (found,) = [c for c in containers(spec) if KEEPER_IMAGE in c["image"]]
    return found


def env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def security(spec: Doc, container: Doc) -> Doc:
    """The effective security context: the container's settings over the pod's."""
    return {**spec.get("securityContext", {}), **container.get("securityContext", {})}


def probes(container: Doc) -> dict[str, Doc]:
    kinds = ("livenessProbe", "readinessProbe", "startupProbe")
    return {kind: container[kind]["httpGet"] for kind in kinds if kind in container}


def container_port(container: Doc, port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    for each in container["ports"]:
        if port in (each["containerPort"], each.get("name")):
            value: int = each["containerPort"]
            return value
    raise AssertionError(f"port {port!r} is not a port of container {container['name']}")


def volume_for(spec: Doc, container: Doc, kind: str) -> tuple[Doc, Doc]:
    """The (volume, mount) of the one ``kind`` (configMap, secret) volume ``container`` mounts."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    (pair,) = [
        (volumes[m["name"]], m) for m in container["volumeMounts"] if kind in volumes[m["name"]]
    ]
    return pair


def keeper_config(docs: list[Doc], credentials: Path) -> KeeperConfig:
    """The ConfigMap's config, loaded as the keeper would, with the Secret's keys as files."""
    spec = pod_spec(docs)
    volume, mount = volume_for(spec, keeper(spec), "configMap")
    config_map = only(docs, "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    path = PurePosixPath(env(keeper(spec))["DERIBIT_KEEPER_CONFIG"]["value"])
    assert str(path.parent) == mount["mountPath"]
    for key in only(docs, "Secret")["stringData"]:
        (credentials / key).write_text("not-a-real-secret\n", encoding="utf-8")
    return parse_config(
        config_map["data"][path.name],
        source=Path(str(path)),
        environ={"CREDENTIALS_DIRECTORY": str(credentials)},
    )


manifests = pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)


def test_both_examples_exist() -> None:
    """The sidecar and the StatefulSet example are both there to be checked."""
    assert {p.name for p in MANIFESTS} == {"sidecar.yaml", "statefulset.yaml"}


@manifests
def test_every_document_parses_and_is_named(path: Path) -> None:
    """Every document is a named Kubernetes object."""
    for doc in documents(path):
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]


@manifests
def test_probes_use_the_keeper_routes(path: Path) -> None:
    """Liveness asks /healthz (the loop runs); readiness and startup /readyz (sessions ready)."""
    found = probes(keeper(pod_spec(documents(path))))
    assert found["livenessProbe"]["path"] == HEALTH_PATH
    assert found["readinessProbe"]["path"] == READY_PATH
    assert found.get("startupProbe", {"path": READY_PATH})["path"] == READY_PATH


@manifests
def test_probe_ports_match_container_and_config(path: Path, tmp_path: Path) -> None:
    """Every probe hits the container port the config's http.listen serves, on all interfaces."""
    docs = documents(path)
    config = keeper_config(docs, tmp_path)
    assert config.http is not None
    assert config.http.host in ("0.0.0.0", "::"), "the kubelet probes the pod IP, not loopback"
    container = keeper(pod_spec(docs))
    assert [p["containerPort"] for p in container["ports"]] == [config.http.port]
    for get in probes(container).values():
        assert container_port(container, get["port"]) == config.http.port


@manifests
def test_secrets_are_read_only_files_in_the_credentials_directory(
    path: Path, tmp_path: Path
) -> None:
    """The Secret is mounted read-only, 0400, where $CREDENTIALS_DIRECTORY points, readably."""
    docs = documents(path)
    spec = pod_spec(docs)
    container = keeper(spec)
    volume, mount = volume_for(spec, container, "secret")
    assert volume["secret"]["secretName"] == only(docs, "Secret")["metadata"]["name"]
    assert volume["secret"]["defaultMode"] == 0o400
    assert mount["readOnly"] is True
    assert env(container)["CREDENTIALS_DIRECTORY"]["value"] == mount["mountPath"]
    # Secret files are root's; a non-root keeper reads 0400 files only through fsGroup.
    assert security(spec, container)["fsGroup"] == security(spec, container)["runAsGroup"]
    for account in keeper_config(docs, tmp_path).accounts:
        assert account.secret_source.startswith(f"file {tmp_path}/"), account.name


@manifests
def test_grace_period_covers_the_keeper_shutdown(path: Path) -> None:
    """The pod's grace period leaves room for the keeper's 5 s shutdown."""
    assert pod_spec(documents(path))["terminationGracePeriodSeconds"] >= 10


@manifests
def test_containers_are_locked_down_and_sized(path: Path) -> None:
    """Every container: non-root, read-only root, no privilege escalation or capabilities,
    seccomp RuntimeDefault, and CPU and memory requests and limits."""
    spec = pod_spec(documents(path))
    assert spec["automountServiceAccountToken"] is False
    for container in containers(spec):
        context = security(spec, container)
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] != 0
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) == {"cpu", "memory"}, container["name"]


def test_keeper_is_a_native_sidecar_gating_the_engine() -> None:
    """In the sidecar example the keeper is an always-restarted init container with a startup
    probe, so it starts before the engine and stops after it."""
    spec = pod_spec(documents(ROOT / "deploy" / "kubernetes" / "sidecar.yaml"))
    (sidecar,) = spec["initContainers"]
    assert sidecar is keeper(spec)
    assert sidecar["restartPolicy"] == "Always"
    assert "startupProbe" in sidecar
    assert [c["name"] for c in spec["containers"]] == ["engine"]


def test_shard_count_equals_replicas_and_partitions_the_accounts(tmp_path: Path) -> None:
    """DERIBIT_KEEPER_SHARD is "$(POD_INDEX)/replicas" with POD_INDEX from the pod-index label,
    and the replicas' shards together hold every configured account once."""
    docs = documents(ROOT / "deploy" / "kubernetes" / "statefulset.yaml")
    replicas = workload(docs)["spec"]["replicas"]
    variables = env(keeper(pod_spec(docs)))
    names = list(variables)
    # $(VAR) expands only from variables defined earlier in the list.
    assert names.index("POD_INDEX") < names.index("DERIBIT_KEEPER_SHARD")
    label = variables["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert label == "metadata.labels['apps.kubernetes.io/pod-index']"
    index, _, count = variables["DERIBIT_KEEPER_SHARD"]["value"].partition("/")
    assert (index, int(count)) == ("$(POD_INDEX)", replicas)
    accounts = keeper_config(docs, tmp_path).accounts
    held = [a.name for i in range(replicas) for a in select(accounts, Shard(i, replicas))]
    assert sorted(held) == sorted(a.name for a in accounts)


def test_headless_service_and_budget_select_the_keepers() -> None:
    """The StatefulSet's headless Service and its PodDisruptionBudget select its pods, and the
    Service targets the keeper's port."""
    docs = documents(ROOT / "deploy" / "kubernetes" / "statefulset.yaml")
    stateful_set, service = workload(docs), only(docs, "Service")
    labels = stateful_set["spec"]["template"]["metadata"]["labels"]
    assert stateful_set["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert container_port(keeper(pod_spec(docs)), port["targetPort"]) == port["port"]
    budget = only(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


# ---- Dockerfile ------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined and comments dropped; the
    first list holds what comes before the first FROM."""
    stages: list[list[tuple[str, str]]] = [[]]
    pending = ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("#") or not text:
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, args = (pending + text).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends in a line continuation"
    return stages


def final(keyword: str) -> list[str]:
    return [args for k, args in dockerfile_stages()[-1] if k == keyword]


def final_env() -> dict[str, str]:
    return dict(token.split("=", 1) for args in final("ENV") for token in shlex.split(args))


def test_dockerfile_runs_the_keeper_stopped_by_sigterm() -> None:
    """The image's entry point is ``deribit-keeper run`` (exec form) and it stops on SIGTERM."""
    assert [json.loads(args) for args in final("ENTRYPOINT")] == [["deribit-keeper", "run"]]
    assert final("STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_healthcheck_probes_the_health_route() -> None:
    """HEALTHCHECK runs ``deribit-keeper probe`` on loopback /healthz at the EXPOSEd port."""
    (healthcheck,) = final("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "--timeout=" in options and "--interval=" in options
    program, subcommand, url = json.loads(command)
    assert (program, subcommand) == ("deribit-keeper", "probe")
    parts = urlsplit(url)
    (exposed,) = final("EXPOSE")
    assert (parts.scheme, parts.hostname, parts.path) == ("http", "127.0.0.1", HEALTH_PATH)
    assert str(parts.port) == exposed


def test_dockerfile_runs_as_the_manifests_non_root_user() -> None:
    """The final stage runs as a fixed non-root UID, the one the manifests run the keeper as,
    with the default config path and unbuffered, bytecode-free Python."""
    (user,) = final("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit()
    for path in MANIFESTS:
        spec = pod_spec(documents(path))
        context = security(spec, keeper(spec))
        assert (context["runAsUser"], context["fsGroup"]) == (int(uid), int(gid)), path.name
    variables = final_env()
    assert variables["DERIBIT_KEEPER_CONFIG"] == str(DEFAULT_CONFIG_PATH)
    assert variables["PYTHONDONTWRITEBYTECODE"] == variables["PYTHONUNBUFFERED"] == "1"
    (exposed,) = final("EXPOSE")
    for path in MANIFESTS:
        assert keeper(pod_spec(documents(path)))["ports"][0]["containerPort"] == int(exposed)


def test_dockerfile_final_stage_has_no_build_tools() -> None:
    """The final stage installs nothing, removes pip, and copies only the built virtualenv."""
    stage = dockerfile_stages()[-1]
    runs = " ".join(args for k, args in stage if k == "RUN")
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "pip install", "make "):
        assert tool not in runs, tool
    assert "pip uninstall --yes --quiet pip" in runs
    copies = [args.split() for k, args in stage if k in ("COPY", "ADD")]
    assert copies == [["--from=builder", "/opt/deribit-keeper", "/opt/deribit-keeper"]]


def test_dockerfile_stages_share_one_pinned_base() -> None:
    """Builder and final stage use the same tagged slim Python, as the copied venv requires."""
    preamble, *stages = dockerfile_stages()
    bases = {args.split()[0] for stage in stages for k, args in stage if k == "FROM"}
    assert bases == {"${PYTHON_IMAGE}"}
    (default,) = [a.split("=", 1)[1] for k, a in preamble if a.startswith("PYTHON_IMAGE=")]
    image, _, tag = default.partition(":")
    assert image == "python" and tag.startswith("3.11-slim") and "latest" not in tag


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, closely enough for these patterns: the last pattern matching the path or
    one of its parent directories decides; ``!`` re-includes."""
    parents = [str(p) for p in reversed(PurePosixPath(path).parents) if str(p) != "."]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(p, glob) for p in [*parents, path]):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_the_build_inputs() -> None:
    """The build context holds what the builder COPYs, and no .git, .venv, caches or tests."""
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [t for t in (line.strip() for line in lines) if t and not t.startswith("#")]
    builder = dockerfile_stages()[1]
    sources = [s for k, a in builder if k == "COPY" for s in a.split()[:-1]]
    assert sources == ["pyproject.toml", "README.md", "daemon"]
    for kept in ("pyproject.toml", "README.md", "daemon/deribit_keeper/cli.py"):
        assert not dockerignored(kept, patterns), kept
    for dropped in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_cli.py",
        ".mypy_cache/3.11/x.json",
        ".hypothesis/examples/x",
        "daemon/deribit_keeper/__pycache__/cli.cpython-311.pyc",
        "daemon/deribit_keeper.egg-info/PKG-INFO",
        "config/example.yaml",
    ):
        assert dockerignored(dropped, patterns), dropped
