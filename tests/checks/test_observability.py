"""Metrics, alert rules, the dashboard and logs (docs/observability.md)."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest

# Import every module that defines metrics, so the registry knows them all.
import splitfed.clients.openai_api
import splitfed.security.authz
import splitfed.security.perturbation
import splitfed.services.aggregator.federation
import splitfed.services.backbone.state
import splitfed.services.keymanager.authority  # noqa: F401
from splitfed import metrics
from splitfed.logs import ContextFilter, JsonFormatter, log_context, setup_logging
from splitfed.services.aggregator import metrics as aggregator_metrics
from splitfed.services.backbone import metrics as backbone_metrics
from splitfed.services.keymanager import metrics as keymanager_metrics
from splitfed.serving import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (Debian/Ubuntu: apt-get install prometheus)"
)
METRIC_NAME = re.compile(r"\bsplitfed_[a-z0-9_]+\b")


def families() -> dict[str, str]:
    """splitfed metric family -> type, as registered."""
    return {
        family.name: family.type
        for family in REGISTRY.collect()
        if family.name.startswith("splitfed_")
    }


def series_names() -> set[str]:
    """Every series name the splitfed metrics expose (counters as ``_total``)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "gauge": ("",),
    }
    return {name + s for name, kind in families().items() for s in suffixes[kind]}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, check=False
    )


# --- names and exposition ---------------------------------------------------------------


def test_metric_names_follow_the_conventions() -> None:
    for name, kind in families().items():
        assert re.fullmatch(r"splitfed_[a-z][a-z0-9_]*", name), name
        assert not name.endswith("_total"), name  # prometheus_client adds it to counters
        if kind == "histogram":  # in base units, or named by what it counts
            assert name.endswith(("_seconds", "_bytes", "_sessions", "_tokens")), name


@needs_promtool
def test_exposition_passes_promtool() -> None:
    # Give labelled metrics a series each, so that every family is in the output.
    metrics.RPCS.labels("s", "m", "OK").inc(0)
    metrics.RPC_SECONDS.labels("s", "m", "OK").observe(0.01)
    backbone_metrics.COMPUTE_SECONDS.labels("forward").observe(0.01)
    aggregator_metrics.AGGREGATION_SECONDS.labels("f").observe(0.1)
    keymanager_metrics.CERTIFICATES_ISSUED.labels("client", "enroll").inc(0)
    result = promtool("check", "metrics", stdin=generate_latest().decode())
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_list_every_metric() -> None:
    text = (ROOT / "docs" / "observability.md").read_text()
    documented = set(re.findall(r"^\| `(splitfed_[a-z0-9_]+)`", text, re.MULTILINE))
    exposed = {name + ("_total" if kind == "counter" else "") for name, kind in families().items()}
    assert documented == exposed


# --- alert rules and dashboard ---------------------------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    result = promtool("check", "rules", str(MONITORING / "alerts.rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_use_existing_metrics() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.rules.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert exprs
    known = series_names()
    for expr in exprs:
        used = set(METRIC_NAME.findall(expr))
        assert used, expr
        assert used <= known, used - known


def _dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[str]:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["query"]["query"]


def test_dashboard_is_valid_and_uses_existing_metrics() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    known = series_names()
    used: set[str] = set()
    for expr in _dashboard_exprs(dashboard):
        names = set(METRIC_NAME.findall(expr))
        assert names, expr
        assert names <= known, names - known
        used |= names
    # Every family has a panel.
    assert {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used} >= set(families())


# --- the call interceptor --------------------------------------------------------------


class FakeContext:
    """What the interceptor reads of a grpc.ServicerContext."""

    def __init__(self, active: bool = True) -> None:
        self._code: grpc.StatusCode | None = None
        self.active = active

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        raise RuntimeError(details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def is_active(self) -> bool:
        return self.active


@dataclass
class Details:
    method: str


def intercepted(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> Any:
    wrapped = metrics.RpcMetricsInterceptor().intercept_service(
        lambda _: handler, Details(f"/test.v1.Svc/{method}")
    )
    assert wrapped is not None
    return wrapped


def count(method: str, code: str) -> float:
    labels = {"service": "test.v1.Svc", "method": method, "code": code}
    return REGISTRY.get_sample_value("splitfed_rpcs_total", labels) or 0.0


def test_interceptor_counts_calls_by_status_code() -> None:
    def ok(request: Any, context: Any) -> str:
        return "pong"

    def denied(request: Any, context: Any) -> str:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        return "unreachable"

    def broken(request: Any, context: Any) -> str:
        raise ValueError("bug")

    before = (count("Ok", "OK"), count("Denied", "PERMISSION_DENIED"), count("Bug", "UNKNOWN"))
    assert intercepted(grpc.unary_unary_rpc_method_handler(ok), "Ok").unary_unary(
        None, FakeContext()
    ) == ("pong")
    with pytest.raises(RuntimeError):
        intercepted(grpc.unary_unary_rpc_method_handler(denied), "Denied").unary_unary(
            None, FakeContext()
        )
    with pytest.raises(ValueError, match="bug"):
        intercepted(grpc.unary_unary_rpc_method_handler(broken), "Bug").unary_unary(
            None, FakeContext()
        )
    after = (count("Ok", "OK"), count("Denied", "PERMISSION_DENIED"), count("Bug", "UNKNOWN"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
    seconds = REGISTRY.get_sample_value(
        "splitfed_rpc_duration_seconds_count",
        {"service": "test.v1.Svc", "method": "Ok", "code": "OK"},
    )
    assert seconds is not None and seconds >= 1


def test_interceptor_counts_streams_when_they_end() -> None:
    def stream(requests: Iterator[int], context: Any) -> Iterator[int]:
        for request in requests:
            yield request * 2

    handler = intercepted(grpc.stream_stream_rpc_method_handler(stream), "Stream")
    in_flight = {"service": "test.v1.Svc", "method": "Stream"}
    before_ok, before_cancelled = count("Stream", "OK"), count("Stream", "CANCELLED")
    assert list(handler.stream_stream(iter([1, 2]), FakeContext())) == [2, 4]
    responses = handler.stream_stream(iter([1, 2, 3]), FakeContext())
    assert next(responses) == 2
    assert REGISTRY.get_sample_value("splitfed_rpcs_in_flight", in_flight) == 1
    responses.close()  # the stream stopped being read: the peer went away
    assert count("Stream", "OK") == before_ok + 1
    assert count("Stream", "CANCELLED") == before_cancelled + 1
    assert REGISTRY.get_sample_value("splitfed_rpcs_in_flight", in_flight) == 0


# --- state read when scraped -----------------------------------------------------------


@dataclass
class Row:
    identity: str
    role: str
    not_after: float
    revoked_at: float | None = None


class FakeStore:
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def certificates(self, identity: str = "") -> list[Row]:
        return self.rows


def test_certificate_gauges_count_states_and_the_first_identity_to_run_out() -> None:
    now = time.time()
    store = FakeStore(
        [
            # backbone-0 renewed: its older certificate expires first but does not count.
            Row("backbone-0", "backbone", now + 100),
            Row("backbone-0", "backbone", now + 5000),
            Row("backbone-1", "backbone", now + 3000),
            Row("hospital-a", "client", now + 700, revoked_at=now - 1),
            Row("hospital-b", "client", now - 10),  # expired: not counted
        ]
    )
    keymanager_metrics.CERTIFICATE_SOURCES.add(store)
    try:

        def sample(name: str, **labels: str) -> float | None:
            return REGISTRY.get_sample_value(name, labels)

        count_name = "splitfed_keymanager_certificates"
        assert sample(count_name, role="backbone", state="valid") == 3
        assert sample(count_name, role="client", state="revoked") == 1
        assert sample(count_name, role="client", state="valid") is None
        expiry = sample("splitfed_keymanager_certificate_expiry_seconds", role="backbone")
        assert expiry is not None and 2990 < expiry <= 3000
    finally:
        keymanager_metrics.CERTIFICATE_SOURCES.discard(store)


# --- settings and the endpoint ---------------------------------------------------------


def test_metrics_settings_are_validated() -> None:
    assert ServerSettings().metrics_endpoint() is None
    assert ServerSettings(listen="0.0.0.0:50051", metrics_port=9090).metrics_endpoint() == (
        "0.0.0.0",
        9090,
    )
    assert ServerSettings(metrics_port=0).metrics_endpoint("10.0.0.1:1") == ("10.0.0.1", 0)
    with pytest.raises(ValueError, match="metrics_port"):
        ServerSettings(metrics_port=70000)
    with pytest.raises(ValueError, match="port"):
        metrics.MetricsSettings(port=-1)
    assert metrics.start_metrics(metrics.MetricsSettings()) is None


def test_endpoint_on_a_free_port_serves_the_registry() -> None:
    server = metrics.start_metrics(metrics.MetricsSettings(port=0))
    assert server is not None
    try:
        assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.close()
    assert "# TYPE splitfed_rpcs_total counter" in text
    assert "_created" not in text


# --- logs -------------------------------------------------------------------------------


def record(message: str) -> logging.LogRecord:
    made = logging.LogRecord("splitfed.test", logging.INFO, __file__, 1, message, (), None)
    assert ContextFilter().filter(made)
    return made


def test_log_context_nests_and_resets() -> None:
    with log_context(session="s1"):
        with log_context(federation="fed", round=2):
            inner = record("inner")
        outer = record("outer")
    after = record("after")
    assert inner.context_fields == {"session": "s1", "federation": "fed", "round": 2}
    assert inner.context == " [session=s1 federation=fed round=2]"
    assert outer.context == " [session=s1]"
    assert after.context == "" and after.context_fields == {}


def test_json_lines_carry_the_context() -> None:
    with log_context(session="abc", round=3):
        made = record("trained %d steps")
    made.args = (4,)
    made.msg = "trained %d steps"
    entry = json.loads(JsonFormatter().format(made))
    assert entry["message"] == "trained 4 steps"
    assert entry["level"] == "info" and entry["logger"] == "splitfed.test"
    assert entry["session"] == "abc" and entry["round"] == 3
    assert entry["time"].endswith("+00:00")


def test_setup_logging_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    stream = io.StringIO()
    setup_logging("info", "json", stream=stream)
    with log_context(session="xyz"):
        logging.getLogger("splitfed.test").info("[Test] hello %s", "world")
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "[Test] hello world" and entry["session"] == "xyz"
    with pytest.raises(ValueError, match="log format"):
        setup_logging("info", "xml")
