"""The reverse proxy's aiohttp handler: enforcement, then forwarding.

Everything a route does not enforce passes through untouched and costs no
state-store call. On an enforced route enforcement.py decides (the engine,
one atomic clock step in the store), and only an allowed request goes
upstream (forwarding.py).
"""

from __future__ import annotations

from aiohttp import web

from . import logs
from .codes import Rule
from .enforcement import Enforcer
from .forwarding import Forwarder, is_websocket
from .paths import Refused, canonical
from .responses import denial


class Proxy:
    def __init__(self, enforcer: Enforcer, forwarder: Forwarder) -> None:
        self.enforcer = enforcer
        self.forwarder = forwarder

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = request.headers
        logs.begin_request(headers.get(logs.REQUEST_ID))
        enforcer = self.enforcer
        policy = enforcer.rt.policy
        # One path for matching and forwarding; absolute-form targets lose
        # their scheme and host here (paths.py).
        target = canonical(request.raw_path, policy.case_sensitive_paths)
        if isinstance(target, Refused):
            enforcer.refuse_path(target)
            return denial(Rule.BAD_PATH, None, headers, policy.locale)
        ws = is_websocket(headers)
        # matched here, before enforcement: a pass-through costs no more
        route = policy.match(target.key)
        if route is None:
            if ws:
                return await self.forwarder.websocket(request, target)
            return await self.forwarder.forward(request, target, "passthrough")
        verdict = await enforcer.enforce(route, headers, request, ws)
        decision = verdict.decision
        if not decision.allowed:
            return denial(decision.rule or Rule.STATE_UNAVAILABLE, decision.retry_after,
                          headers, policy.locale)
        if ws:
            return await self.forwarder.websocket(request, target, verdict.lesson)
        return await self.forwarder.forward(request, target, route.kind, route.read_timeout,
                                            verdict.lesson)
