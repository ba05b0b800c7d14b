"""The deployment files (Dockerfile, docker-compose.yml, deploy/) agree with each other and
with the code: services, commands and flags, the metrics port, metric names, datasource uid.

Nothing here needs Docker, Prometheus or Grafana: the files are read, and the CLI's --help
is asked which flags exist.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgnet_curl import metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pgnet-curl.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
PROMETHEUS_DIR = DEPLOY / "prometheus"

SERVICES = {"postgres", "pgnet-curl-install", "pgnet-curl", "prometheus", "grafana"}
METRIC_RE = re.compile(r"\bpgnet_curl_[a-z0-9_]+")


# --- helpers ---------------------------------------------------------------------------------

def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(COMPOSE)


def command_of(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile_instructions() if kw == keyword]


def exposed_series() -> dict[str, str]:
    """Every series name the metrics module exposes -> its public name (as in METRIC_NAMES).

    Counters expose `<name>_total`; histograms `<name>_bucket`, `_sum`, `_count` (never the
    bare name); gauges their name.
    """
    from prometheus_client.metrics import MetricWrapperBase

    series = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            if family.type == "counter":
                series[family.name + "_total"] = family.name + "_total"
            elif family.type == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    series[family.name + suffix] = family.name
            else:
                series[family.name] = family.name
    return series


def check_metric_names(text: str, where: str) -> set[str]:
    used = set(METRIC_RE.findall(text))
    series = exposed_series()
    for name in sorted(used):
        assert name in series, f"{where}: {name} is not a series pgnet-curl exposes"
        assert series[name] in metrics.METRIC_NAMES, f"{where}: {series[name]} is not in METRIC_NAMES"
    return used


def cli_help(subcommand: str) -> str:
    script = Path(sys.executable).with_name("pgnet-curl")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pgnet_curl"]
    result = subprocess.run(command + [subcommand, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in all_panels(dashboard()["panels"])
            for target in panel.get("targets", []) if "expr" in target]


# --- every file parses -------------------------------------------------------------------------

YAML_FILES = sorted([COMPOSE, *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
JSON_FILES = sorted(DEPLOY.rglob("*.json"))


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    assert isinstance(load_yaml(path), dict)


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


def test_the_expected_files_exist():
    for path in (COMPOSE, DOCKERFILE, ROOT / ".dockerignore", DASHBOARD, DATASOURCES, DASHBOARD_PROVIDERS,
                 PROMETHEUS_DIR / "prometheus.yml"):
        assert path.is_file(), path


# --- Dockerfile ------------------------------------------------------------------------------

def test_dockerfile_copies_only_files_that_exist():
    sources = []
    for args in dockerfile("COPY"):
        parts = args.split()
        if any(part.startswith("--from") for part in parts):
            continue  # from another build stage
        parts = [part for part in parts if not part.startswith("--")]
        sources += parts[:-1]
    assert sources, "the Dockerfile copies nothing from the repository"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith("!")]
    for required in (".venv", "tests", ".git"):
        assert required in patterns, f".dockerignore should exclude {required}"
    for args in dockerfile("COPY"):
        if "--from" in args:
            continue
        for source in args.split()[:-1]:
            source = source.rstrip("/")
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in patterns), \
                f".dockerignore excludes {source}, which the Dockerfile copies"


def test_dockerfile_runs_pgnet_curl_serve_as_non_root():
    assert dockerfile("FROM")[-1].startswith("python:3.11-slim")
    assert json.loads(dockerfile("ENTRYPOINT")[-1]) == ["pgnet-curl"]
    assert json.loads(dockerfile("CMD")[-1]) == ["serve"]
    users = dockerfile("USER")
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"


def healthcheck_argv() -> list[str]:
    (healthcheck,) = dockerfile("HEALTHCHECK")
    argv = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert argv[0] == "python", "slim has no curl: the check runs Python"
    return argv


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_dockerfile_healthcheck_passes_on_200_and_fails_on_503(status, healthy):
    """Run the image's HEALTHCHECK command against a stand-in /healthz."""
    import os
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    paths = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            paths.append(self.path)
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "PGNET_METRICS_PORT": str(server.server_address[1])}
        result = subprocess.run([sys.executable, *healthcheck_argv()[1:]], env=env,
                                capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert paths == ["/healthz"]
    assert (result.returncode == 0) is healthy, result.stderr


# --- docker-compose.yml ---------------------------------------------------------------------

def test_compose_has_the_five_services():
    assert set(compose()["services"]) == SERVICES


def test_compose_install_is_a_one_shot_install_after_postgres():
    service = compose()["services"]["pgnet-curl-install"]
    assert command_of(service)[0] == "install"
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert str(service.get("restart", "no")) == "no"
    assert "PGNET_DSN" in service["environment"]
    assert flag_value(command_of(service), "--worker-role") == "pgnet_curl_worker"
    assert "PGNET_WORKER_PASSWORD" in service["environment"]


def test_compose_serves_as_the_worker_role_not_the_superuser():
    services = compose()["services"]
    install_dsn = services["pgnet-curl-install"]["environment"]["PGNET_DSN"]
    serve_dsn = services["pgnet-curl"]["environment"]["PGNET_DSN"]
    assert install_dsn.startswith("postgresql://postgres:")
    role = flag_value(command_of(services["pgnet-curl-install"]), "--worker-role")
    assert serve_dsn.startswith(f"postgresql://{role}:${{PGNET_WORKER_PASSWORD"), serve_dsn


def test_compose_service_serves_with_metrics_port_and_scales():
    services = compose()["services"]
    service = services["pgnet-curl"]
    args = command_of(service)
    assert args[0] == "serve"
    assert flag_value(args, "--metrics-port") is not None
    assert "PGNET_DSN" in service["environment"]
    assert service["depends_on"]["pgnet-curl-install"]["condition"] == "service_completed_successfully"
    assert service["restart"] == "unless-stopped"
    assert "container_name" not in service and "ports" not in service, "--scale needs neither"
    grace = re.fullmatch(r"(\d+)s", str(service["stop_grace_period"]))
    assert grace and int(grace.group(1)) >= 15, "serve drains for up to 10 s plus a margin"
    assert services["postgres"]["healthcheck"]["test"][-1].startswith("pg_isready")


def test_compose_publishes_ports_on_localhost_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def test_metrics_port_is_the_one_prometheus_scrapes_and_the_image_exposes():
    port = int(flag_value(command_of(compose()["services"]["pgnet-curl"]), "--metrics-port"))
    exposed = {int(p.split("/")[0]) for args in dockerfile("EXPOSE") for p in args.split()}
    assert port in exposed, f"serve's --metrics-port {port} is not EXPOSEd by the Dockerfile ({exposed})"
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "pgnet-curl"]
    (sd,) = job["dns_sd_configs"]
    assert sd["type"] == "A" and sd["names"] == ["pgnet-curl"], "scrape every replica of the service"
    assert sd["port"] == port, f"Prometheus scrapes port {sd['port']}, serve listens on {port}"
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_compose_mounts_the_deploy_files():
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
    prometheus_mounts = " ".join(services["prometheus"]["volumes"])
    assert "deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml" in prometheus_mounts
    for rule_file in load_yaml(PROMETHEUS_DIR / "prometheus.yml").get("rule_files", []):
        assert (PROMETHEUS_DIR / rule_file).is_file()
        assert f"deploy/prometheus/{rule_file}:/etc/prometheus/{rule_file}" in prometheus_mounts


