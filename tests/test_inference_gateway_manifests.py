"""deploy/k8s/inference-gateway: the InferencePool, its endpoint picker, the Gateway and the HTTPRoute
hang together with each other and with deploy/k8s. The core kinds pass the Kubernetes schemas; the
CRD kinds (InferencePool, Gateway, HTTPRoute) are not in kubernetes-validate, so their structure is
checked here against the fields of inference.networking.k8s.io/v1 and gateway.networking.k8s.io/v1.
The picker's metric names are checked against what the server exports."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.config import Settings
from server.metrics import Metrics
from tests.test_deploy import K8S, K8S_OVERLAYS, K8S_VERSION, by_kind, listed_files, render

GATEWAY_DIR = K8S / "inference-gateway"
POOL_GROUP = "inference.networking.k8s.io"
GATEWAY_GROUP = "gateway.networking.k8s.io"
CRD_KINDS = {"InferencePool": f"{POOL_GROUP}/v1", "Gateway": f"{GATEWAY_GROUP}/v1", "HTTPRoute": f"{GATEWAY_GROUP}/v1"}
# What llm-d-router's endpoint picker (v0.10.0) reads when it is not configured otherwise.
PICKER_DEFAULT_METRICS = {
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
    "vllm:cache_config_info",
}
INFO_LABELS = {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
RULE_FIELDS = {"name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence"}
BACKEND_FIELDS = {"group", "kind", "name", "namespace", "port", "weight", "filters"}


@pytest.fixture(scope="module")
def resources() -> dict[str, dict]:
    """The inference-gateway manifests by kind; the picker's Service is the one that is not reft-server's."""
    rendered = render(GATEWAY_DIR)
    keys = [(r["kind"], r["metadata"]["name"]) for r in rendered]
    assert len(keys) == len(set(keys)), keys
    return by_kind(rendered)


def exported_families() -> dict:
    """The families /metrics has with the default settings, once the engine has stepped."""
    metrics = Metrics(max_lora=4, model_name="m", vllm_compatible=Settings().vllm_compatible_metrics)
    metrics.observe_load(waiting=0, running=1, kv_usage=0.1, kv_blocks=64, block_size=16)
    metrics.observe_adapters(["a"], [])
    return {family.name: family for family in text_string_to_metric_families(metrics.render().decode())}


def picker_config(resources) -> dict:
    return yaml.safe_load(resources["ConfigMap"]["data"]["config.yaml"])


def picker_args(resources) -> dict[str, str]:
    (container,) = resources["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])


def extractor_engine(resources) -> dict:
    (extractor,) = [p for p in picker_config(resources)["plugins"] if p["type"] == "core-metrics-extractor"]
    parameters = extractor["parameters"]
    (engine,) = [e for e in parameters["engineConfigs"] if e["name"] == parameters["defaultEngine"]]
    return engine


def test_kustomization_lists_exactly_the_manifests():
    present = {p.resolve() for p in GATEWAY_DIR.glob("*.y*ml") if p.name != "kustomization.yaml"}
    assert listed_files(GATEWAY_DIR) == present
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert "inference-gateway" not in base, "it needs CRDs the base install does not: applied on its own"


def test_core_kinds_validate_against_kubernetes_schemas():
    for resource in render(GATEWAY_DIR):
        if resource["kind"] in CRD_KINDS:
            assert resource["apiVersion"] == CRD_KINDS[resource["kind"]], resource["kind"]
            continue
        try:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


# -- the CRD kinds' structure --------------------------------------------------------------------------
def check_keys(node: dict, allowed: set[str], required: set[str], where: str) -> None:
    assert isinstance(node, dict), f"{where}: an object expected"
    assert set(node) <= allowed, f"{where}: unknown fields {set(node) - allowed}"
    assert required <= set(node), f"{where}: missing {required - set(node)}"


def check_port_number(port: dict, where: str) -> int:
    check_keys(port, {"number"}, {"number"}, where)
    assert isinstance(port["number"], int) and 1 <= port["number"] <= 65535, where
    return port["number"]


def test_inference_pool_has_the_v1_structure(resources):
    pool = resources["InferencePool"]
    check_keys(pool, {"apiVersion", "kind", "metadata", "spec"}, {"spec"}, "InferencePool")
    spec = pool["spec"]
    check_keys(
        spec, {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}, {"selector", "targetPorts"}, "spec"
    )
    check_keys(spec["selector"], {"matchLabels"}, {"matchLabels"}, "spec.selector")
    assert all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    numbers = [check_port_number(p, "spec.targetPorts[]") for p in spec["targetPorts"]]
    assert 1 <= len(numbers) <= 8 and len(set(numbers)) == len(numbers)
    assert spec.get("appProtocol", "http") in ("http", "kubernetes.io/h2c")
    ref = spec["endpointPickerRef"]
    check_keys(ref, {"group", "kind", "name", "port", "failureMode"}, {"name"}, "spec.endpointPickerRef")
    if ref.get("kind", "Service") == "Service":
        assert "port" in ref, "port is required when kind is Service"
        check_port_number(ref["port"], "spec.endpointPickerRef.port")
    assert ref.get("failureMode", "FailClose") in ("FailOpen", "FailClose")


def test_gateway_and_route_have_the_v1_structure(resources):
    gateway, route = resources["Gateway"], resources["HTTPRoute"]
    spec = gateway["spec"]
    check_keys(spec, {"gatewayClassName", "listeners", "addresses", "infrastructure"}, set(), "Gateway.spec")
    assert spec["gatewayClassName"] and spec["listeners"]
    listener_fields = {"name", "hostname", "port", "protocol", "tls", "allowedRoutes"}
    for listener in spec["listeners"]:
        check_keys(listener, listener_fields, {"name", "port", "protocol"}, "listener")
    check_keys(route["spec"], {"parentRefs", "hostnames", "rules"}, {"rules"}, "HTTPRoute.spec")
    for rule in route["spec"]["rules"]:
        check_keys(rule, RULE_FIELDS, set(), "rule")
        for match in rule["matches"]:
            check_keys(match["path"], {"type", "value"}, {"type", "value"}, "match.path")
            assert match["path"]["type"] in ("Exact", "PathPrefix", "RegularExpression")
        for backend in rule["backendRefs"]:
            check_keys(backend, BACKEND_FIELDS, {"name"}, "backendRef")
        for duration in rule.get("timeouts", {}).values():
            assert re.fullmatch(r"([0-9]{1,5}(h|m|s|ms)){1,4}", duration), duration


# -- cross-references ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", K8S_OVERLAYS, ids=lambda d: d.name)
def test_the_pool_selects_the_reft_server_pods_on_their_port(resources, overlay):
    server = by_kind([r for r in render(overlay) if r["kind"] in ("Deployment", "Service")])
    pod = server["Deployment"]["spec"]["template"]
    pool = resources["InferencePool"]["spec"]
    assert pool["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert [p["number"] for p in pool["targetPorts"]] == [p["containerPort"] for p in container["ports"]]
    assert pool.get("appProtocol", "http") == "http", "reft-server speaks HTTP/1.1"


def test_the_pool_reaches_its_endpoint_picker(resources):
    ref = resources["InferencePool"]["spec"]["endpointPickerRef"]
    service, deployment = resources["Service"], resources["Deployment"]
    assert ref.get("group", "") == "" and ref.get("kind", "Service") == "Service"
    assert ref["name"] == service["metadata"]["name"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert port["appProtocol"] == "kubernetes.io/h2c", "ext_proc is gRPC"
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named[port["targetPort"]] == int(picker_args(resources)["grpc-port"])


def test_the_picker_watches_this_pool_with_the_rights_it_needs(resources):
    args, pool = picker_args(resources), resources["InferencePool"]
    assert args["pool-name"] == pool["metadata"]["name"]
    assert args["pool-group"] == pool["apiVersion"].split("/")[0] == POOL_GROUP
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    namespace = {e["name"]: e for e in container["env"]}["NAMESPACE"]
    assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", "the pool is in its namespace"
    # the config file is the ConfigMap's key, mounted
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == resources["ConfigMap"]["metadata"]["name"]
    directory, _, key = args["config-file"].rpartition("/")
    assert directory == mount["mountPath"] and key in resources["ConfigMap"]["data"]
    # RBAC: the service account may read the pool and the pods
    account = resources["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    binding = resources["RoleBinding"]
    role = resources["Role"]["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role}
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    readable = [rule for rule in resources["Role"]["rules"] if {"get", "list", "watch"} <= set(rule["verbs"])]
    granted = {(group, kind) for rule in readable for group in rule["apiGroups"] for kind in rule["resources"]}
    assert {(POOL_GROUP, "inferencepools"), ("", "pods")} <= granted


def test_the_picker_reads_our_metric_names(resources):
    config = picker_config(resources)
    assert (config["apiVersion"], config["kind"]) == ("llm-d.ai/v1alpha1", "EndpointPickerConfig")
    engine = extractor_engine(resources)
    specs = {key: value for key, value in engine.items() if key.endswith("Spec") and value}
    assert set(specs) >= {"queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"}
    families = exported_families()
    for key, name in specs.items():
        assert name.startswith("reft_"), f"{key}: the native name, exported with or without vLLM's"
        assert families[name].type == "gauge", key
    assert specs["queuedRequestsSpec"] == "reft_queue_length" and specs["kvUsageSpec"] == "reft_kv_cache_usage_ratio"
    (lora,) = families[specs["loraSpec"]].samples
    assert set(lora.labels) == INFO_LABELS


def test_the_server_exports_what_the_picker_reads_by_default():
    """Without its engine config, the picker reads vLLM's names: exported by default too."""
    families = exported_families()
    assert PICKER_DEFAULT_METRICS <= set(families)
    (info,) = families["vllm:cache_config_info"].samples
    assert {"block_size", "num_gpu_blocks"} <= set(info.labels)


