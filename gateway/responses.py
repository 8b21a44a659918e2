"""Denial responses: JSON for API clients, a short page for browsers, in the
language `Accept-Language` asks for (messages.py holds the words)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping

from aiohttp import web

from . import logs, messages
from .codes import STATUS
from .messages import Locale

# A small tree on green, inline: the page needs no second request for an icon.
FAVICON = ("data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 32 32'%3E"
           "%3Crect width='32' height='32' rx='7' fill='%232a7a4b'/%3E"
           "%3Cpath d='M16 5l8 11h-5l5 7H8l5-7H8z' fill='%23fff'/%3E"
           "%3Crect x='14.5' y='23' width='3' height='5' fill='%23fff'/%3E%3C/svg%3E")
# Where a denial page leads back to: the platform's home.
HOME = "/"


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


def denial(rule: str, retry_after: float | None, headers: Mapping[str, str],
           locale: Locale, status: int | None = None) -> web.Response:
    """The answer to a denied request: its status, `Retry-After`, and a body
    in the request's language (`Accept-Language`, else the policy's `locale`)."""
    retry = whole_seconds_up(retry_after)
    lang = messages.choose(headers.get("Accept-Language", ""), locale)
    words = messages.text(rule, lang)
    out = {"Cache-Control": "no-store", "Content-Language": lang,
           "Vary": "Accept, Accept-Language", logs.REQUEST_ID: logs.request_id()}
    if retry is not None:
        out["Retry-After"] = str(retry)
    status = status or STATUS.get(rule, 403)
    if prefers_html(headers.get("Accept", "")):
        return web.Response(status=status, text=page(rule, retry, lang),
                            content_type="text/html", charset="utf-8", headers=out)
    body = json.dumps({"rule": rule, "message": words.message, "retry_after": retry},
                      ensure_ascii=False)
    return web.Response(status=status, text=body, content_type="application/json",
                        headers=out)


def page(rule: str, retry: int | None, lang: Locale) -> str:
    """The denial page: what happened, how long to wait (counting down, then
    reloading), and the way back home."""
    w = messages.PAGE[lang]
    t = messages.text(rule, lang)
    wait = ""
    if retry:
        when = f"<b id=w>{html.escape(messages.format_wait(retry, lang))}</b>"
        wait = f"<p class=wait>{html.escape(w.wait).replace('{time}', when)}</p>"
    units = json.dumps({"d": w.day, "h": w.hour, "m": w.minute, "ms": w.minute_short,
                        "s": w.second, "sep": w.sep}, ensure_ascii=False)
    return _PAGE.format(lang=w.html_lang, title=html.escape(t.title),
                        text=html.escape(t.message), wait=wait, home=HOME,
                        home_text=html.escape(w.home), rule_word=html.escape(w.rule),
                        rule=html.escape(rule), favicon=FAVICON,
                        retry=retry if retry else "null", units=units)


# The countdown mirrors messages.format_wait; at 0 the page asks again.
_PAGE = """<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title><link rel="icon" href="{favicon}">
<style>body{{font-family:system-ui,"PingFang SC","Microsoft YaHei","WenQuanYi Micro Hei",
sans-serif;background:#f4f8f4;color:#234;display:flex;min-height:90vh;align-items:center;
justify-content:center}}main{{background:#fff;border-radius:12px;padding:2em 2.5em;
max-width:28em;box-shadow:0 2px 12px #0001;text-align:center}}h1{{color:#2a7a4b}}
.home{{display:inline-block;margin-top:.5em;background:#2a7a4b;color:#fff;padding:.4em .9em;
border-radius:6px;text-decoration:none}}.rule{{color:#889;font-size:.8em}}</style></head>
<body><main><h1>{title}</h1><p>{text}</p>{wait}
<p><a class=home href="{home}">{home_text}</a></p>
<p class=rule>{rule_word}{rule}</p></main>
<script>
(function(){{var r={retry};if(r===null)return;var e=document.getElementById('w');
var u={units};function f(n,k){{return n+u.sep+u[k]}}
function fmt(s){{if(s>=86400)return f(Math.floor(s/86400),'d')+' '+f(Math.floor(s%86400/3600),'h');
if(s>=3600)return f(Math.floor(s/3600),'h')+' '+f(Math.floor(s%3600/60),'m');
if(s>=60)return f(Math.floor(s/60),'ms')+' '+f(s%60,'s');return f(s,'s')}}
var t=Date.now()+r*1000;var i=setInterval(function(){{
var s=Math.max(0,Math.ceil((t-Date.now())/1000));e.textContent=fmt(s);
if(s===0){{clearInterval(i);location.reload()}}}},1000);}})();
</script></body></html>
"""