@pytest.mark.parametrize("service_name", ["pgnet-curl-install", "pgnet-curl"])
def test_compose_commands_are_real_cli_subcommands_and_flags(service_name):
    service = compose()["services"][service_name]
    args = command_of(service)
    help_text = cli_help(args[0])
    for arg in args[1:]:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), \
                f"`pgnet-curl {args[0]}` has no flag {flag}"
    for variable in service.get("environment", {}):
        if variable.startswith("PGNET_") or variable == "DATABASE_URL":
            assert variable in help_text, f"`pgnet-curl {args[0]}` reads no {variable}"


# --- Prometheus ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(PROMETHEUS_DIR.glob("*.yml")), ids=lambda p: p.name)
def test_prometheus_files_use_real_metric_names(path):
    check_metric_names(path.read_text(), str(path.relative_to(ROOT)))


def test_an_alert_fires_when_a_circuit_stays_open():
    rules = {rule["alert"]: rule for group in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
             for rule in group["rules"]}
    rule = rules["PgnetCurlCircuitOpen"]
    assert "pgnet_curl_circuits" in rule["expr"] and "open" in rule["expr"]
    assert rule["for"] == "10m"


# --- Grafana ---------------------------------------------------------------------------------

def provisioned_datasource_uid() -> str:
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    return datasource["uid"]


def test_dashboard_identity():
    board = dashboard()
    assert board["uid"] == "pgnet-curl"
    assert board["schemaVersion"] >= 36


def test_dashboard_uses_only_real_metric_names():
    used = check_metric_names(DASHBOARD.read_text(), str(DASHBOARD.relative_to(ROOT)))
    assert len(used) >= 10


def test_dashboard_covers_the_main_metrics():
    exprs = "\n".join(dashboard_exprs())
    for name in ("pgnet_curl_requests_total", "pgnet_curl_end_to_end_seconds_bucket",
                 "pgnet_curl_http_duration_seconds_bucket", "pgnet_curl_queue_depth",
                 "pgnet_curl_queue_oldest_pending_seconds", "pgnet_curl_inflight_requests",
                 "pgnet_curl_workers_alive", "pgnet_curl_write_batch_size_bucket",
                 "pgnet_curl_write_batch_duration_seconds_bucket", "pgnet_curl_worker_restarts_total",
                 "pgnet_curl_db_reconnects_total", "pgnet_curl_lease_reclaims_total",
                 "pgnet_curl_circuits", "pgnet_curl_circuit_opens_total"):
        assert name in exprs, f"no panel shows {name}"
    assert "sum by (outcome) (rate(pgnet_curl_requests_total" in exprs
    for expr in dashboard_exprs():
        if "histogram_quantile" in expr:
            assert "sum by (le)" in expr, expr
        assert expr.count("(") == expr.count(")"), expr


def test_dashboard_datasources_are_the_provisioned_one():
    uid = provisioned_datasource_uid()
    board = dashboard()
    refs = []
    for panel in all_panels(board["panels"]):
        if panel["type"] == "row":
            continue
        refs.append(panel["datasource"])
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        refs += [target["datasource"] for target in panel["targets"]]
    refs += [variable["datasource"] for variable in board.get("templating", {}).get("list", [])
             if "datasource" in variable]
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": uid}


def test_dashboard_panel_ids_are_unique():
    ids = [panel["id"] for panel in all_panels(dashboard()["panels"])]
    assert len(ids) == len(set(ids))


def test_dashboard_provider_loads_the_mounted_folder():
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    path = provider["options"]["path"]
    grafana_mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana_mounts
    assert "./deploy/grafana/provisioning/datasources:/etc/grafana/provisioning/datasources:ro" in grafana_mounts
    assert "./deploy/grafana/provisioning/dashboards:/etc/grafana/provisioning/dashboards:ro" in grafana_mounts
