"""Build the Grafana dashboards in deploy/grafana/dashboards/ as code.

    python deploy/grafana/build.py                # write the JSON files beside the provisioning
    python deploy/grafana/build.py --out DIR      # write them elsewhere
    python deploy/grafana/build.py --check        # exit 1 if the committed files are stale

Every dashboard is made with Grafana's own builders (`grafana-foundation-sdk`,
the `dashboards` extra: `pip install -e '.[dashboards]'`), so its JSON has the
shape of Grafana's dashboard schema rather than a hand-written guess of it.
Each dashboard exists twice, in English (`regulator.json`, `operator.json`)
and in Chinese (`regulator.zh-CN.json`, `operator.zh-CN.json`): one panel list
below makes both, so their queries and layout cannot drift apart; only the
words differ.  Rule codes, label values and metric names stay as the gateway
writes them (they are the contract); the Chinese descriptions gloss them.

The queries are the ones docs/metrics.md documents; tests/test_deploy.py runs
each one against a real Prometheus scraping a real gateway.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from grafana_foundation_sdk.builders import bargauge, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

Lang = Literal["en", "zh-CN"]
LANGS: tuple[Lang, ...] = ("en", "zh-CN")
OUT_DIR = Path(__file__).resolve().parent / "dashboards"

# The datasource provisioning/datasources/prometheus.yml creates.
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="prometheus")


@dataclass(frozen=True)
class Text:
    """One piece of dashboard text in both languages."""

    en: str
    zh: str

    def __call__(self, lang: Lang) -> str:
        return self.zh if lang == "zh-CN" else self.en


def same(text: str) -> Text:
    """Text that reads the same in both languages (a label template, a quantile)."""
    return Text(text, text)


@dataclass(frozen=True)
class Query:
    expr: str
    legend: Text = field(default_factory=lambda: same("__auto"))
    format: PromQueryFormat | None = None


@dataclass(frozen=True)
class Panel:
    """What a panel shows; `render` turns it into a Grafana panel in one language."""

    kind: Literal["stat", "timeseries", "bargauge", "table"]
    title: Text
    description: Text
    grid: tuple[int, int, int, int]  # x, y, w, h on Grafana's 24-column grid
    queries: Sequence[Query]
    unit: str | None = None
    decimals: int | None = None
    # (from value, colour); the first step starts at minus infinity (None)
    steps: Sequence[tuple[float | None, str]] = ((None, "green"),)
    min: float | None = None
    max: float | None = None
    mappings: dict[str, tuple[Text, str]] | None = None  # value -> (text, colour)
    stat_text: common.BigValueTextMode = common.BigValueTextMode.AUTO


@dataclass(frozen=True)
class Board:
    name: str  # file stem
    uid: str
    title: Text
    description: Text
    tags: Sequence[str]
    refresh: str
    since: str  # time range start, e.g. now-1h
    panels: Sequence[Panel]


# ---------------------------------------------------------------- operator

OPERATOR = Board(
    name="operator",
    uid="tutorgate-operator",
    title=Text("tutorgate · operations", "tutorgate · 运维"),
    description=Text(
        "Gateway health: upstream, state store, policy reloads, connection cut-offs, scheduler.",
        "网关运行状况：上游、状态存储（Redis）、策略重载、连接切断、定时任务。",
    ),
    tags=("tutorgate", "operator"),
    refresh="30s",
    since="now-1h",
    panels=(
        Panel(
            "stat",
            Text("Gateways up", "在线网关"),
            Text("Replicas Prometheus can scrape.", "Prometheus 能够抓取到的网关副本数。"),
            (0, 0, 4, 4),
            [Query('sum(up{job="tutorgate"})')],
            decimals=0,
        ),
        Panel(
            "stat",
            Text("State store", "状态存储"),
            Text(
                "DOWN when any replica's last state store call failed.",
                "任一网关副本最近一次调用状态存储（Redis）失败时显示“故障”。",
            ),
            (4, 0, 4, 4),
            [Query("min(tutorgate_store_up)")],
            steps=((None, "red"), (1, "green")),
            mappings={
                "0": (Text("DOWN", "故障"), "red"),
                "1": (Text("UP", "正常"), "green"),
            },
        ),
        Panel(
            "stat",
            Text("Upstream error ratio (5m)", "上游错误率（5 分钟）"),
            Text(
                "Upstream unreachable, broken or timed out (502/504) over all upstream attempts.",
                "上游不可达、连接中断或超时（502/504）占全部上游请求的比例。",
            ),
            (8, 0, 4, 4),
            [
                Query(
                    "(sum(rate(tutorgate_upstream_errors_total[5m])) or on() vector(0))"
                    " / ((sum(rate(tutorgate_upstream_errors_total[5m])) or on() vector(0))"
                    " + (sum(rate(tutorgate_upstream_latency_seconds_count[5m]))"
                    " or on() vector(0)))"
                )
            ],
            unit="percentunit",
            decimals=2,
            steps=((None, "green"), (0.05, "red")),
        ),
        Panel(
            "stat",
            Text("Policy reload failures (1h)", "策略重载失败（1 小时）"),
            Text(
                "Reloads refused because the new policy did not validate.",
                "因新策略未通过校验而被拒绝的重载次数（旧策略继续生效）。",
            ),
            (12, 0, 4, 4),
            [Query("sum(increase(tutorgate_policy_reload_failures_total[1h]))")],
            decimals=0,
            steps=((None, "green"), (1, "red")),
        ),
        Panel(
            "stat",
            Text("Calendar data left", "节假日数据剩余"),
            Text(
                "Time until the holiday calendar data runs out (alert below 30 days).",
                "距节假日日历数据用尽还有多久（少于 30 天时告警）。",
            ),
            (16, 0, 4, 4),
            [Query("min(tutorgate_calendar_covered_until_timestamp) - time()")],
            unit="s",
            steps=((None, "red"), (2592000, "green")),
        ),
        Panel(
            "stat",
            Text("Fail-open requests (5m)", "未经检查放行（5 分钟）"),
            Text(
                "Lesson requests let through unchecked (state store down, policy fail_open).",
                "状态存储不可用且策略为 fail_open 时，未经检查即放行的课程请求数。",
            ),
            (20, 0, 4, 4),
            [Query("sum(increase(tutorgate_fail_open_total[5m])) or on() vector(0)")],
            decimals=0,
            steps=((None, "green"), (1, "red")),
        ),
        Panel(
            "timeseries",
            Text("Upstream latency", "上游延迟"),
            Text("Time to the upstream's response headers.", "收到上游响应头所用的时间。"),
            (0, 4, 12, 8),
            [
                Query(
                    "histogram_quantile(0.5, sum by (le)"
                    " (rate(tutorgate_upstream_latency_seconds_bucket[5m])))",
                    same("p50"),
                ),
                Query(
                    "histogram_quantile(0.99, sum by (le)"
                    " (rate(tutorgate_upstream_latency_seconds_bucket[5m])))",
                    same("p99"),
                ),
            ],
            unit="s",
        ),
        Panel(
            "timeseries",
            Text("Upstream errors", "上游错误"),
            Text(
                "Upstream unreachable, broken or timed out, per second.",
                "上游不可达（connect）、连接中断（broken）或超时（timeout）的次数，每秒。",
            ),
            (12, 4, 12, 8),
            [
                Query(
                    "sum by (reason) (rate(tutorgate_upstream_errors_total[5m])) or on() vector(0)",
                    same("{{reason}}"),
                )
            ],
            unit="reqps",
        ),
        Panel(
            "timeseries",
            Text("State store latency", "状态存储延迟"),
            Text("State store call latency per operation.", "各操作调用状态存储的延迟。"),
            (0, 12, 12, 8),
            [
                Query(
                    "histogram_quantile(0.5, sum by (le, op)"
                    " (rate(tutorgate_store_latency_seconds_bucket[5m])))",
                    same("p50 {{op}}"),
                ),
                Query(
                    "histogram_quantile(0.99, sum by (le, op)"
                    " (rate(tutorgate_store_latency_seconds_bucket[5m])))",
                    same("p99 {{op}}"),
                ),
            ],
            unit="s",
        ),
        Panel(
            "timeseries",
            Text("State store errors and health", "状态存储错误与健康"),
            Text(
                "Failed state store calls per second, and each replica's store_up (1 = answering).",
                "每秒失败的状态存储调用数，以及各副本的 store_up（1 = 正常应答）。",
            ),
            (12, 12, 12, 8),
            [
                Query(
                    "sum by (op) (rate(tutorgate_store_errors_total[5m])) or on() vector(0)",
                    Text("errors/s {{op}}", "错误/秒 {{op}}"),
                ),
                Query(
                    "min by (instance) (tutorgate_store_up)",
                    Text("up {{instance}}", "正常 {{instance}}"),
                ),
            ],
        ),
        Panel(
            "timeseries",
            Text("Policy reloads", "策略重载"),
            Text(
                "Policies applied after start and reloads refused, per 5 minutes.",
                "启动后生效的策略数与被拒绝的重载数，每 5 分钟。",
            ),
            (0, 20, 12, 8),
            [
                Query(
                    "sum by (instance) (increase(tutorgate_policy_reloads_total[5m]))",
                    Text("applied {{instance}}", "已生效 {{instance}}"),
                ),
                Query(
                    "sum by (instance) (increase(tutorgate_policy_reload_failures_total[5m]))",
                    Text("refused {{instance}}", "被拒绝 {{instance}}"),
                ),
            ],
            decimals=0,
        ),
        Panel(
            "table",
            Text("Live policy per replica", "各副本生效的策略"),
            Text(
                "Version and hash of the policy each replica enforces.",
                "每个网关副本执行的策略版本（version）与哈希（sha）。",
            ),
            (12, 20, 12, 8),
            [
                Query(
                    "max by (instance, version, sha) (tutorgate_policy_info)",
                    format=PromQueryFormat.TABLE,
                )
            ],
        ),
        Panel(
            "timeseries",
            Text("Connection cut lateness", "连接切断延迟"),
            Text(
                "Close time of a cut lesson connection minus its deadline (alert: p99 > 0.25 s).",
                "被切断的课程连接实际关闭时间减去截止时间（告警：p99 > 0.25 秒）。",
            ),
            (0, 28, 12, 8),
            [
                Query(
                    "histogram_quantile(0.5, sum by (le)"
                    " (rate(tutorgate_cut_lateness_seconds_bucket[5m])))",
                    same("p50"),
                ),
                Query(
                    "histogram_quantile(0.99, sum by (le)"
                    " (rate(tutorgate_cut_lateness_seconds_bucket[5m])))",
                    same("p99"),
                ),
            ],
            unit="s",
            steps=((None, "green"), (0.25, "red")),
        ),
        Panel(
            "timeseries",
            Text("Connections cut", "被切断的连接"),
            Text(
                "Lesson connections closed by the gateway, per second.",
                "网关关闭的课程连接数，每秒；规则 lesson_limit = 课程时长上限，curfew = 宵禁。",
            ),
            (12, 28, 12, 8),
            [
                Query(
                    "sum by (rule, kind) (rate(tutorgate_connections_cut_total[5m]))"
                    " or on() vector(0)",
                    same("{{rule}} {{kind}}"),
                )
            ],
        ),
        Panel(
            "timeseries",
            Text("Open lesson connections", "打开的课程连接"),
            Text(
                "WebSockets and streams open on lesson routes, all replicas.",
                "课程路由上打开的 WebSocket 与流式连接，全部副本合计。",
            ),
            (0, 36, 12, 8),
            [
                Query(
                    "sum by (kind) (tutorgate_open_lesson_connections) or on() vector(0)",
                    same("{{kind}}"),
                )
            ],
            decimals=0,
        ),
        Panel(
            "timeseries",
            Text("Lessons and breaks per replica", "各副本的课程与休息"),
            Text(
                "Each replica's view of lessons in progress and students in a break.",
                "每个副本所见的进行中课程数与休息中学生数。",
            ),
            (12, 36, 12, 8),
            [
                Query(
                    "sum by (instance) (tutorgate_active_lessons)",
                    Text("lessons {{instance}}", "课程 {{instance}}"),
                ),
                Query(
                    "sum by (instance) (tutorgate_students_in_break)",
                    Text("in break {{instance}}", "休息中 {{instance}}"),
                ),
            ],
            decimals=0,
        ),
        Panel(
            "timeseries",
            Text("Scheduler job failures", "定时任务失败"),
            Text(
                "Scheduled jobs that raised, per 5 minutes.",
                "抛出异常的定时任务数，每 5 分钟。",
            ),
            (0, 44, 12, 8),
            [
                Query(
                    "sum by (task) (increase(tutorgate_scheduler_job_failures_total[5m]))"
                    " or on() vector(0)",
                    same("{{task}}"),
                )
            ],
            decimals=0,
        ),
        Panel(
            "timeseries",
            Text("Decisions per second", "每秒判定数"),
            Text(
                "Decisions on enforced routes by outcome and rule.",
                "受管路由上的判定，按结果（allow 放行、deny 拒绝、shadow_deny 影子拒绝）"
                "与规则划分。",
            ),
            (12, 44, 12, 8),
            [
                Query(
                    "sum by (decision, rule) (rate(tutorgate_decisions_total[5m]))",
                    same("{{decision}} {{rule}}"),
                )
            ],
            unit="reqps",
        ),
        Panel(
            "timeseries",
            Text("Audit write failures and unknown regions", "审计写入失败与未知地区"),
            Text(
                "Per 5 minutes: audit events lost, and requests whose region code the policy"
                " does not list (base policy used).",
                "每 5 分钟：丢失的审计事件数，以及地区代码未在策略中列出的请求数"
                "（按基础策略处理）。",
            ),
            (0, 52, 24, 8),
            [
                Query(
                    "sum(increase(tutorgate_audit_write_failures_total[5m]))",
                    Text("audit write failures", "审计写入失败"),
                ),
                Query(
                    "sum(increase(tutorgate_unknown_region_total[5m]))",
                    Text("unknown region codes", "未知地区代码"),
                ),
            ],
            decimals=0,
        ),
    ),
)


# ---------------------------------------------------------------- regulator

RULE_GLOSSARY = (
    "规则代码：curfew 宵禁，rest_day 休息日，break_required 休息未满，daily_limit 每日上限，"
    "preschool 学龄前，forbidden_feature 禁止的功能，identity_required 缺少学生身份，"
    "bad_identity 身份无效，bad_path 非法路径，state_unavailable 状态存储不可用；"
    "类别：subject 学科类，non_subject 非学科类。"
)
REGION_NOTE = "地区代码来自策略；base = 请求未带地区，other = 策略未列出的代码。"
SHARE_STEPS = ((None, "red"), (0.95, "orange"), (0.99, "green"))

REGULATOR = Board(
    name="regulator",
    uid="tutorgate-regulator",
    title=Text("tutorgate · compliance", "tutorgate · 合规监管"),
    description=Text(
        "Double Reduction online-lesson rules at a glance: lesson lengths, breaks, curfew,"
        " rest days, forbidden features. Metric catalogue: docs/metrics.md.",
        "“双减”线上培训规则执行一览：课程时长、课间休息、宵禁、休息日、禁止的功能。"
        "指标说明见 docs/metrics.md。",
    ),
    tags=("tutorgate", "regulator"),
    refresh="1m",
    since="now-24h",
    panels=(
        Panel(
            "stat",
            Text("Lessons started", "已开始的课程"),
            Text(
                "Lessons started in the selected time range, all regions.",
                "所选时间范围内开始的课程数，全部地区。",
            ),
            (0, 0, 4, 4),
            [Query("sum(increase(tutorgate_lessons_started_total[$__range])) or on() vector(0)")],
            decimals=0,
        ),
        Panel(
            "stat",
            Text("Lessons within 30 minutes", "30 分钟内结束的课程占比"),
            Text(
                "Share of finished lessons that lasted at most 30 minutes (histogram bucket"
                " le=1800). A lesson cut at the limit ends a fraction of a second after it and"
                " lands in the 1830 s bucket: see the distribution below.",
                "已结束课程中时长不超过 30 分钟的比例（直方图桶 le=1800）。在时长上限处被切断的"
                "课程会在上限后不到一秒结束，计入 1830 秒的桶：见下方的课程时长分布。",
            ),
            (4, 0, 4, 4),
            [
                Query(
                    'sum(increase(tutorgate_lesson_duration_seconds_bucket{le=~"1800|1800.0"}'
                    "[$__range])) / sum(increase(tutorgate_lesson_duration_seconds_count"
                    "[$__range]))"
                )
            ],
            unit="percentunit",
            decimals=1,
            steps=SHARE_STEPS,
        ),
        Panel(
            "stat",
            Text("Breaks honoured", "课间休息达标率"),
            Text(
                "Share of breaks between lessons that lasted at least min_break.",
                "两节课之间的休息时长达到 min_break 的比例。",
            ),
            (8, 0, 4, 4),
            [
                Query(
                    'sum(increase(tutorgate_breaks_total{honoured="true"}[$__range]))'
                    " / sum(increase(tutorgate_breaks_total[$__range]))"
                )
            ],
            unit="percentunit",
            decimals=1,
            steps=SHARE_STEPS,
        ),
        Panel(
            "stat",
            Text("Requests during curfew", "宵禁时段的请求"),
            Text(
                "Lesson requests made inside the curfew window (denied, or counted in shadow"
                " mode).",
                "在宵禁时段内发出的课程请求（已拒绝，或在影子模式下只计数）。",
            ),
            (12, 0, 4, 4),
            [
                Query(
                    'sum(increase(tutorgate_decisions_total{rule="curfew"}[$__range]))'
                    " or on() vector(0)"
                )
            ],
            decimals=0,
        ),
        Panel(
            "stat",
            Text("Subject classes on rest days", "休息日的学科类课程"),
            Text(
                "Attempts to attend subject classes on weekends, holidays and vacation days.",
                "在周末、法定节假日和寒暑假尝试参加学科类课程的次数。",
            ),
            (16, 0, 4, 4),
            [
                Query(
                    'sum(increase(tutorgate_decisions_total{rule="rest_day"}[$__range]))'
                    " or on() vector(0)"
                )
            ],
            decimals=0,
        ),
        Panel(
            "stat",
            Text("Photo-search attempts", "拍照搜题拦截"),
            Text(
                "Requests to forbidden features (photo search and any other route of kind"
                " forbidden).",
                "对被禁止功能的请求（拍照搜题及策略中其他 forbidden 类路由），均已拦截。",
            ),
            (20, 0, 4, 4),
            [
                Query(
                    'sum(increase(tutorgate_decisions_total{rule="forbidden_feature"}'
                    "[$__range])) or on() vector(0)"
                )
            ],
            decimals=0,
        ),
        Panel(
            "stat",
            Text("Students in a break now", "当前休息中的学生"),
            Text(
                "Students whose break is not over yet, summed over the gateway replicas' views.",
                "休息尚未结束的学生数，各网关副本所见之和（同一学生可能被计入两次）。",
            ),
            (0, 4, 4, 4),
            [Query("sum(tutorgate_students_in_break)")],
            decimals=0,
        ),
        Panel(
            "stat",
            Text("Lessons in progress", "进行中的课程"),
            Text(
                "Lessons running now, summed over the gateway replicas' views.",
                "当前进行中的课程数，各网关副本所见之和。",
            ),
            (4, 4, 4, 4),
            [Query("sum(tutorgate_active_lessons)")],
            decimals=0,
        ),
        Panel(
            "stat",
            Text("Shadow denials (not enforced)", "影子模式拒绝（未执行）"),
            Text(
                "Requests a rule would have denied but let through because the policy runs"
                " that rule in shadow mode. Non-zero means a rule is not being enforced.",
                "规则本应拒绝、但因策略对该规则启用影子模式（shadow）而放行的请求。"
                "不为零即表示有规则未被执行。",
            ),
            (8, 4, 4, 4),
            [
                Query(
                    'sum(increase(tutorgate_decisions_total{decision="shadow_deny"}[$__range]))'
                    " or on() vector(0)"
                )
            ],
            decimals=0,
            steps=((None, "green"), (1, "red")),
        ),
        Panel(
            "stat",
            Text("Unchecked (fail-open) requests", "未经检查放行的请求"),
            Text(
                "Lesson requests let through unchecked because the state store was down and"
                " the policy says fail_open.",
                "状态存储不可用且策略为 fail_open 时，未经规则检查即放行的课程请求。"
                "不为零即表示规则曾暂停执行。",
            ),
            (12, 4, 4, 4),
            [Query("sum(increase(tutorgate_fail_open_total[$__range])) or on() vector(0)")],
            decimals=0,
            steps=((None, "green"), (1, "red")),
        ),
        Panel(
            "stat",
            Text("Calendar data covers until", "节假日数据覆盖至"),
            Text(
                "Last day the holiday calendar data covers (earliest over the replicas).",
                "节假日日历数据覆盖的最后一天（各副本中最早者）；此后的休息日无法确定。",
            ),
            (16, 4, 4, 4),
            [Query("min(tutorgate_calendar_covered_until_timestamp) * 1000")],
            unit="dateTimeAsIsoNoDateIfToday",
        ),
        Panel(
            "stat",
            Text("Live policy", "生效的策略"),
            Text(
                "The policy each replica enforces; more than one line means replicas disagree.",
                "各网关副本执行的策略版本与哈希；出现多行即表示副本之间策略不一致。",
            ),
            (20, 4, 4, 4),
            [
                Query(
                    "max by (version, sha) (tutorgate_policy_info)",
                    Text("version {{version}} · {{sha}}", "版本 {{version}} · {{sha}}"),
                )
            ],
            stat_text=common.BigValueTextMode.NAME,
        ),
        Panel(
            "bargauge",
            Text("Lessons started by region", "各地区已开始的课程"),
            Text(
                "Region codes from the policy; base = no region given, other = a code the"
                " policy does not list.",
                REGION_NOTE,
            ),
            (0, 8, 8, 8),
            [
                Query(
                    "sum by (region) (increase(tutorgate_lessons_started_total[$__range]))"
                    " or on() vector(0)",
                    same("{{region}}"),
                )
            ],
            decimals=0,
        ),
        Panel(
            "bargauge",
            Text("Lessons within 30 minutes by region", "各地区 30 分钟内结束的课程占比"),
            Text(
                "Share of finished lessons that lasted at most 30 minutes, per region.",
                "各地区已结束课程中时长不超过 30 分钟的比例。" + REGION_NOTE,
            ),
            (8, 8, 8, 8),
            [
                Query(
                    "sum by (region) (increase(tutorgate_lesson_duration_seconds_bucket"
                    '{le=~"1800|1800.0"}[$__range])) / sum by (region)'
                    " (increase(tutorgate_lesson_duration_seconds_count[$__range]))",
                    same("{{region}}"),
                )
            ],
            unit="percentunit",
            decimals=1,
            steps=SHARE_STEPS,
            min=0,
            max=1,
        ),
        Panel(
            "bargauge",
            Text("Lesson length distribution", "课程时长分布"),
            Text(
                "Finished lessons by length (seconds; the bucket bounds are finer around the"
                " 30-minute limit).",
                "已结束课程按时长分布（单位为秒；30 分钟上限附近的分档更细）。",
            ),
            (16, 8, 8, 8),
            [
                Query(
                    "sum by (le) (increase(tutorgate_lesson_duration_seconds_bucket[$__range]))",
                    Text("≤ {{le}} s", "≤ {{le}} 秒"),
                    format=PromQueryFormat.HEATMAP,
                )
            ],
            decimals=0,
        ),
        Panel(
            "bargauge",
            Text("Requests during curfew by region", "各地区宵禁时段的请求"),
            Text(
                "Lesson requests inside the curfew window, per region.",
                "各地区在宵禁时段内发出的课程请求。" + REGION_NOTE,
            ),
            (0, 16, 8, 8),
            [
                Query(
                    'sum by (region) (increase(tutorgate_decisions_total{rule="curfew"}'
                    "[$__range])) or on() vector(0)",
                    same("{{region}}"),
                )
            ],
            decimals=0,
        ),
        Panel(
            "bargauge",
            Text("Subject classes on rest days by region", "各地区休息日的学科类课程"),
            Text(
                "Subject-class attempts on weekends, holidays and vacation days, per region.",
                "各地区在周末、法定节假日和寒暑假尝试参加学科类课程的次数。" + REGION_NOTE,
            ),
            (8, 16, 8, 8),
            [
                Query(
                    'sum by (region) (increase(tutorgate_decisions_total{rule="rest_day"}'
                    "[$__range])) or on() vector(0)",
                    same("{{region}}"),
                )
            ],
            decimals=0,
        ),
        Panel(
            "bargauge",
            Text("Photo-search attempts by region", "各地区拍照搜题拦截"),
            Text(
                "Forbidden-feature requests, per region (base when the request carried none).",
                "各地区对被禁止功能的请求（请求未带地区时记为 base）。",
            ),
            (16, 16, 8, 8),
            [
                Query(
                    "sum by (region) (increase(tutorgate_decisions_total"
                    '{rule="forbidden_feature"}[$__range])) or on() vector(0)',
                    same("{{region}}"),
                )
            ],
            decimals=0,
        ),
        Panel(
            "bargauge",
            Text("Denials by rule and category", "按规则与类别的拒绝"),
            Text(
                "Denied requests by the rule that answered and the route category.",
                "被拒绝的请求，按作出判定的规则与路由类别划分。" + RULE_GLOSSARY,
            ),
            (0, 24, 12, 9),
            [
                Query(
                    "sum by (rule, category) (increase(tutorgate_decisions_total"
                    '{decision="deny"}[$__range])) or on() vector(0)',
                    same("{{rule}} · {{category}}"),
                )
            ],
            decimals=0,
        ),
        Panel(
            "bargauge",
            Text("Lessons cut by rule", "按规则切断的课程"),
            Text(
                "Live lesson connections (WebSockets, streams) the gateway closed at the lesson"
                " limit or at curfew.",
                "网关在课程时长上限或宵禁开始时关闭的课程连接（WebSocket、流式连接）。"
                "规则代码：lesson_limit 课程时长上限，curfew 宵禁。",
            ),
            (12, 24, 12, 9),
            [
                Query(
                    "sum by (rule) (increase(tutorgate_connections_cut_total[$__range]))"
                    " or on() vector(0)",
                    same("{{rule}}"),
                )
            ],
            decimals=0,
        ),
        Panel(
            "timeseries",
            Text("Decisions per second", "每秒判定数"),
            Text(
                "allow, deny and shadow_deny on enforced routes.",
                "受管路由上的判定：allow 放行，deny 拒绝，shadow_deny 影子模式拒绝（未执行）。",
            ),
            (0, 33, 12, 8),
            [
                Query(
                    "sum by (decision) (rate(tutorgate_decisions_total[5m]))",
                    same("{{decision}}"),
                )
            ],
            unit="reqps",
        ),
        Panel(
            "timeseries",
            Text("Lessons in progress and students in a break", "进行中的课程与休息中的学生"),
            Text("Summed over the gateway replicas' views.", "各网关副本所见之和。"),
            (12, 33, 12, 8),
            [
                Query(
                    "sum(tutorgate_active_lessons)",
                    Text("lessons in progress", "进行中的课程"),
                ),
                Query(
                    "sum(tutorgate_students_in_break)",
                    Text("students in a break", "休息中的学生"),
                ),
            ],
            decimals=0,
        ),
    ),
)

BOARDS = (OPERATOR, REGULATOR)


# ---------------------------------------------------------------- rendering


def _target(query: Query, ref: str, lang: Lang, instant: bool) -> prometheus.Dataquery:
    target = (
        prometheus.Dataquery()
        .datasource(DATASOURCE)
        .ref_id(ref)
        .expr(query.expr)
        .legend_format(query.legend(lang))
    )
    target = target.instant() if instant else target.range()
    if query.format is not None:
        target = target.format(query.format)
    return target


def _thresholds(panel: Panel) -> dashboard_builders.ThresholdsConfig:
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=v, color=c) for v, c in panel.steps])
    )


def _reduce_last() -> common_builders.ReduceDataOptions:
    return common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)


def render(panel: Panel, panel_id: int, lang: Lang) -> Builder[model.Panel]:
    """One Grafana panel in one language."""
    builder: stat.Panel | timeseries.Panel | bargauge.Panel | table.Panel
    if panel.kind == "stat":
        builder = (
            stat.Panel()
            .reduce_options(_reduce_last())
            .color_mode(common.BigValueColorMode.VALUE)
            .graph_mode(common.BigValueGraphMode.NONE)
            .text_mode(panel.stat_text)
            .justify_mode(common.BigValueJustifyMode.AUTO)
            .orientation(common.VizOrientation.AUTO)
        )
    elif panel.kind == "bargauge":
        builder = (
            bargauge.Panel()
            .reduce_options(_reduce_last())
            .display_mode(common.BarGaugeDisplayMode.BASIC)
            .orientation(common.VizOrientation.HORIZONTAL)
            .show_unfilled(True)
        )
    elif panel.kind == "table":
        builder = table.Panel().show_header(True)
    else:
        builder = (
            timeseries.Panel()
            .legend(
                common_builders.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .tooltip(
                common_builders.VizTooltipOptions()
                .mode(common.TooltipDisplayMode.MULTI)
                .sort(common.SortOrder.DESCENDING)
            )
        )
    x, y, w, h = panel.grid
    builder = (
        builder.id(panel_id)
        .title(panel.title(lang))
        .description(panel.description(lang))
        .datasource(DATASOURCE)
        .grid_pos(model.GridPos(x=x, y=y, w=w, h=h))
        .thresholds(_thresholds(panel))
    )
    instant = panel.kind != "timeseries"
    for ref, query in zip("ABCDEFGH", panel.queries, strict=False):
        builder = builder.with_target(_target(query, ref, lang, instant))
    if panel.unit is not None:
        builder = builder.unit(panel.unit)
    if panel.decimals is not None:
        builder = builder.decimals(panel.decimals)
    if panel.min is not None:
        builder = builder.min(panel.min)
    if panel.max is not None:
        builder = builder.max(panel.max)
    if panel.mappings:
        options = {
            value: model.ValueMappingResult(text=text(lang), color=colour)
            for value, (text, colour) in panel.mappings.items()
        }
        builder = builder.mappings([model.ValueMap(options=options)])
    return builder


def file_name(board: Board, lang: Lang) -> str:
    return f"{board.name}.json" if lang == "en" else f"{board.name}.{lang}.json"


def _uid(board: Board, lang: Lang) -> str:
    return board.uid if lang == "en" else f"{board.uid}-{lang.lower()}"


def dashboard(board: Board, lang: Lang) -> model.Dashboard:
    """The Grafana dashboard model of one board in one language."""
    other: Lang = "zh-CN" if lang == "en" else "en"
    builder = (
        dashboard_builders.Dashboard(board.title(lang))
        .uid(_uid(board, lang))
        .description(board.description(lang))
        .tags([*board.tags, lang])
        .timezone("browser")
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .refresh(board.refresh)
        .time(board.since, "now")
        # the same dashboard in the other language, one click away
        .link(
            dashboard_builders.DashboardLink("中文" if other == "zh-CN" else "English")
            .type(model.DashboardLinkType.LINK)
            .url(f"/d/{_uid(board, other)}")
            .keep_time(True)
            .include_vars(True)
            .icon("doc")
        )
    )
    if lang == "zh-CN":
        builder = builder.week_start("monday")
    for panel_id, panel in enumerate(board.panels, start=1):
        builder = builder.with_panel(render(panel, panel_id, lang))
    return builder.build()


def dashboard_json(board: Board, lang: Lang) -> str:
    """The file text: the SDK's own JSON encoding, Chinese kept readable."""
    text = json.dumps(dashboard(board, lang), cls=JSONEncoder, indent=2, ensure_ascii=False)
    return text + "\n"


def build_all() -> dict[str, str]:
    """File name -> text for every dashboard in every language."""
    return {file_name(b, lang): dashboard_json(b, lang) for b in BOARDS for lang in LANGS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="directory to write into")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file in --out differs"
    )
    args = parser.parse_args(argv)
    stale = 0
    for name, text in build_all().items():
        path: Path = args.out / name
        if args.check:
            old = path.read_text(encoding="utf-8") if path.exists() else ""
            if old != text:
                stale += 1
                sys.stdout.writelines(
                    difflib.unified_diff(
                        old.splitlines(keepends=True),
                        text.splitlines(keepends=True),
                        f"{path} (committed)",
                        f"{path} (built)",
                        n=1,
                    )
                )
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path)
    if stale:
        print(f"{stale} dashboard file(s) differ: run python {__file__}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
