"""The Helm chart (deploy/helm/kvtriton), rendered by the real helm binary (`helm template`, `helm lint`), every
object checked against the Kubernetes API schemas (kubernetes-validate), and what it runs checked against what
`kvtriton serve`, `kvtriton build` and `kvtriton health` accept. What only a cluster shows (scheduling on a GPU
node, the probes answering, Prometheus and its adapter feeding the autoscaler) is not tested here: README,
Kubernetes (Helm).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvtriton.backend.entrypoints.serve import build_parser
from kvtriton.build import cli as build_cli
from kvtriton.client import health_cmd

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/kvtriton"
ADAPTER_VALUES = ROOT / "deploy/helm/prometheus-adapter-values.yaml"
RELEASE, NAMESPACE = "kv", "serving"
# The oldest and the newest schemas kubernetes-validate ships (the chart asks for >= 1.23).
KUBERNETES_VERSIONS = ("1.25", "latest")

EVERYTHING = {"metrics.serviceMonitor.enabled": "true", "autoscaling.enabled": "true",
              "adminKey.existingSecret": "kvtriton-admin", "apiKey.existingSecret": "kvtriton-api",
              "cache.existingClaim": "kvtriton-cache",
              "probes.liveness.modelRequest": "true", "gpu.count": "2", "serve.toolCallParser": "hermes",
              "serve.reasoningParser": "deepseek_r1", "serve.model": "/cache/Llama-3.2-1B-Instruct-Q4_K_M.gguf",
              "serve.engineArgs.scheduling_policy": "priority", "serve.engineArgs.max_num_seqs": "32"}
SCENARIOS = {
    "defaults": {},
    "cpu only": {"gpu.count": "0"},
    "repository on a PVC": {"modelRepository.source": "pvc", "modelRepository.pvc.claimName": "models",
                            "modelRepository.pvc.subPath": "repo"},
    "repository built by an init container": {"modelRepository.source": "build"},
    "every option on": EVERYTHING,
    "no OpenAI API": {"serve.openaiPort": "null"},
}


def _helm() -> str:
    found = shutil.which("helm") or str(Path(sys.executable).parent / "helm")
    if not Path(found).is_file():
        pytest.skip("helm not installed: ./scripts/setup.sh puts it into .venv/bin (scripts/install_helm.py)")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([_helm(), *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done


def _set_args(values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def render(values: dict[str, str] | None = None) -> list[dict]:
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *_set_args(values or {})).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def container(objects: list[dict]) -> dict:
    (triton,) = pod_spec(objects)["containers"]
    return triton


def serve_args(triton: dict) -> argparse.Namespace:
    assert triton["command"][:2] == ["kvtriton", "serve"], triton["command"]
    return build_parser().parse_args(triton["command"][2:])  # SystemExit on anything serve does not accept


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(values) for name, values in SCENARIOS.items()}


def test_helm_lint_passes_strict():
    for values in SCENARIOS.values():
        done = helm("lint", "--strict", str(CHART), *_set_args(values))
        assert "0 chart(s) failed" in done.stdout, done.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(rendered, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    kinds = set()
    for scenario, objects in rendered.items():
        for obj in objects:
            kinds.add(obj["kind"])
            if obj["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: no schema in kubernetes-validate; its shape is checked below
            try:
                kubernetes_validate.validate(obj, version, strict=True)  # strict: unknown fields are errors
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{scenario}: {obj['kind']} {obj['metadata']['name']} against Kubernetes "
                                     f"{version}: {exc.message} at {list(exc.path)}") from None
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor"}


def test_the_container_runs_kvtriton_serve_on_the_ports_the_service_exposes(rendered):
    for scenario, objects in rendered.items():
        triton = container(objects)
        args = serve_args(triton)
        assert args.host == "0.0.0.0", scenario  # the Service must reach it
        assert str(args.model_repository) == "/models"
        ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
        openai = {} if args.openai_port is None else {"openai": args.openai_port}
        assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port, **openai}
        assert (args.openai_port is None) == (scenario == "no OpenAI API")
        assert args.tool_call_parser == ("hermes" if scenario == "every option on" else None)
        assert args.reasoning_parser == ("deepseek_r1" if scenario == "every option on" else None)
        everything = scenario == "every option on"
        assert args.model == ("/cache/Llama-3.2-1B-Instruct-Q4_K_M.gguf" if everything else None)
        assert sorted(args.engine_args) == (["max_num_seqs=32", "scheduling_policy=priority"] if everything else [])
        service = one(objects, "Service")
        assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
            name: (port, name) for name, port in ports.items()}
        pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()


def test_the_chart_serves_what_compose_serves(rendered):
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["triton"]
    compose_args = build_parser().parse_args(compose["command"][2:])
    args = serve_args(container(rendered["defaults"]))
    for option in ("http_port", "grpc_port", "metrics_port", "openai_port", "host", "model_repository"):
        assert getattr(args, option) == getattr(compose_args, option), option
    assert container(rendered["defaults"])["image"] == compose["image"]


def test_probes_use_tritons_health_endpoints(rendered):
    triton = container(rendered["defaults"])
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert triton[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # The first start converts the default model: the startup probe allows minutes, not seconds.
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_model_request_liveness_is_a_valid_kvtriton_health_call_within_the_probe_timeout(rendered):
    triton = container(rendered["every option on"])
    liveness = triton["livenessProbe"]
    command = liveness["exec"]["command"]
    assert command[:2] == ["kvtriton", "health"]
    parser = argparse.ArgumentParser()
    health_cmd.add_arguments(parser)
    args = parser.parse_args(command[2:])
    assert args.url == f"127.0.0.1:{serve_args(triton).grpc_port}"  # gRPC, inside the pod
    assert 0 < args.timeout < liveness["timeoutSeconds"]


def test_gpus_are_requested_as_limits_and_none_on_cpu(rendered):
    assert container(rendered["defaults"])["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container(rendered["every option on"])["resources"]["limits"]["nvidia.com/gpu"] == 2
    cpu = container(rendered["cpu only"])["resources"]
    assert "nvidia.com/gpu" not in cpu.get("limits", {}) and "nvidia.com/gpu" not in cpu.get("requests", {})


def test_dev_shm_is_a_memory_backed_empty_dir_with_a_size_limit(rendered):
    for scenario, objects in rendered.items():
        volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"] == "2Gi", scenario  # compose: shm_size 2gb


def test_model_repository_sources(rendered):
    # image: the repository baked into the image, nothing mounted over it
    assert "/models" not in {m["mountPath"] for m in container(rendered["defaults"])["volumeMounts"]}
    assert "initContainers" not in pod_spec(rendered["defaults"])

    # pvc: the claim, read-only, at the repository path
    objects = rendered["repository on a PVC"]
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    (mount,) = [m for m in container(objects)["volumeMounts"] if m["mountPath"] == "/models"]
    assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert mount["readOnly"] is True and mount["subPath"] == "repo"

    # build: `kvtriton build` writes into a per-pod emptyDir that tritonserver then serves, at the same path
    # (built repositories hold absolute paths); the builder shares the checkpoint cache and the GPU request
    objects = rendered["repository built by an init container"]
    (builder,) = pod_spec(objects)["initContainers"]
    assert builder["command"][:2] == ["kvtriton", "build"]
    parser = argparse.ArgumentParser()
    build_cli.add_arguments(parser)
    build_args = parser.parse_args(builder["command"][2:])
    assert (build_args.out, build_args.name) == ("/models", "llm")
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    builder_mounts = {m["mountPath"]: m["name"] for m in builder["volumeMounts"]}
    serve_mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
    assert builder_mounts["/models"] == serve_mounts["/models"] and volumes[serve_mounts["/models"]]["emptyDir"] == {}
    assert builder_mounts["/cache"] == serve_mounts["/cache"]
    assert builder["image"] == container(objects)["image"]
    assert builder["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in builder["env"]}
    assert env["KVTRITON_CACHE"] == "/cache"


def test_admin_and_api_keys_come_from_secrets(rendered):
    env = {e["name"]: e for e in container(rendered["every option on"])["env"]}
    assert env["KVTRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "kvtriton-admin", "key": "admin-key"}
    assert env["KVTRITON_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "kvtriton-api", "key": "api-key"}
    assert not {"KVTRITON_ADMIN_KEY", "KVTRITON_API_KEY"} & {e["name"] for e in container(rendered["defaults"])["env"]}


class _MetricFamilies:
    """pb_utils.MetricFamily's constructor, recording the names TritonMetrics registers."""

    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    names: list[str] = []

    def __init__(self, name: str, description: str, kind: str):
        self.names.append(name)

    def Metric(self, labels, buckets=None):
        return self


