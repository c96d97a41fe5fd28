"""deploy/k8s/inference: the model-aware routing overlay (Gateway API Inference Extension).

Built-in kinds are validated as tests/test_deploy.py validates the base (kubernetes-validate,
strict); InferencePool, Gateway and HTTPRoute against their CRDs' OpenAPI schemas, made strict
the same way (an unknown field is an error), from tests/data/crds/: the `openAPIV3Schema` of
one version of each CRD with its descriptions dropped, taken from
kubernetes-sigs/gateway-api-inference-extension v1.5.0 (InferencePool v1) and
kubernetes-sigs/gateway-api v1.4.1 (standard channel: Gateway and HTTPRoute v1), both
Apache-2.0; each file names its source.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.metrics import Metrics
from server.settings import Settings
from tests.test_deploy import K8S, K8S_VERSION

OVERLAY = K8S / "inference"
CRDS = Path(__file__).parent / "data" / "crds"
# What the endpoint picker reads from each pod by default (its "vllm" engine): ggserve serves
# them with GGSERVE_METRICS_VLLM_NAMES.
PICKER_DEFAULTS = ("vllm:num_requests_waiting", "vllm:num_requests_running",
                   "vllm:kv_cache_usage_perc", "vllm:lora_requests_info")


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((OVERLAY / name).read_text()) if d]


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())  # type: ignore[no-any-return]


def _files() -> list[str]:
    return [r for r in _kustomization()["resources"] if r != "../"]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for f in _files() for d in _docs(f)
                if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def _strict(schema: Any) -> Any:
    """`schema` with unknown fields rejected wherever it lists an object's properties, as the
    API server's strict field validation does."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and \
            not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


def _crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators = {}
    for path in sorted(CRDS.glob("*.json")):
        crd = json.loads(path.read_text())
        key = (f"{crd['group']}/{crd['version']}", crd["kind"])
        validators[key] = jsonschema.Draft7Validator(_strict(crd["schema"]))
    return validators


def _validate(resource: dict[str, Any]) -> None:
    validator = _crd_validators().get((resource["apiVersion"], resource["kind"]))
    if validator is None:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        return
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(resource)]
    assert errors == [], resource["kind"]


def test_kustomization_lists_every_manifest_on_the_base() -> None:
    assert _kustomization()["resources"][0] == "../"
    assert sorted(_files()) == sorted(p.name for p in OVERLAY.glob("*.yaml")
                                      if p.name != "kustomization.yaml")
    assert _kustomization()["namespace"] == yaml.safe_load(
        (K8S / "kustomization.yaml").read_text())["namespace"]


@pytest.mark.parametrize("name", _files())
def test_manifest_is_valid(name: str) -> None:
    for resource in _docs(name):
        _validate(resource)


def test_crd_validation_is_strict() -> None:
    pool = _one("InferencePool")
    _validate(pool)
    for broken in ({"targetPort": 8000}, {"targetPorts": [{"number": "8000"}]},
                   {"targetPorts": []}, {"endpointPickerRef": {"port": {"number": 9002}}}):
        wrong = copy.deepcopy(pool)
        wrong["spec"] |= broken
        with pytest.raises(AssertionError):
            _validate(wrong)
    route = copy.deepcopy(_one("HTTPRoute"))
    route["spec"]["rules"][0]["timeout"] = "1s"
    with pytest.raises(AssertionError):
        _validate(route)


def _patched_deployment() -> dict[str, Any]:
    """The base Deployment with the overlay's JSON patches applied (only `add` is used)."""
    deployment: dict[str, Any] = yaml.safe_load((K8S / "deployment.yaml").read_text())
    for patch in _kustomization()["patches"]:
        assert patch["target"] == {"kind": "Deployment", "name": deployment["metadata"]["name"]}
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] == "add"
            *parents, last = op["path"].strip("/").split("/")
            node: Any = deployment
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            if last == "-":
                node.append(op["value"])
            else:
                node[last] = op["value"]
    return deployment


