"""Deployment files: Prometheus rules and config, Grafana dashboards,
docker-compose.yml and the Dockerfile.

Everything runs the real tools (promtool, prometheus, docker-compose,
redis-server, the tutorgate console script).  A missing tool fails the test
with the package that provides it: CI installs them, so a silent skip would
only hide a broken deployment.  No Docker engine is needed: the compose file
is checked with `docker-compose config`, the image by building the wheel
as `pip install .` in the image does.

The end-to-end test (`test_e2e_every_dashboard_panel_has_data_from_a_live_gateway`,
marked slow) scrapes a real gateway with a real Prometheus and evaluates every
dashboard panel and recording rule against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram, Summary

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "rules.yml"
RULES_TEST = PROM_DIR / "rules_test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
BUILD_SCRIPT = GRAFANA_DIR / "build.py"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"

# Grafana's built-in variables in panel expressions, and what a test query
# uses instead.  A variable not listed here fails test_dashboards_are_well_formed.
GRAFANA_VARIABLES = {"$__range": "5m", "$__rate_interval": "1m", "$__interval": "15s"}

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}

COMPOSE_ENV = {"TUTORGATE_ID_SECRET": "compose-test-secret", "GRAFANA_ADMIN_PASSWORD": "x"}


# ---------------------------------------------------------------- tools


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install -y {package})")
    return path


def _tutorgate() -> str:
    """The console script of the environment running the tests."""
    path = Path(sys.executable).with_name("tutorgate")
    if not path.exists():
        pytest.fail(f"{path} does not exist: pip install -e {ROOT}")
    return str(path)


def _run(
    args: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Process:
    """A child process with its output in a log file; stopped by its own pid."""

    def __init__(
        self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait_http_ok(url: str, process: _Process, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            pytest.fail(
                f"{process.name} exited with {process.proc.returncode}:\n{process.output()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:  # refused, reset, or an HTTP error status
            pass
        time.sleep(0.1)
    pytest.fail(
        f"{url} did not answer 200 within {timeout}s; {process.name} said:\n{process.output()}"
    )


@contextlib.contextmanager
def _prometheus(workdir: Path, config: dict[str, Any]) -> Iterator[str]:
    """A real Prometheus on a free loopback port; yields its base URL."""
    exe = _tool("prometheus", "prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = _free_port()
    process = _Process(
        "prometheus",
        [
            exe,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        workdir / "prometheus.log",
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http_ok(f"{base}/-/ready", process)
        yield base
    finally:
        process.stop()


def _prom_get(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body: dict[str, Any] = json.load(resp)
    except urllib.error.HTTPError as e:  # 400/422 carry the parse error as JSON
        body = json.load(e)
    return body


def _wait_scraped(base: str, timeout: float = 15) -> None:
    """Until Prometheus has scraped the tutorgate target successfully once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = _prom_get(base, "/api/v1/query", query='up{job="tutorgate"} == 1')
        if result["data"]["result"]:
            return
        time.sleep(0.2)
    pytest.fail(f"Prometheus did not scrape the gateway within {timeout}s")


# ---------------------------------------------------------------- expressions


def _panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels folded into a row


def _dashboard_targets() -> list[tuple[str, str, dict[str, Any]]]:
    """(dashboard file, panel title, target) for every panel query."""
    out = []
    for path in DASHBOARDS:
        for panel in _panels(json.loads(path.read_text())["panels"]):
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target))
    return out


