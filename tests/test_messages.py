"""gateway/messages.py: the denial texts in zh-CN and en, the language choice,
and the gateway's denials speaking the language a request asks for."""

from __future__ import annotations

import json
import re

import pytest
from kit import FORBIDDEN, SUBJECT, policy_text

from gateway import messages
from gateway.errors import PolicyError
from gateway.policy import parse_policy
from gateway.responses import page

# Every rule code a denial can carry (the contract's table, upstream_error and
# body_too_large), written out here so a code missing from the tables fails.
RULE_CODES = ["bad_path", "forbidden_feature", "identity_required", "bad_identity",
              "preschool", "curfew", "rest_day", "daily_limit", "break_required",
              "state_unavailable", "upstream_error", "body_too_large"]
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.mark.parametrize("rule", RULE_CODES)
def test_every_rule_code_has_a_chinese_and_an_english_text(rule: str) -> None:
    """Each rule code has its own zh-CN text (Chinese) and en text (English)."""
    zh, en = messages.TEXTS[rule]["zh-CN"], messages.TEXTS[rule]["en"]
    for t in (zh.title, zh.message):
        assert CJK.search(t), t
    for t in (en.title, en.message):
        assert t.isascii() and t.strip() and not CJK.search(t), t
    assert messages.text(rule, "en") == en and messages.text(rule, "zh-CN") == zh


def test_unknown_rule_code_gets_a_generic_text() -> None:
    """A code without its own words still gets a sentence in the language asked for."""
    assert messages.text("no_such_rule", "en").message == "This page is not available."
    assert CJK.search(messages.text("no_such_rule", "zh-CN").message)


@pytest.mark.parametrize(("header", "default", "want"), [
    ("", "zh-CN", "zh-CN"),
    ("", "en", "en"),
    ("en", "zh-CN", "en"),
    ("en-US,en;q=0.9", "zh-CN", "en"),
    ("EN-gb", "zh-CN", "en"),
    ("zh", "en", "zh-CN"),
    ("zh-CN,zh;q=0.9,en;q=0.8", "en", "zh-CN"),
    ("zh-Hans-CN", "en", "zh-CN"),
    ("zh-TW", "en", "zh-CN"),             # Simplified is the only Chinese served
    ("fr-FR,fr;q=0.9", "en", "en"),        # nothing served named: the policy's
    ("fr-FR,fr;q=0.9", "zh-CN", "zh-CN"),
    ("fr,en;q=0.5,zh;q=0.8", "en", "zh-CN"),  # highest q wins, not the first
    ("en;q=0.8,zh;q=0.8", "zh-CN", "en"),     # a tie: the earlier
    ("zh;q=0,*", "zh-CN", "en"),           # * = anything not refused
    ("*", "en", "en"),
    ("en;q=0", "en", "en"),                # refusing everything served: the default
    ("en;q=abc,zh", "en", "zh-CN"),        # a malformed q drops that range only
    (" , ;q=1,", "en", "en"),
])
def test_choose_reads_accept_language(header: str, default: messages.Locale,
                                      want: str) -> None:
    """Accept-Language picks zh-CN or en by q-value, else the policy's locale."""
    assert messages.choose(header, default) == want


@pytest.mark.parametrize(("seconds", "zh", "en"), [
    (0, "0 秒", "0 s"),
    (59, "59 秒", "59 s"),
    (65, "1 分 5 秒", "1 min 5 s"),
    (45005, "12 小时 30 分钟", "12 h 30 min"),  # was "750 分 5 秒"
    (86400 * 3 + 7200 + 59, "3 天 2 小时", "3 d 2 h"),
])
def test_format_wait_reads_like_a_person(seconds: int, zh: str, en: str) -> None:
    """Long waits read in days/hours or hours/minutes, short ones in minutes/seconds."""
    assert messages.format_wait(seconds, "zh-CN") == zh
    assert messages.format_wait(seconds, "en") == en


def test_policy_locale_is_validated() -> None:
    """locale: only zh-CN or en; anything else is a problem with its line."""
    routes = "routes:\n  - {prefix: /a/, kind: lesson, category: subject}\n"
    assert parse_policy("version: 1\n" + routes, "p.yaml").locale == "zh-CN"
    assert parse_policy("version: 1\nlocale: en\n" + routes, "p.yaml").locale == "en"
    with pytest.raises(PolicyError) as info:
        parse_policy("version: 1\nlocale: fr\n" + routes, "p.yaml")
    assert info.value.lines() == ["p.yaml: locale: Input should be 'zh-CN' or 'en' (line 2)"]


def test_denial_page_has_language_wait_and_way_home() -> None:
    """The HTML page names its language, says the wait in hours, and links home."""
    zh = page("curfew", 45005, "zh-CN")
    assert '<html lang="zh-CN">' in zh and "12 小时 30 分钟" in zh and 'href="/"' in zh
    assert "返回首页" in zh and 'rel="icon"' in zh
    en = page("curfew", 45005, "en")
    assert '<html lang="en">' in en and "Please wait <b id=w>12 h 30 min</b>." in en
    assert "Back to the home page" in en and not CJK.search(en)


async def test_gateway_denials_follow_accept_language(upstream, gateways, http):
    """The JSON message and the page follow Accept-Language; the rule code never changes."""
    gw = await gateways(policy_text(), upstream.url)
    got = {}
    for lang in ("en-US,en;q=0.9", "zh-CN", "", "fr"):
        async with http.get(gw.url(FORBIDDEN), headers={"Accept-Language": lang}) as r:
            assert r.status == 403
            got[lang] = (json.loads(await r.read()), r.headers["Content-Language"])
    assert got["en-US,en;q=0.9"][0]["message"] == messages.TEXTS["forbidden_feature"]["en"].message
    assert got["zh-CN"][0]["message"] == messages.TEXTS["forbidden_feature"]["zh-CN"].message
    assert got[""][1] == got["fr"][1] == "zh-CN" and got["en-US,en;q=0.9"][1] == "en"
    assert {b["rule"] for b, _ in got.values()} == {"forbidden_feature"}
    async with http.get(gw.url(SUBJECT), headers={"Accept": "text/html",
                                                   "Accept-Language": "en"}) as r:
        text = await r.text()
        assert r.status == 401 and '<html lang="en">' in text and "Please sign in" in text


async def test_policy_locale_is_the_default_language(upstream, gateways, http):
    """With locale: en, a request naming no served language is answered in English."""
    gw = await gateways(policy_text(extra="locale: en"), upstream.url)
    for lang in ("", "de-DE"):
        async with http.get(gw.url(SUBJECT), headers={"Accept-Language": lang}) as r:
            body = json.loads(await r.read())
            assert r.status == 401 and body["rule"] == "identity_required"
            assert body["message"] == "A signed-in student is required for lessons."
    async with http.get(gw.url(SUBJECT), headers={"Accept-Language": "zh"}) as r:
        assert (await r.json())["message"] == "上课需要先登录学生账号。"


async def test_status_endpoint_speaks_the_language_too(upstream, gateways, http):
    """/_tutorgate/status's identity denial is JSON in the language asked for."""
    gw = await gateways(policy_text(), upstream.url)
    async with http.get(gw.url("/_tutorgate/status"),
                        headers={"Accept": "text/html", "Accept-Language": "en"}) as r:
        assert r.status == 401 and r.content_type == "application/json"
        assert (await r.json())["message"] == "A signed-in student is required for lessons."
