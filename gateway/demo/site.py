"""A small demo tutoring site: the upstream the gateway protects in the demo.

Pages: a home page to pick a student and grade, a subject class (math), an
arts class, and a photo-search endpoint that the policy forbids. Lesson
pages poll `/_tutorgate/status` through the gateway to show a countdown.
"""

from __future__ import annotations

import asyncio
import html
import json
from importlib import resources

from aiohttp import web

_PAGE = resources.files(__package__).joinpath("page.html")


def _page(title: str, body: str) -> web.Response:
    text = _PAGE.read_text(encoding="utf-8")
    return web.Response(text=text.replace("{{title}}", html.escape(title))
                        .replace("{{body}}", body), content_type="text/html", charset="utf-8")


async def home(request: web.Request) -> web.Response:
    return _page("tutorgate 演示课堂", """
<h1>tutorgate 演示课堂</h1>
<p>选择一位学生和年级，然后进入课堂。演示策略：每节课 <b>45 秒</b>，课间休息 <b>20 秒</b>，
休息日不上学科类课程，学龄前儿童不提供线上培训，“拍照搜题”被禁止。</p>
<form id=who onsubmit="return go(event)">
<label>学生 <input id=sid value="demo-student-1" pattern="[A-Za-z0-9._:@-]{1,128}"></label>
<label>年级 <select id=grade>
<option value="preschool">学龄前</option><option>1</option><option>2</option>
<option selected>3</option>
<option>4</option><option>5</option><option>6</option><option>7</option><option>8</option>
<option>9</option><option>10</option><option>11</option><option>12</option></select></label>
<button>保存</button></form>
<ul class=rooms>
<li><a href="/classroom/subject/math">数学课（学科类）</a></li>
<li><a href="/classroom/arts/drawing">美术课（非学科类）</a></li>
<li><a href="/api/photo-search">拍照搜题（已禁止）</a></li>
<li><a href="/library">图书角（不受管控，直接转发）</a></li>
</ul>
<p class=note>演示里的身份用 cookie 代替平台的登录层传给网关（仅供演示）。</p>
""")


async def lesson(request: web.Request) -> web.Response:
    name = request.match_info.get("name", "lesson")
    kind = "学科类" if "/subject/" in request.path else "非学科类"
    # The countdown asks the gateway (GET /_tutorgate/status), as a platform's
    # page would: the upstream never sees the gateway's response headers.
    return _page(f"{name} 课堂", f"""
<h1>{html.escape(name)} · {kind}课堂</h1>
<p>本节课剩余 <b id=left>…</b>。</p>
<p>每次点击“下一题”都是一次上课请求；下课后网关会显示休息页面。
20 秒不操作也算休息过了，下一次请求开始新的一节课。</p>
<p><a class=btn href="{html.escape(request.path)}">下一题</a> <a href="/">返回首页</a></p>
<div id=live></div>
""")


async def photo_search(request: web.Request) -> web.Response:
    return web.json_response({"answer": "42"})  # never reached through the gateway


async def library(request: web.Request) -> web.Response:
    return _page("图书角",
                 "<h1>图书角</h1><p>不受管控的页面：网关直接转发。</p><a href='/'>返回</a>")


async def live(request: web.Request) -> web.WebSocketResponse:
    """A class's signalling socket: sends a tick every second."""
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    n = 0
    while not ws.closed:
        await ws.send_str(json.dumps({"tick": n}))
        n += 1
        msg = None
        try:
            msg = await ws.receive(timeout=1.0)
        except TimeoutError:
            continue
        if msg.type in (web.WSMsgType.CLOSE, web.WSMsgType.CLOSING, web.WSMsgType.CLOSED):
            break
    return ws


def make_site() -> web.Application:
    app = web.Application()
    app.router.add_get("/", home)
    app.router.add_get("/classroom/{kind}/{name}/live", live)
    app.router.add_get("/classroom/{kind}/{name}", lesson)
    app.router.add_route("*", "/api/photo-search{tail:.*}", photo_search)
    app.router.add_get("/library", library)
    return app


async def run_site(listen: tuple[str, int]) -> int:
    runner = web.AppRunner(make_site(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, *listen).start()
    print(f"demo site on http://{listen[0]}:{listen[1]}/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return 0