def _concrete(expr: str) -> str:
    """The expression with Grafana's variables replaced, as a test can query it."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _exported_series() -> dict[str, set[str]]:
    """Every series name gateway/metrics.py exports, with the label names it
    has once Prometheus stored it (a metric label that clashes with a target
    label arrives as exported_<name>)."""
    from gateway.metrics import FastCounter, FastHistogram, Metrics

    suffixes: dict[type, tuple[str, ...]] = {
        Counter: ("_total", "_created"),
        FastCounter: ("_total",),
        FastHistogram: ("_bucket", "_count", "_sum"),
        Gauge: ("",),
        Histogram: ("_bucket", "_count", "_sum", "_created"),
        Summary: ("", "_count", "_sum", "_created"),
    }
    out: dict[str, set[str]] = {}
    for collector in vars(Metrics()).values():
        kinds = [k for k in suffixes if isinstance(collector, k)]
        if not kinds:
            continue
        labels = {
            f"exported_{n}" if n in TARGET_LABELS else n for n in collector._labelnames
        } | TARGET_LABELS
        for suffix in suffixes[kinds[0]]:
            out[collector._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


SELECTOR = re.compile(r"\b(tutorgate_[a-z0-9_]+)\s*(\{[^}]*\})?")
RECORDED = re.compile(r"\btutorgate:[a-z0-9_:]+")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def _grouping_labels(expr: str) -> set[str]:
    return {n.strip() for group in GROUPING.findall(expr) for n in group.split(",") if n.strip()}


def _check_expr(expr: str, exported: dict[str, set[str]], recorded: set[str]) -> list[str]:
    """Problems with the metric and label names one expression uses."""
    problems = []
    known: set[str] = set(TARGET_LABELS)
    for name, matchers in SELECTOR.findall(expr):
        if name not in exported:
            problems.append(f"{name} is not exported by gateway/metrics.py")
            continue
        known |= exported[name]
        for label in MATCHER_LABEL.findall(matchers):
            if label not in exported[name]:
                problems.append(f"{name} has no label {label!r}")
    for name in RECORDED.findall(expr):
        if name not in recorded:
            problems.append(f"{name} is not recorded in rules.yml")
        else:  # a recorded series keeps (some of) the labels of what it aggregates
            known |= set().union(*exported.values())
    for label in _grouping_labels(expr) - known:
        problems.append(f"grouping by {label!r}, which no series in the expression has")
    return problems


# ---------------------------------------------------------------- Prometheus rules


def test_prometheus_rules_pass_promtool_check() -> None:
    """promtool check rules accepts rules.yml."""
    result = _run([_tool("promtool", "prometheus"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rule_unit_tests_pass() -> None:
    """promtool test rules passes rules_test.yml."""
    result = _run([_tool("promtool", "prometheus"), "test", "rules", RULES_TEST.name], cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """Each alert in rules.yml has a unit test where it fires and one where it does not."""
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts, "rules.yml has no alerts"
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown quiet"
    assert (firing | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_prometheus_config_passes_promtool_check() -> None:
    """promtool check config accepts the compose stack's prometheus.yml (and its rules)."""
    result = _run([_tool("promtool", "prometheus"), "check", "config", str(PROM_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_only_exported_metrics_and_labels() -> None:
    """Every metric and label a rule names exists in gateway/metrics.py."""
    exported = _exported_series()
    rules = _rules()
    recorded = {r["record"] for r in rules if "record" in r}
    problems = [
        f"{r.get('record') or r.get('alert')}: {p}"
        for r in rules
        for p in _check_expr(r["expr"], exported, recorded)
    ]
    assert problems == []


# ---------------------------------------------------------------- Grafana


def _provisioned_datasource() -> dict[str, Any]:
    files = sorted((GRAFANA_DIR / "provisioning" / "datasources").glob("*.yml"))
    sources = [d for f in files for d in yaml.safe_load(f.read_text())["datasources"]]
    prometheus = [d for d in sources if d["type"] == "prometheus"]
    assert len(prometheus) == 1, sources
    return prometheus[0]


def test_grafana_provisioning_points_at_the_compose_prometheus() -> None:
    """The provisioned datasource is http://prometheus:9090 and the provider loads files."""
    source = _provisioned_datasource()
    assert source["url"] == "http://prometheus:9090"
    assert source.get("uid")
    files = sorted((GRAFANA_DIR / "provisioning" / "dashboards").glob("*.yml"))
    providers = [p for f in files for p in yaml.safe_load(f.read_text())["providers"]]
    assert [p["type"] for p in providers] == ["file"]
    assert providers[0]["options"]["path"].startswith("/")


def test_dashboards_are_well_formed() -> None:
    """Each dashboard loads, has a unique uid, unique panel ids, panels inside the
    24-column grid without overlaps, and queries the provisioned datasource with
    expressions that only use known Grafana variables."""
    assert {p.name for p in DASHBOARDS} >= {
        "regulator.json",
        "operator.json",
        "regulator.zh-CN.json",
        "operator.zh-CN.json",
    }
    uid = _provisioned_datasource()["uid"]
    uids = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        uids.append(board["uid"])
        panels = list(_panels(board["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        cells: dict[tuple[int, int], str] = {}
        for panel in panels:
            where = f"{path.name}: {panel['title']!r}"
            g = panel["gridPos"]
            assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, where
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{where} overlaps {cells[(x, y)]!r}"
                    cells[(x, y)] = panel["title"]
            if panel["type"] in ("row", "text"):
                continue
            assert panel.get("targets"), f"{where} has no query"
            assert panel["datasource"]["uid"] == uid, where
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid, where
                assert target["expr"].strip(), where
                assert "$" not in _concrete(target["expr"]), f"{where}: unknown variable"
    assert len(uids) == len(set(uids)), "duplicate dashboard uids"


def _sdk_dashboard_model() -> Any:
    """The SDK's Dashboard model; the `dashboards` extra installs it."""
    try:
        from grafana_foundation_sdk.models.dashboard import Dashboard
    except ImportError:
        pytest.fail(f"grafana-foundation-sdk is missing: pip install -e '{ROOT}[dashboards]'")
    return Dashboard


def _sdk_round_trip(board: dict[str, Any]) -> Any:
    """The dashboard read into the SDK's model and written out again."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    return json.loads(json.dumps(_sdk_dashboard_model().from_json(board), cls=JSONEncoder))


def test_committed_dashboards_are_the_generators_output(tmp_path: Path) -> None:
    """`python deploy/grafana/build.py` writes exactly the committed dashboard files,
    byte for byte, and no dashboard file exists that it does not write."""
    _sdk_dashboard_model()
    result = _run([sys.executable, str(BUILD_SCRIPT), "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    built = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
    committed = {p.name: p.read_bytes() for p in DASHBOARDS}
    assert sorted(built) == sorted(committed)
    stale = [name for name in built if built[name] != committed[name]]
    assert stale == [], f"regenerate with: python {BUILD_SCRIPT.relative_to(ROOT)}"


def test_build_check_fails_on_a_hand_edited_dashboard(tmp_path: Path) -> None:
    """`build.py --check` exits 0 on the committed files and 1, naming the file,
    when one was edited by hand."""
    _sdk_dashboard_model()
    for path in DASHBOARDS:
        shutil.copy(path, tmp_path / path.name)
    check = [sys.executable, str(BUILD_SCRIPT), "--check", "--out", str(tmp_path)]
    result = _run(check)
    assert result.returncode == 0, result.stdout + result.stderr
    edited = tmp_path / "regulator.zh-CN.json"
    edited.write_text(edited.read_text().replace("拍照搜题拦截", "Photo search"))
    result = _run(check)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "regulator.zh-CN.json" in result.stdout + result.stderr


def test_dashboards_round_trip_through_the_sdk_model() -> None:
    """Each dashboard file reads into grafana-foundation-sdk's Dashboard model and
    writes back unchanged: every key is one Grafana's schema knows."""
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert _sdk_round_trip(board) == board, path.name


def test_sdk_round_trip_catches_a_key_outside_the_schema() -> None:
    """A misspelt panel key (hand-written JSON's usual slip) does not survive the
    SDK's model, so the round-trip test would catch it."""
    board = json.loads((GRAFANA_DIR / "dashboards" / "operator.json").read_text())
    board["panels"][0]["gridpos"] = board["panels"][0].pop("gridPos")
    assert _sdk_round_trip(board) != board


CJK = re.compile(r"[\u4e00-\u9fff]")


def test_every_chinese_dashboard_text_is_chinese() -> None:
    """In each zh-CN dashboard the title, description, every panel title and
    description, and every value mapping's text contain Chinese characters."""
    boards = [p for p in DASHBOARDS if p.name.endswith(".zh-CN.json")]
    assert {p.name for p in boards} == {"operator.zh-CN.json", "regulator.zh-CN.json"}
    problems = []
    for path in boards:
        board = json.loads(path.read_text())
        texts = [("title", board["title"]), ("description", board.get("description", ""))]
        for panel in _panels(board["panels"]):
            where = f"panel {panel['id']}"
            texts += [(f"{where} title", panel["title"])]
            texts += [(f"{where} description", panel.get("description", ""))]
            for mapping in panel.get("fieldConfig", {}).get("defaults", {}).get("mappings", []):
                texts += [(f"{where} mapping", o["text"]) for o in mapping["options"].values()]
        problems += [
            f"{path.name}: {what}: {text!r}" for what, text in texts if not CJK.search(text)
        ]
    assert problems == []


TEXT_KEYS = {"title", "description", "legendFormat", "text", "links", "uid", "tags", "weekStart"}


def _without_text(item: Any) -> Any:
    """The dashboard with every human-readable text (and its uid, tags, links) left out."""
    if isinstance(item, dict):
        return {k: _without_text(v) for k, v in item.items() if k not in TEXT_KEYS}
    if isinstance(item, list):
        return [_without_text(v) for v in item]
    return item


def test_each_chinese_dashboard_shows_what_its_english_twin_shows() -> None:
    """A zh-CN dashboard has its English twin's panels, layout, queries, units and
    thresholds; only the words differ (and its uid ends in -zh-cn)."""
    for path in DASHBOARDS:
        if not path.name.endswith(".zh-CN.json"):
            continue
        zh = json.loads(path.read_text())
        en = json.loads((path.parent / path.name.replace(".zh-CN", "")).read_text())
        assert zh["uid"] == en["uid"] + "-zh-cn"
        assert zh["title"] != en["title"]
        assert _without_text(zh) == _without_text(en), path.name


def test_dashboards_use_only_exported_metrics_and_labels() -> None:
    """Every metric and label a panel names exists in gateway/metrics.py, and every
    {{label}} in a legend is one the expression groups by."""
    exported = _exported_series()
    recorded = {r["record"] for r in _rules() if "record" in r}
    problems = []
    for board, title, target in _dashboard_targets():
        expr = target["expr"]
        problems += [f"{board}: {title!r}: {p}" for p in _check_expr(expr, exported, recorded)]
        missing = set(LEGEND_LABEL.findall(target.get("legendFormat", ""))) - _grouping_labels(expr)
        if missing:
            problems.append(f"{board}: {title!r}: legend uses {sorted(missing)}, not grouped by")
    assert problems == []


def test_every_panel_expression_parses(tmp_path: Path) -> None:
    """A real Prometheus accepts every dashboard expression (no data needed)."""
    config = {"global": {"scrape_interval": "15s"}, "scrape_configs": []}
    with _prometheus(tmp_path, config) as base:
        errors = []
        for board, title, target in _dashboard_targets():
            body = _prom_get(base, "/api/v1/query", query=_concrete(target["expr"]))
            if body["status"] != "success":
                errors.append(f"{board}: {title!r}: {body.get('error')}")
    assert errors == []


# ---------------------------------------------------------------- docker-compose


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = _tool("docker-compose", "docker-compose")
    base = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    return _run([exe, "-f", str(COMPOSE), "config"], env=base | env)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (or volume name) of a resolved service."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):  # docker-compose v1 prints the short form
            source, target = v.split(":")[:2]
        else:
            source, target = v["source"], v["target"]
        out[target] = source
    return out


def _args(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else list(command)


def _option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    result = _compose_config(COMPOSE_ENV)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_compose_config_is_valid(compose: dict[str, Any]) -> None:
    """docker-compose config resolves the stack: redis, two gateways, the demo
    upstream, prometheus and grafana."""
    assert set(compose["services"]) == {
        "redis",
        "gateway-1",
        "gateway-2",
        "demo-upstream",
        "prometheus",
        "grafana",
    }


def test_compose_refuses_to_start_without_the_id_secret() -> None:
    """The gateways' TUTORGATE_ID_SECRET must come from the environment."""
    env = {k: v for k, v in COMPOSE_ENV.items() if k != "TUTORGATE_ID_SECRET"}
    result = _compose_config(env)
    assert result.returncode != 0
    assert "TUTORGATE_ID_SECRET" in result.stderr


def test_compose_redis_persists(compose: dict[str, Any]) -> None:
    """Redis runs with appendonly yes on a named volume."""
    redis = compose["services"]["redis"]
    assert _option(_args(redis), "--appendonly") == "yes"
    data = _mounts(redis)["/data"]
    assert data in compose["volumes"], "redis /data is not a named volume"


def test_compose_gateways_share_redis_and_policy(compose: dict[str, Any]) -> None:
    """Both replicas serve the mounted policy, share one Redis, proxy to the demo
    upstream and get the id secret from the environment."""
    services = compose["services"]
    for name in ("gateway-1", "gateway-2"):
        gw = services[name]
        args = _args(gw)
        assert args[0] == "serve"
        assert _option(args, "--upstream") == "http://demo-upstream:8000"
        assert _option(args, "--listen") == "0.0.0.0:8080"
        assert _option(args, "--admin-listen") == "0.0.0.0:9100"
        assert _option(args, "--redis") == "redis://redis:6379/0"
        assert gw["environment"]["TUTORGATE_ID_SECRET"] == COMPOSE_ENV["TUTORGATE_ID_SECRET"]
        policy = Path(_option(args, "--policy"))
        mounts = _mounts(gw)
        assert str(policy.parent) in mounts, f"{name}: {policy.parent} is not mounted"
        assert Path(mounts[str(policy.parent)]) == ROOT / "policies"
    assert _args(services["demo-upstream"]) == ["demo-upstream", "--listen", "0.0.0.0:8000"]


def test_compose_mounts_the_deploy_files(compose: dict[str, Any]) -> None:
    """Prometheus gets prometheus.yml with its rules; Grafana gets provisioning and the
    dashboards where the provider looks; Prometheus scrapes each gateway's admin port."""
    services = compose["services"]
    prom = services["prometheus"]
    config_file = Path(
        _option([a for arg in _args(prom) for a in arg.split("=", 1)], "--config.file")
    )
    assert Path(_mounts(prom)[str(config_file.parent)]) == PROM_DIR
    grafana = _mounts(services["grafana"])
    assert Path(grafana["/etc/grafana/provisioning"]) == GRAFANA_DIR / "provisioning"
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "tutorgate.yml").read_text()
    )
    assert Path(grafana[provider["providers"][0]["options"]["path"]]) == GRAFANA_DIR / "dashboards"
    scrape = yaml.safe_load(PROM_CONFIG.read_text())["scrape_configs"]
    job = next(j for j in scrape if j["job_name"] == "tutorgate")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:9100" for name in services if name.startswith("gateway-")}
    for service in services.values():
        for source in _mounts(service).values():
            if source.startswith("/"):
                assert Path(source).exists(), f"bind mount source {source} is missing"


def test_compose_home_dashboard_is_the_chinese_regulator_dashboard(
    compose: dict[str, Any],
) -> None:
    """Grafana opens on the zh-CN regulator dashboard, a file the mounted folder holds."""
    grafana = compose["services"]["grafana"]
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    mounted = Path(_mounts(grafana)[str(home.parent)])
    assert home.name == "regulator.zh-CN.json"
    assert (mounted / home.name).is_file()


def test_compose_default_policy_is_valid() -> None:
    """policies/default.yaml, which the compose gateways serve, passes `tutorgate check`."""
    assert DEFAULT_POLICY.exists(), f"{DEFAULT_POLICY} is missing"
    result = _run([_tutorgate(), "check", str(DEFAULT_POLICY)])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    """The image runs python:3.11-slim as a non-root user and checks /healthz with
    Python's urllib (the slim image has no curl)."""
    instructions = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    final = instructions[last_from:]
    assert final[0][1].split()[0] == "python:3.11-slim"
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    checks = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "http://127.0.0.1:9100/healthz" in checks[0] and "urllib" in checks[0]
    assert "curl" not in checks[0] and "wget" not in checks[0]


def test_image_sources_build_the_package(tmp_path: Path) -> None:
    """Every COPY source of the Dockerfile exists, and `pip install .` as the
    image runs it (built here as a wheel) ships every package file.

    What `.dockerignore` lets into the build context is Docker's to decide and
    cannot be observed without a Docker engine; re-implementing its matcher
    here only tested the re-implementation, so this test does not."""
    for word, rest in _instructions():
        if word == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
    # With build isolation, as `pip install .` in the image: pip fetches the
    # build backend pyproject.toml asks for.
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir",
                   str(tmp_path / "wheels"), str(ROOT)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("tutorgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert shipped - names == set(), "package files the image would lack (package-data?)"


# ---------------------------------------------------------------- end to end

TZ = ZoneInfo("Asia/Shanghai")
STREAM_PATH = "/classroom/arts/stream"


def _e2e_policy() -> dict[str, Any]:
    """Short lessons (2 s, break 2 s, 3 s a day); today (and tomorrow, in case the
    test crosses local midnight) a rest day; region 650000 inside its curfew now."""
    now = dt.datetime.now(TZ)

    def clock(hours: int) -> str:
        return (now + dt.timedelta(hours=hours)).strftime("%H:%M:%S")

    return {
        "version": 1,
        "timezone": "Asia/Shanghai",
        "identity": {
            "source": "header",
            "student_header": "X-Student-Id",
            "grade_header": "X-Student-Grade",
            "region_header": "X-Student-Region",
        },
        "lesson": {"max_duration": "2s", "min_break": "2s"},
        "daily_max": "3s",
        "curfew": {"start": clock(12), "end": clock(13)},
        "rest_days": {
            "weekends": False,
            "statutory_holidays": False,
            "extra_holidays": [now.date(), now.date() + dt.timedelta(days=1)],
            "extra_workdays": [],
            "vacations": [],
        },
        "regions": {"650000": {"curfew": {"start": clock(-1), "end": clock(1)}}},
        "routes": [
            {"prefix": "/classroom/subject/", "kind": "lesson", "category": "subject"},
            {"prefix": "/classroom/arts/", "kind": "lesson", "category": "non_subject"},
            {"prefix": "/api/photo-search", "kind": "forbidden", "feature": "photo_search"},
        ],
    }


async def _start_upstream(port: int) -> web.AppRunner:
    """The tutoring site: pages, an endless lesson stream, and a path whose
    connection breaks before any answer."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="lesson page")

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(100):  # 20 s: far beyond the 2 s lesson the gateway allows
                await resp.write(b"tick\n")
                await asyncio.sleep(0.2)
        return resp

    async def broken(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError

    app = web.Application()
    app.router.add_get(STREAM_PATH, stream)
    app.router.add_get("/plain/broken", broken)
    app.router.add_get("/{tail:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def _ask(
    session: aiohttp.ClientSession, base: str, path: str, **headers: str
) -> tuple[int, str | None]:
    """(status, denial rule or None) for one request through the gateway."""
    async with session.get(base + path, headers=headers) as resp:
        body = await resp.read()
        rule = None
        if resp.status >= 400 and resp.content_type == "application/json":
            rule = json.loads(body).get("rule")
        return resp.status, rule


def _student(sid: str, grade: str, region: str | None = None) -> dict[str, str]:
    headers = {"X-Student-Id": sid, "X-Student-Grade": grade}
    if region is not None:
        headers["X-Student-Region"] = region
    return headers


async def _lesson_then_break_then_limit(
    session: aiohttp.ClientSession, base: str
) -> set[str | None]:
    """One student asks every 0.25 s for 8 s: a 2 s lesson, a 2 s break, a second
    lesson that runs into the 3 s daily limit.  Returns the rules seen."""
    seen: set[str | None] = set()
    headers = _student("alice", "5")
    end = time.monotonic() + 8
    while time.monotonic() < end:
        _, rule = await _ask(session, base, "/classroom/arts/drawing", **headers)
        seen.add(rule)
        await asyncio.sleep(0.25)
    return seen


async def _stream_cut_then_next_lesson(session: aiohttp.ClientSession, base: str) -> float:
    """A lesson stream the gateway must end at the 2 s limit; then, after the
    break, a new lesson.  Returns how long the stream lasted."""
    headers = _student("carol", "8")
    t0 = time.monotonic()
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with session.get(
            base + STREAM_PATH, headers=headers, timeout=aiohttp.ClientTimeout(total=15)
        ) as resp:
            assert resp.status == 200
            async for _ in resp.content.iter_any():
                pass
    lasted = time.monotonic() - t0
    await asyncio.sleep(2.5)
    assert await _ask(session, base, "/classroom/arts/x", **headers) == (200, None)
    return lasted


@pytest.mark.slow
async def test_e2e_every_dashboard_panel_has_data_from_a_live_gateway(
    tmp_path: Path, private_redis: Any
) -> None:
    """A real Prometheus scraping a real gateway (with Redis) that has served
    traffic through every rule returns data for every dashboard panel and
    every recording rule, and evaluates every rule without error."""
    tutorgate = _tutorgate()
    upstream_port, listen_port, admin_port = _free_port(), _free_port(), _free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(_e2e_policy(), sort_keys=False))
    upstream = await _start_upstream(upstream_port)
    env = os.environ | {"TUTORGATE_ID_SECRET": "e2e-secret-" + "x" * 32}
    gateway = _Process(
        "tutorgate",
        [
            tutorgate,
            "serve",
            "--policy",
            str(policy),
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--listen",
            f"127.0.0.1:{listen_port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
            "--redis",
            private_redis.url,
        ],
        tmp_path / "gateway.log",
        env=env,
    )
    prom_config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "tutorgate", "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}]}
        ],
    }
    try:
        await asyncio.to_thread(_wait_http_ok, f"http://127.0.0.1:{admin_port}/healthz", gateway)
        with _prometheus(tmp_path / "prometheus", prom_config) as prom:
            # a first scrape before any traffic: later increments then show in increase()
            await asyncio.to_thread(_wait_scraped, prom)
            base = f"http://127.0.0.1:{listen_port}"
            async with aiohttp.ClientSession() as session:
                singles = [
                    ("/api/photo-search?q=1", {}, (403, "forbidden_feature")),
                    ("/classroom/arts/a", {}, (401, "identity_required")),
                    ("/classroom/arts/a", _student("bob", "13"), (400, "bad_identity")),
                    ("/classroom/arts/a", _student("kid", "preschool"), (403, "preschool")),
                    ("/classroom/arts/a", _student("dan", "9", "650000"), (403, "curfew")),
                    ("/classroom/subject/math", _student("erin", "3"), (403, "rest_day")),
                    ("/classroom/arts/a", _student("gus", "10", "999999"), (200, None)),
                    ("/plain/ok", {}, (200, None)),
                    ("/plain/broken", {}, (502, "upstream_error")),
                ]
                for path, headers, expected in singles:
                    got = await _ask(session, base, path, **headers)
                    assert got == expected, f"{path} {headers}: {got} != {expected}"
                seen, lasted = await asyncio.gather(
                    _lesson_then_break_then_limit(session, base),
                    _stream_cut_then_next_lesson(session, base),
                )
            assert {None, "break_required", "daily_limit"} <= seen, seen
            assert lasted < 4, f"the lesson stream was not cut at the 2 s limit ({lasted:.1f}s)"
            # increase() and rate() need two samples of each series: wait out
            # three 1 s scrapes and rule evaluations after the last request.
            await asyncio.sleep(3.5)

            empty = []
            for board, title, target in _dashboard_targets():
                body = await asyncio.to_thread(
                    _prom_get, prom, "/api/v1/query", query=_concrete(target["expr"])
                )
                assert body["status"] == "success", (title, body)
                if not body["data"]["result"]:
                    empty.append(f"{board}: {title!r}: {target['expr']}")
            rules = (await asyncio.to_thread(_prom_get, prom, "/api/v1/rules"))["data"]
            for group in rules["groups"]:
                for rule in group["rules"]:
                    assert rule["health"] == "ok", rule
                    if rule["type"] == "recording":
                        body = await asyncio.to_thread(
                            _prom_get, prom, "/api/v1/query", query=rule["name"]
                        )
                        if not body["data"]["result"]:
                            empty.append(f"recording rule {rule['name']}")
            assert empty == [], "no data for:\n" + "\n".join(empty)
    finally:
        gateway.stop()
        await upstream.cleanup()
