"""The Kubernetes manifests and the Dockerfile agree with the code and with each other:
every GRUSERVE_* setting is a serve variable and the pod's configuration builds from them,
every selector reaches the pods, probes ask grpc.health.v1 on the gRPC port, the termination
grace covers the drain, and the HPA's metrics are gauges the server exports.
The KServe InferenceService (a CRD) is checked here too. (`make deploy-check` validates the
Kubernetes manifests against the Kubernetes schemas and lints the Dockerfile.)"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from gruserve.runtime.cli import build_parser
from gruserve.runtime.cli_config import config_from_args
from gruserve.runtime.config import env_of, flag_of, sections
from gruserve.runtime.metrics import ServiceMetrics
from gruserve.runtime.oip_servicer import SERVICE_NAME as OIP_SERVICE_NAME
from gruserve.runtime.servicer import SERVICE_NAME

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
VARIANTS = ("cpu", "gpu")


def _load(folder: str, pattern: str = "*.yaml") -> list[dict]:
    docs = []
    for path in sorted((KUBE / folder).glob(pattern)):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return _load("base")


def _deployment(variant: str) -> dict:
    return _one(_load(variant), "Deployment")


def _container(variant: str) -> dict:
    (container,) = _deployment(variant)["spec"]["template"]["spec"]["containers"]
    return container


def _settings(base, variant: str) -> dict[str, str]:
    """GRUSERVE_* variables the container gets (its own env over the ConfigMap's)."""
    container = _container(variant)
    (source,) = container["envFrom"]
    config = _one(base, "ConfigMap", source["configMapRef"]["name"])
    return {**config["data"], **{e["name"]: e["value"] for e in container.get("env", [])}}


def _variables() -> set[str]:
    """The GRUSERVE_* variable of every serve setting."""
    return {
        env_of(flag_of(f)) for cls in sections().values() for f in dataclasses.fields(cls)
        if f.metadata["setting"].cli
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_setting_is_a_serve_variable_and_the_config_builds(base, variant):
    settings = _settings(base, variant)
    known = _variables()
    for name in settings:
        assert name in known, f"gruserve serve has no ${name}"
    argv = list(_container(variant)["args"])
    assert argv[0] == "serve"
    # what `gruserve serve` builds in the pod: its args over the variables over the defaults
    config = config_from_args(build_parser().parse_args(argv), environ=settings)
    assert (config.transport.host, config.transport.port) == ("0.0.0.0", 50051)
    assert config.transport.auth_token_file == "/etc/gruserve/auth/token"
    assert config.lifecycle.grace_s == float(settings["GRUSERVE_GRACE"])
    assert config.lifecycle.shutdown_delay_s == float(settings["GRUSERVE_SHUTDOWN_DELAY"])
    assert config.scheduler.num_slots == int(settings["GRUSERVE_NUM_SLOTS"])
    assert config.transport.max_connection_age_s == float(settings["GRUSERVE_MAX_CONNECTION_AGE"])
    assert config.session.device == {"cpu": "cpu", "gpu": "cuda"}[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_budget_and_autoscaler_reach_the_deployment(base, variant):
    deployment, hpa = _deployment(variant), _one(_load(variant), "HorizontalPodAutoscaler")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in _container(variant)["ports"]}
    for service in (d for d in base if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports.keys()
    pdb = _one(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_the_service_monitor_scrapes_each_pod_once(base):
    """kubernetes-validate has no schema for the ServiceMonitor CRD: checked here."""
    monitor = _one(_load("monitoring", "servicemonitor.yaml"), "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    selected = [
        s for s in base if s["kind"] == "Service" and wanted <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["gruserve"]  # not the headless one too
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_the_headless_service_is_headless(base):
    assert _one(base, "Service", "gruserve-headless")["spec"]["clusterIP"] == "None"
    assert _one(base, "Service", "gruserve")["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_ask_the_generators_health_on_the_grpc_port(variant):
    container = _container(variant)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert f"--port={grpc_port}" in container["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": grpc_port, "service": SERVICE_NAME}


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_grace_covers_prestop_shutdown_delay_and_drain(base, variant):
    spec = _deployment(variant)["spec"]["template"]["spec"]
    container = _container(variant)
    settings = _settings(base, variant)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(settings["GRUSERVE_SHUTDOWN_DELAY"]) + float(settings["GRUSERVE_GRACE"])
    # the kubelet SIGKILLs at terminationGracePeriodSeconds, counted from preStop's start
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 2
    # health is NOT_SERVING during a drain: liveness must not restart the pod meanwhile
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain
    # a rolling update never drains a pod before its replacement is ready
    assert _deployment(variant)["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_gpu_variant_asks_for_a_gpu_and_the_cpu_one_does_not():
    gpu, cpu = _container("gpu"), _container("cpu")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--device=cuda" in gpu["args"] and gpu["image"].endswith("-cuda")
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert "--device=cpu" in cpu["args"] and cpu["image"].endswith("-cpu")


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_autoscaler_metrics_are_gauges_the_server_exports(variant):
    gauges = {m.name for m in ServiceMetrics().registry.collect() if m.type == "gauge"}
    hpa = _one(_load(variant), "HorizontalPodAutoscaler")
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert names and set(names) <= gauges
    values = yaml.safe_load((KUBE / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    served = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"])[1]
    assert all(re.fullmatch(served, name) for name in names)


def test_the_image_exposes_the_ports_the_pods_use():
    dockerfile = (ROOT / "Dockerfile").read_text()
    exposed = {tuple(int(p) for p in line.split()[1:]) for line in dockerfile.splitlines()
               if line.startswith("EXPOSE")}
    for variant in VARIANTS:
        ports = tuple(p["containerPort"] for p in _container(variant)["ports"])
        assert exposed == {ports}
    assert "USER 10001:10001" in dockerfile
    for variant in VARIANTS:
        context = _deployment(variant)["spec"]["template"]["spec"]["securityContext"]
        assert context["runAsUser"] == 10001 and context["runAsNonRoot"]


def test_the_kserve_predictor_serves_the_open_inference_protocol():
    """kubernetes-validate has no schema for KServe's InferenceService CRD: checked here.
    Its container line is a `gruserve serve` the CLI accepts, on the port it declares and
    probes (asking the Open Inference Protocol's health), with the bundle where KServe's
    storage initializer puts STORAGE_URI."""
    manifest = yaml.safe_load(KSERVE.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == (
        "serving.kserve.io/v1beta1", "InferenceService"
    )
    predictor = manifest["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env.pop("STORAGE_URI")
    assert set(env) <= _variables()
    args = build_parser().parse_args(container["args"])
    config = config_from_args(args, environ=env)
    assert args.bundle == "/mnt/models"
    assert config.transport.host == "0.0.0.0"
    (port,) = container["ports"]
    assert port["containerPort"] == config.transport.port
    assert port["name"].startswith("grpc")  # Istio: the protocol is the name's prefix
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {
            "port": config.transport.port, "service": OIP_SERVICE_NAME
        }
    annotations = manifest["metadata"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == config.transport.metrics_port
    # the image exposes what the predictor uses
    dockerfile = (ROOT / "Dockerfile").read_text()
    exposed = {int(p) for line in dockerfile.splitlines() if line.startswith("EXPOSE")
               for p in line.split()[1:]}
    assert {config.transport.port, config.transport.metrics_port} <= exposed
    # the drain fits in the termination grace, and liveness outlasts it
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert predictor["terminationGracePeriodSeconds"] >= pre_stop + config.lifecycle.grace_s + 2
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > config.lifecycle.grace_s