def test_the_model_servers_export_what_the_picker_reads() -> None:
    deployment = _patched_deployment()
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    env = {e["name"]: e.get("value") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    setting = "GGSERVE_METRICS_VLLM_NAMES"
    assert setting.removeprefix("GGSERVE_").lower() in Settings.model_fields
    vllm_names = Settings(metrics_vllm_names=env[setting]).metrics_vllm_names  # type: ignore[arg-type]
    exported = {m.name: m.type for m in Metrics(vllm_names=vllm_names).registry.collect()}
    assert {name: exported.get(name) for name in PICKER_DEFAULTS} == dict.fromkeys(
        PICKER_DEFAULTS, "gauge")
    assert "GGSERVE_METRICS_REQUIRE_KEY" not in env  # the picker scrapes /metrics without a key


def test_pool_selects_the_model_servers_only() -> None:
    pool = _one("InferencePool")["spec"]
    server = yaml.safe_load((K8S / "deployment.yaml").read_text())["spec"]["template"]
    picker = _one("Deployment", "ggserve-epp")["spec"]["template"]
    selector = pool["selector"]["matchLabels"].items()
    assert selector <= server["metadata"]["labels"].items()
    assert not selector <= picker["metadata"]["labels"].items()
    ports = [p["containerPort"] for p in server["spec"]["containers"][0]["ports"]]
    assert [p["number"] for p in pool["targetPorts"]] == ports  # the API and /metrics


def test_pool_and_picker_name_each_other() -> None:
    pool = _one("InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    service = _one("Service", ref["name"])
    picker = _one("Deployment", ref["name"])["spec"]["template"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    container = picker["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named[port["targetPort"]] == port["port"] == 9002  # the ext-proc gRPC port
    assert service["spec"]["selector"].items() <= picker["metadata"]["labels"].items()
    args = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])
    assert args["pool-name"] == pool["metadata"]["name"]
    assert args["pool-group"] == pool["apiVersion"].split("/")[0]
    assert "NAMESPACE" in {e["name"] for e in container["env"]}  # the pool's namespace
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in picker["spec"]["volumes"]}
    config_dir, _, config_file = args["config-file"].rpartition("/")
    (volume,) = [name for name, path in mount.items() if path == config_dir]
    config_map = _one("ConfigMap", volumes[volume]["configMap"]["name"])
    assert config_file in config_map["data"]


def test_picker_config_uses_only_plugins_it_declares() -> None:
    data = _one("ConfigMap", "ggserve-epp")["data"]
    config = yaml.safe_load(next(iter(data.values())))
    assert (config["apiVersion"], config["kind"]) == (
        "inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    used = {p["pluginRef"] for profile in config["schedulingProfiles"]
            for p in profile["plugins"]}
    assert used <= declared
    assert {"queue-scorer", "kv-cache-utilization-scorer"} <= used  # the load it routes on
    (source,) = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"]["path"] == "/metrics"


def test_picker_may_read_what_it_watches() -> None:
    role = _one("Role")
    granted = {(group, resource) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] if "watch" in rule["verbs"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted
    binding = _one("RoleBinding")
    account = _one("ServiceAccount")["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    picker = _one("Deployment", "ggserve-epp")["spec"]["template"]["spec"]
    assert picker["serviceAccountName"] == account


def test_route_sends_the_api_through_the_gateway_to_the_pool() -> None:
    route = _one("HTTPRoute")["spec"]
    gateway = _one("Gateway")
    assert [(p["kind"], p["name"]) for p in route["parentRefs"]] == [
        ("Gateway", gateway["metadata"]["name"])]
    pool = _one("InferencePool")
    (rule,) = route["rules"]
    assert rule["backendRefs"] == [{"group": pool["apiVersion"].split("/")[0],
                                    "kind": "InferencePool", "name": pool["metadata"]["name"]}]
    timeout_s = int(rule["timeouts"]["request"].removesuffix("s"))
    assert timeout_s >= Settings.model_fields["request_timeout_s"].default
