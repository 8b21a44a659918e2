"""One Prometheus exposition from several worker processes (`serve --workers N`).

Each worker keeps its own registry (the hot-path FastCounter and
FastHistogram collectors, gauges read by function at scrape time) and
serves it on a private socket; the supervisor scrapes them all and merges
the text here. prometheus_client's multiprocess mode was not used: it
knows neither our custom collectors nor `Gauge.set_function` (the values
live in the worker, never in its mmap files), and it would need one
PROMETHEUS_MULTIPROC_DIR on a writable filesystem that outlives workers.

How each type merges (docs/metrics.md, "Many workers"):
- counters and histograms: summed sample by sample (every worker uses the
  same buckets). A worker that died keeps its last scraped counts in
  `retired`, so the sums never go down when it is replaced: Prometheus
  would read a drop as a reset and count the whole total again.
- gauges: summed unless GAUGE_MODES says otherwise (per-process facts:
  the store is up only if it is up for every worker, and so on).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

Mode = Literal["sum", "min", "max"]

# Gauges that are not additive. Everything else (active lessons, students in
# a break, open connections, client connections) is summed: each worker
# counts what it holds.
GAUGE_MODES: dict[str, Mode] = {
    # the store is up when every worker reaches it
    "tutorgate_store_up": "min",
    # the earliest end of calendar data any worker runs on
    "tutorgate_calendar_covered_until_timestamp": "min",
    # provisional if any worker's today is beyond its calendar
    "tutorgate_calendar_provisional": "max",
    # each live policy once: two series (old and new sha) only mid-reload
    "tutorgate_policy_info": "max",
}
# Types whose values only grow in one process: kept after the process dies.
CUMULATIVE = frozenset({"counter", "histogram", "summary"})

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Family:
    name: str
    documentation: str
    type: str
    samples: dict[SampleKey, float] = field(default_factory=dict)


Families = dict[str, Family]


def parse(text: str) -> Families:
    """A worker's exposition, by family name (ValueError if malformed)."""
    out: Families = {}
    for m in text_string_to_metric_families(text):
        fam = out.setdefault(m.name, Family(m.name, m.documentation, m.type))
        for s in m.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            fam.samples[key] = fam.samples.get(key, 0.0) + s.value
    return out


def _fold(into: Families, fam: Family) -> None:
    mine = into.get(fam.name)
    if mine is None:
        into[fam.name] = Family(fam.name, fam.documentation, fam.type, dict(fam.samples))
        return
    mode: Mode = GAUGE_MODES.get(fam.name, "sum") if fam.type == "gauge" else "sum"
    for key, value in fam.samples.items():
        old = mine.samples.get(key)
        if old is None:
            mine.samples[key] = value
        elif mode == "sum":
            mine.samples[key] = old + value
        elif mode == "min":
            mine.samples[key] = min(old, value)
        else:
            mine.samples[key] = max(old, value)


class Merger:
    """Sums the live workers' expositions onto what retired workers counted."""

    def __init__(self) -> None:
        self.retired: Families = {}

    def retire(self, last: Families) -> None:
        """A worker is gone: keep its counters and histograms (not its
        gauges: what it held is not held any more)."""
        for fam in last.values():
            if fam.type in CUMULATIVE:
                _fold(self.retired, fam)

    def merge(self, live: Iterable[Families]) -> Families:
        out: Families = {}
        for fam in self.retired.values():
            _fold(out, fam)
        for families in live:
            for fam in families.values():
                _fold(out, fam)
        return out


def to_metrics(families: Families) -> Iterator[Metric]:
    """prometheus_client Metric objects, for a collector to yield."""
    for fam in families.values():
        m = Metric(fam.name, fam.documentation, fam.type)
        for (name, labels), value in fam.samples.items():
            m.add_sample(name, dict(labels), value)
        yield m


def total(families: Families, sample: str) -> float:
    """The sum of one sample name's values over all its label sets."""
    name = sample.removesuffix("_total")
    fam = families.get(name) or families.get(sample)
    if fam is None:
        return 0.0
    return sum(v for (n, _), v in fam.samples.items() if n == sample)
