"""What a person reads: denial texts in zh-CN and en, and the language choice.

Pure: no I/O, no clock. The rule codes are the contract's and never change
with the language; only the words around them do. `responses.py` (HTML page
and JSON `message`) and `status.py` read their texts here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Locale = Literal["zh-CN", "en"]
LOCALES: Final[tuple[Locale, ...]] = ("zh-CN", "en")
DEFAULT_LOCALE: Final[Locale] = "zh-CN"


@dataclass(frozen=True, slots=True)
class Text:
    """One rule's words in one language: the page title and the sentence
    (the sentence is also the JSON `message`)."""

    title: str
    message: str


# Rule code -> locale -> text. Every code a denial can carry is here, in both
# languages (tests/test_messages.py holds the tables to that).
TEXTS: Final[dict[str, dict[Locale, Text]]] = {
    "bad_path": {
        "zh-CN": Text("网址无效", "这个网址的路径格式不正确，无法打开。"),
        "en": Text("Invalid address", "The request path is malformed and cannot be served."),
    },
    "forbidden_feature": {
        "zh-CN": Text("此功能不提供", "按照规定，平台不提供“拍照搜题”等功能。"),
        "en": Text("Feature not offered",
                   "This feature is not offered (photo search for answers and similar "
                   "features are forbidden)."),
    },
    "identity_required": {
        "zh-CN": Text("请先登录", "上课需要先登录学生账号。"),
        "en": Text("Please sign in", "A signed-in student is required for lessons."),
    },
    "bad_identity": {
        "zh-CN": Text("身份信息有误", "学生账号或年级信息格式不正确，请重新登录。"),
        "en": Text("Invalid student details", "The student id or grade is malformed."),
    },
    "preschool": {
        "zh-CN": Text("学龄前儿童不提供线上培训", "按照规定，不对学龄前儿童开展线上培训。"),
        "en": Text("No online training for preschool children",
                   "No online training for preschool children."),
    },
    "curfew": {
        "zh-CN": Text("今天的课程已结束", "线上培训每天结束时间已到，请早点休息。"),
        "en": Text("Classes are over for today", "Online training is closed for the night."),
    },
    "rest_day": {
        "zh-CN": Text("今天是休息日", "休息日、节假日和寒暑假不开展学科类培训。"),
        "en": Text("Today is a rest day",
                   "No subject classes on rest days, holidays or vacations."),
    },
    "daily_limit": {
        "zh-CN": Text("今天的上课时间已用完", "今天的线上学习时间已达上限，明天再来吧。"),
        "en": Text("Today's lesson time is used up", "Today's lesson time is used up."),
    },
    "break_required": {
        "zh-CN": Text("课间休息", "每节课后需要休息一会儿，起来活动活动，看看远处。"),
        "en": Text("Time for a break", "Time for a break before the next lesson."),
    },
    "state_unavailable": {
        "zh-CN": Text("服务暂时不可用", "系统暂时无法确认上课状态，请稍后再试。"),
        "en": Text("Service unavailable",
                   "Lesson state is unavailable; please try again shortly."),
    },
    "upstream_error": {
        "zh-CN": Text("服务暂时不可用", "课程服务没有响应，请稍后再试。"),
        "en": Text("Service unavailable", "The tutoring service did not answer."),
    },
    "body_too_large": {
        "zh-CN": Text("内容太大", "上传的内容超过了允许的大小。"),
        "en": Text("Request too large", "The request body is over the allowed size."),
    },
}

_FALLBACK: Final[dict[Locale, Text]] = {
    "zh-CN": Text("无法访问", "暂时无法访问这个页面。"),
    "en": Text("Not available", "This page is not available."),
}


@dataclass(frozen=True, slots=True)
class PageWords:
    """The words around a denial page, and the units of a wait (the page's
    countdown script speaks the same units as `wait`)."""

    html_lang: str
    wait: str          # "{time}" is replaced by the formatted wait
    home: str
    rule: str          # before the rule code, colon included
    day: str
    hour: str
    minute: str
    minute_short: str  # beside seconds
    second: str
    sep: str           # between number and unit


PAGE: Final[dict[Locale, PageWords]] = {
    "zh-CN": PageWords("zh-CN", "还需等待 {time}。", "返回首页", "规则：", "天", "小时", "分钟",
                       "分", "秒", " "),
    "en": PageWords("en", "Please wait {time}.", "Back to the home page", "rule: ", "d", "h",
                    "min", "min", "s", " "),
}


def text(rule: str, locale: Locale) -> Text:
    """The words for a rule code in a locale (a generic text for an unknown code)."""
    return TEXTS.get(rule, _FALLBACK).get(locale) or _FALLBACK[locale]


def format_wait(seconds: int, locale: Locale) -> str:
    """A wait as a person reads it: days and hours, hours and minutes, minutes
    and seconds, or seconds; never "750 分 5 秒"."""
    w = PAGE[locale]

    def u(n: int, unit: str) -> str:
        return f"{n}{w.sep}{unit}"

    s = max(seconds, 0)
    if s >= 86400:
        return f"{u(s // 86400, w.day)} {u(s % 86400 // 3600, w.hour)}"
    if s >= 3600:
        return f"{u(s // 3600, w.hour)} {u(s % 3600 // 60, w.minute)}"
    if s >= 60:
        return f"{u(s // 60, w.minute_short)} {u(s % 60, w.second)}"
    return u(s, w.second)


def _q(params: str) -> float | None:
    for p in params.split(";"):
        k, _, v = p.strip().partition("=")
        if k.strip().lower() == "q":
            try:
                return min(max(float(v), 0.0), 1.0)
            except ValueError:
                return None  # a malformed q: the range is ignored
    return 1.0


def _served(tag: str) -> Locale | None:
    primary = tag.split("-", 1)[0]
    if primary == "zh":
        # zh, zh-CN, zh-Hans, zh-SG, and zh-TW / zh-Hant / zh-HK too: the only
        # Chinese served is Simplified, which a Traditional reader still reads
        # better than English.
        return "zh-CN"
    if primary == "en":
        return "en"
    return None


def choose(accept_language: str, default: Locale = DEFAULT_LOCALE) -> Locale:
    """The locale for an `Accept-Language` value (RFC 9110 12.5.4): the served
    language with the highest q, the earlier on a tie. `*` stands for any
    language not refused (the default first); q=0 refuses a language; no
    header, or only languages not served, give `default`."""
    ranges: list[tuple[str, float]] = []
    for part in accept_language.split(","):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        q = _q(params)
        if tag and q is not None:
            ranges.append((tag, q))
    refused = {loc for tag, q in ranges if q == 0.0 and (loc := _served(tag)) is not None}
    best: Locale | None = None
    best_q = 0.0
    for tag, q in ranges:
        if tag == "*":
            loc = next((x for x in (default, *LOCALES) if x not in refused), None)
        else:
            loc = _served(tag)
        if loc is not None and loc not in refused and q > best_q:
            best, best_q = loc, q
    return best or default