def test_the_picker_config_references_declared_plugins(resources):
    config = picker_config(resources)
    declared = {plugin.get("name", plugin["type"]) for plugin in config["plugins"]}
    referenced = [ref["pluginRef"] for profile in config["schedulingProfiles"] for ref in profile["plugins"]]
    referenced += [parser["pluginRef"] for parser in config["requestHandler"]["parsers"]]
    for source in config["dataLayer"]["sources"]:
        referenced += [source["pluginRef"]] + [e["pluginRef"] for e in source["extractors"]]
    assert set(referenced) <= declared, set(referenced) - declared
    assert "lora-affinity-scorer" in referenced, "adapter affinity is the point"
    (source,) = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"]["path"] == "/metrics"


def test_the_route_sends_openai_requests_to_the_pool(resources):
    route, gateway, pool = resources["HTTPRoute"], resources["Gateway"], resources["InferencePool"]
    (parent,) = route["spec"]["parentRefs"]
    assert (parent.get("group", GATEWAY_GROUP), parent.get("kind", "Gateway")) == (GATEWAY_GROUP, "Gateway")
    assert parent["name"] == gateway["metadata"]["name"]
    rules = route["spec"]["rules"]
    backends = [(b.get("group", ""), b.get("kind", "Service"), b, rule) for rule in rules for b in rule["backendRefs"]]

    def paths_to(group: str, kind: str, name: str) -> set[str]:
        (rule,) = [rule for g, k, b, rule in backends if (g, k, b["name"]) == (group, kind, name)]
        return {match["path"]["value"] for match in rule["matches"]}

    assert paths_to(POOL_GROUP, "InferencePool", pool["metadata"]["name"]) == {
        "/v1/completions",
        "/v1/chat/completions",
    }
    server = by_kind([r for r in render(K8S) if r["kind"] == "Service"])["Service"]
    assert paths_to("", "Service", server["metadata"]["name"]) == {"/v1/models", "/v1/generate"}
    (plain,) = [b for g, k, b, _ in backends if k == "Service" and b["name"] == server["metadata"]["name"]]
    assert plain["port"] in [p["port"] for p in server["spec"]["ports"]]
    request_timeout = Settings().request_timeout
    for rule in route["spec"]["rules"]:
        assert int(rule["timeouts"]["request"].removesuffix("s")) > request_timeout, "the server's 504 comes first"