def test_metrics_are_scraped_and_the_autoscaler_reads_a_metric_the_server_exports(rendered):
    from kvtriton.backend.triton.metrics import TritonMetrics

    TritonMetrics(type("pb_utils", (), {"MetricFamily": _MetricFamilies}), {"model": "llm", "version": "1"})
    exported = set(_MetricFamilies.names)

    objects = rendered["defaults"]
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == serve_args(container(objects)).metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"

    objects = rendered["every option on"]
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"

    hpa = one(objects, "HorizontalPodAutoscaler")
    deployment = one(objects, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert metric["pods"]["metric"]["name"] == "kvtriton_num_requests_waiting" in exported

    # The Prometheus adapter's rule (deploy/helm/prometheus-adapter-values.yaml) serves that name per pod.
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rule["seriesQuery"].startswith("kvtriton_num_requests_waiting{")
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]


@pytest.mark.parametrize("values, message", [
    ({"modelRepository.source": "nfs"}, "value must be one of 'image', 'pvc', 'build'"),
    ({"modelRepository.source": "pvc"}, "set modelRepository.pvc.claimName"),
    ({"gpu.count": "-1"}, "/gpu/count"),
    ({"serve.grpcPort": "70000"}, "/serve/grpcPort"),
    ({"serve.toolCallParser": "granite"}, "/serve/toolCallParser"),
    ({"serve.toolCallParser": "hermes", "serve.openaiPort": "null"}, "set serve.openaiPort too"),
    ({"serve.reasoningParser": "qwen3", "serve.openaiPort": "null"}, "serve.reasoningParser is the OpenAI API's"),
    ({"serve.reasoningParser": "r1"}, "/serve/reasoningParser"),
    ({"serve.engineArgs.max-num-seqs": "8"}, "'max-num-seqs' does not match pattern"),  # keys have no dashes
])
def test_bad_values_fail_with_a_message_naming_them(values, message):
    done = helm("template", RELEASE, str(CHART), *_set_args(values), check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr
