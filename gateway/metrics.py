"""Every Prometheus object tutorgate exports, in one place.

Labels are bounded on purpose (regulators read these, and a per-student
label would both leak and explode): rule codes, categories, decisions,
connection kinds, job names, and regions from the policy's closed list
("base" for students without one, "other" for codes the policy lacks).
Never an id, an IP or a raw path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .codes import ENFORCING, LESSON_DENIALS, Rule

# The *_created series double the exposition for no regulator's question.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Lesson lengths around the 30-minute limit get fine buckets: a regulator
# asks "what share of lessons stayed within 30 minutes".
LESSON_BUCKETS = (60, 300, 600, 900, 1200, 1500, 1740, 1800, 1830, 1860, 2400, 3600, 7200)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _Cell:
    """One labelled series of a FastCounter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class FastCounter(Collector):
    """A labelled counter for the per-request hot path.

    prometheus_client's Counter takes a lock and checks its state on every
    increment; the gateway increments from one event-loop thread only, so a
    plain float per series does, read at scrape time. The exposition is the
    same as a Counter's.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        # the names prometheus_client's own metrics carry, for tools that read them
        self._name = name.removesuffix("_total")
        self._labelnames = self.labelnames
        self._cells: dict[tuple[str, ...], _Cell] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Cell:
        cell = self._cells.get(values)
        if cell is None:  # checked once per series, not on every call
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            cell = self._cells[values] = _Cell()
        return cell

    def collect(self) -> Iterable[Metric]:
        fam = CounterMetricFamily(self.name.removesuffix("_total"), self.documentation,
                                  labels=self.labelnames)
        for values, cell in list(self._cells.items()):
            fam.add_metric(list(values), cell.value)
        yield fam


class _Buckets:
    """One labelled series of a FastHistogram: cumulative at collect time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class FastHistogram(Collector):
    """A labelled histogram for the per-request hot path (see FastCounter);
    same exposition as prometheus_client's Histogram."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = self._name = name
        self.documentation = documentation
        self.labelnames = self._labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._series: dict[tuple[str, ...], _Buckets] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Buckets:
        series = self._series.get(values)
        if series is None:  # checked once per series, not on every call
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            series = self._series[values] = _Buckets(self.bounds)
        return series

    def collect(self) -> Iterable[Metric]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, s in list(self._series.items()):
            cumulative, running = [], 0
            for bound, n in zip((*self.bounds, float("inf")), s.counts, strict=True):
                running += n
                cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
            fam.add_metric(list(values), cumulative, s.sum)
        yield fam


class Metrics:
    """One instance per process (or per test app, on its own registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = FastCounter(
            "tutorgate_decisions_total",
            "Decisions on enforced routes (decision=allow|deny|shadow_deny).",
            ["decision", "rule", "category", "region"], registry=r)
        self.connections_cut = Counter(
            "tutorgate_connections_cut_total",
            "Live lesson connections (WebSockets, streams) closed by the gateway.",
            ["rule", "kind"], registry=r)
        self.active_lessons = Gauge(
            "tutorgate_active_lessons",
            "Students with a lesson in progress, as this instance has seen them.", registry=r)
        self.students_in_break = Gauge(
            "tutorgate_students_in_break",
            "Students this instance saw whose break is not over yet.", registry=r)
        self.open_connections = Gauge(
            "tutorgate_open_lesson_connections",
            "Open lesson connections on this instance.", ["kind"], registry=r)
        self.lessons_started = Counter(
            "tutorgate_lessons_started_total", "Lessons started.", ["region"], registry=r)
        self.lesson_duration = Histogram(
            "tutorgate_lesson_duration_seconds",
            "How long finished lessons really lasted (start to last activity or cut).",
            ["region"], buckets=LESSON_BUCKETS, registry=r)
        self.breaks_honoured = Counter(
            "tutorgate_breaks_total",
            "Breaks between lessons, by whether the next lesson waited min_break.",
            ["honoured"], registry=r)
        self.upstream_latency = FastHistogram(
            "tutorgate_upstream_latency_seconds",
            "Time to the upstream's response headers.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter(
            "tutorgate_upstream_errors_total",
            "Upstream unreachable, broken or timed out.", ["reason"], registry=r)
        self.store_latency = FastHistogram(
            "tutorgate_store_latency_seconds", "State store call latency.", ["op"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.store_errors = Counter(
            "tutorgate_store_errors_total", "State store calls that failed.", ["op"], registry=r)
        self.store_up = Gauge(
            "tutorgate_store_up", "1 when the state store answered its last call.", registry=r)
        self.lesson_reports_dropped = Counter(
            "tutorgate_lesson_reports_dropped_total",
            "Lessons this instance stopped watching for their end report because it "
            "watched too many (the oldest goes); such an end is reported only if the "
            "student starts another lesson.", registry=r)
        self.fail_open = Counter(
            "tutorgate_fail_open_total",
            "Lesson requests let through unchecked because the state store was down "
            "and the policy says fail_open.", ["category"], registry=r)
        self.policy_info = Gauge(
            "tutorgate_policy_info", "The live policy (value 1).", ["version", "sha"], registry=r)
        self.policy_reloads = Counter(
            "tutorgate_policy_reloads_total", "Policies applied after start.", registry=r)
        self.policy_reload_failures = Counter(
            "tutorgate_policy_reload_failures_total",
            "Reloads refused (invalid policy); the old one stayed live.", registry=r)
        self.calendar_covered_until = Gauge(
            "tutorgate_calendar_covered_until_timestamp",
            "Unix time of the end of the last day the holiday calendar covers.", registry=r)
        self.calendar_provisional = Gauge(
            "tutorgate_calendar_provisional",
            "1 while today (in some profile's time zone) lies beyond the official holiday "
            "calendar: rest days are the law's statutory days and weekends, provisionally.",
            registry=r)
        self.unknown_region = Counter(
            "tutorgate_unknown_region_total",
            "Requests whose region code the policy does not list (base policy used).", registry=r)
        self.scheduler_failures = Counter(
            "tutorgate_scheduler_job_failures_total", "Scheduled jobs that raised.",
            ["task"],  # not "job": Prometheus's own target label
            registry=r)
        self.cut_lateness = Histogram(
            "tutorgate_cut_lateness_seconds",
            "Actual close time of a cut connection minus its deadline.",
            buckets=LATENESS_BUCKETS, registry=r)
        self.audit_failures = Counter(
            "tutorgate_audit_write_failures_total", "Audit events that could not be written.",
            registry=r)
        # The connection layer (server.py): slow, idle and surplus clients.
        self.client_connections = Gauge(
            "tutorgate_client_connections", "Open client connections on the main port.",
            registry=r)
        self.connections_refused = Counter(
            "tutorgate_connections_refused_total",
            "Client connections closed at TUTORGATE_MAX_CONNECTIONS: a new one refused "
            "(limit) or an older one that had no request under way closed for it (evicted).",
            ["reason"], registry=r)
        self.client_timeouts = Counter(
            "tutorgate_client_timeouts_total",
            "Client connections closed for slowness: the request head not complete within "
            "TUTORGATE_HEADER_TIMEOUT (head), or idle past TUTORGATE_KEEPALIVE_TIMEOUT (idle).",
            ["kind"], registry=r)
        self.malformed_requests = Counter(
            "tutorgate_malformed_requests_total",
            "Requests refused with 4xx before routing (malformed HTTP, oversized head), by "
            "the parser's error class.", ["kind"], registry=r)
        for reason in ("limit", "evicted"):
            self.connections_refused.labels(reason)
        for kind in ("head", "idle"):
            self.client_timeouts.labels(kind)
        self.audit_dropped = Counter(
            "tutorgate_audit_dropped_total",
            "Audit events lost unwritten: the buffer's bound was hit (Redis down for long) "
            "or they were still buffered at shutdown.", ["reason"], registry=r)
        self.authz_checks = Counter(
            "tutorgate_authz_checks_total",
            "Questions an ingress asked the decision service (/_tutorgate/authz), by "
            "answer: pass (route not enforced), allow or deny.", ["answer"], registry=r)
        for answer in ("pass", "allow", "deny"):
            self.authz_checks.labels(answer)

    def prime(self, region_labels: Sequence[str], shadowed: Sequence[str] = ()) -> None:
        """Create the series a dashboard asks about before their first event.

        A labelled counter only exists from its first increment, and
        `increase()` never counts that first step: without this a single
        photo-search attempt would show as 0 on the regulator's dashboard.
        """
        for region in region_labels:
            self.decisions.labels("deny", Rule.FORBIDDEN_FEATURE, "forbidden", region)
            for category in ("subject", "non_subject"):
                self.decisions.labels("allow", "none", category, region)
                for rule in LESSON_DENIALS:
                    self.decisions.labels("deny", rule, category, region)
                for code in shadowed:
                    self.decisions.labels("shadow_deny", code, category, region)
            self.decisions.labels("deny", Rule.REST_DAY, "subject", region)
            self.lessons_started.labels(region)
            self.lesson_duration.labels(region)
        # a refused path matches no route and reads no identity
        self.decisions.labels("deny", Rule.BAD_PATH, "none", "base")
        for honoured in ("true", "false"):
            self.breaks_honoured.labels(honoured)
        for rule in sorted(ENFORCING):
            for kind in ("websocket", "stream"):
                self.connections_cut.labels(rule, kind)
        for kind in ("websocket", "stream"):
            self.open_connections.labels(kind)
        for category in ("subject", "non_subject"):
            self.fail_open.labels(category)
        for reason in ("connect", "broken", "timeout"):
            self.upstream_errors.labels(reason)
        for route in ("passthrough", "lesson", "forbidden"):
            self.upstream_latency.labels(route)
