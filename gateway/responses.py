"""Denial responses: JSON for API clients, a short Chinese page for browsers."""

from __future__ import annotations

import html
import json
import math

from aiohttp import web

from . import rules

# What a student reads (the JSON message stays English for API clients).
ZH = {
    rules.BAD_PATH: ("网址无效", "请求的网址格式不正确，请检查链接后重试。"),
    rules.FORBIDDEN_FEATURE: ("此功能不提供", "按照规定，平台不提供“拍照搜题”等功能。"),
    rules.IDENTITY_REQUIRED: ("请先登录", "上课需要先登录学生账号。"),
    rules.BAD_IDENTITY: ("身份信息有误", "学生账号或年级信息格式不正确，请重新登录。"),
    rules.PRESCHOOL: ("学龄前儿童不提供线上培训", "按照规定，不对学龄前儿童开展线上培训。"),
    rules.CURFEW: ("今天的课程已结束", "线上培训每天结束时间已到，请早点休息。"),
    rules.REST_DAY: ("今天是休息日", "休息日、节假日和寒暑假不开展学科类培训。"),
    rules.DAILY_LIMIT: ("今天的上课时间已用完", "今天的线上学习时间已达上限，明天再来吧。"),
    rules.BREAK_REQUIRED: ("课间休息", "每节课后需要休息一会儿，起来活动活动，看看远处。"),
    rules.STATE_UNAVAILABLE: ("服务暂时不可用", "系统暂时无法确认上课状态，请稍后再试。"),
    rules.UPSTREAM_ERROR: ("服务暂时不可用", "课程服务没有响应，请稍后再试。"),
}


def whole_seconds_up(seconds: float | None) -> int | None:
    if seconds is None:
        return None
    return max(math.ceil(seconds - 1e-6), 0)


def prefers_html(accept: str) -> bool:
    """True when text/html has a strictly higher q than application/json.
    `*/*` alone means JSON (API clients send it)."""
    if "html" not in accept:
        return False
    best_html = 0.0
    best_json = 0.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if media in ("text/html", "application/xhtml+xml"):
            best_html = max(best_html, q)
        elif media in ("application/json", "*/*", "application/*"):
            # */* only counts for JSON when it ranks above html's q
            best_json = max(best_json, q if media != "*/*" else q - 0.0001)
    return best_html > best_json


def _fmt_wait(seconds: int) -> str:
    if seconds >= 3600:
        return f"{seconds // 3600} 小时 {seconds % 3600 // 60} 分钟"
    if seconds >= 60:
        return f"{seconds // 60} 分 {seconds % 60} 秒"
    return f"{seconds} 秒"


def denial(rule: str, message: str, retry_after: float | None, accept: str,
           status: int | None = None) -> web.Response:
    retry = whole_seconds_up(retry_after)
    headers = {"Cache-Control": "no-store"}
    if retry is not None:
        headers["Retry-After"] = str(retry)
    status = status or rules.STATUS.get(rule, 403)
    if prefers_html(accept):
        title, text = ZH.get(rule, ("无法访问", message))
        wait = f"<p class=wait>还需等待 <b id=w>{_fmt_wait(retry)}</b>。</p>" if retry else ""
        page = _PAGE.format(title=html.escape(title), text=html.escape(text), wait=wait,
                            rule=html.escape(rule), retry=retry if retry is not None else "null")
        return web.Response(status=status, text=page, content_type="text/html",
                            charset="utf-8", headers=headers)
    body = json.dumps({"rule": rule, "message": message, "retry_after": retry},
                      ensure_ascii=False)
    return web.Response(status=status, text=body, content_type="application/json",
                        headers=headers)


_PAGE = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title>
<style>body{{font-family:system-ui,"PingFang SC","Microsoft YaHei",sans-serif;
background:#f4f8f4;color:#234;display:flex;min-height:90vh;align-items:center;
justify-content:center}}main{{background:#fff;border-radius:12px;padding:2em 2.5em;
max-width:28em;box-shadow:0 2px 12px #0001;text-align:center}}h1{{color:#2a7a4b}}
.rule{{color:#889;font-size:.8em}}</style></head>
<body><main><h1>{title}</h1><p>{text}</p>{wait}
<p class=rule>rule: {rule}</p></main>
<script>
(function(){{var r={retry};if(r===null)return;var e=document.getElementById('w');
var t=Date.now()+r*1000;setInterval(function(){{var s=Math.max(0,Math.ceil((t-Date.now())/1000));
e.textContent=s>=60?Math.floor(s/60)+' 分 '+(s%60)+' 秒':s+' 秒';
if(s===0)location.reload();}},1000);}})();
</script></body></html>
"""
