"""The decision service: the gateway's rules asked by an ingress before it
forwards (nginx `auth_request`, Envoy `ext_authz`, Traefik `ForwardAuth`).

The ingress sends the original request's headers to `/_tutorgate/authz`
and forwards the request itself only on a 2xx. The decision is the proxy's
own enforcement step (`Enforcer.enforce`): the same identity, rules, store
clock step, metrics and audit events as a request through `serve`, so a
check counts as lesson activity exactly as the proxied request would. No
body is read and no upstream is asked; a route the policy does not
enforce, and a forbidden one, touch no store.

WebSocket upgrades: a check holds no connection, so it cannot cut one at
the lesson's end. An upgrade checked here is decided as a plain lesson
request; deployments that want cut-offs route lesson upgrades through
`tutorgate serve` (deploy/nginx shows how).

nginx's `auth_request` passes on only 2xx, 401 and 403 and turns any other
status into its own 500. A check that carries `X-Tutorgate-Mode: nginx`
is therefore denied with 403 and the real status in `X-Tutorgate-Status`;
nginx's `error_page` then fetches the real answer from
`/_tutorgate/denial` (status, body, Retry-After, as `serve` gives them).
"""

from __future__ import annotations

import re

from aiohttp import web

from . import logs, rules
from .codes import STATUS
from .enforcement import Enforcer
from .metrics import Metrics
from .paths import Refused, canonical
from .responses import denial, whole_seconds_up

AUTHZ_PATH = "/_tutorgate/authz"
DENIAL_PATH = "/_tutorgate/denial"
MODE_HEADER = "X-Tutorgate-Mode"
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?]*")
_PASS = {"X-Tutorgate-Decision": "pass"}
_TARGET_HEADERS = ("X-Forwarded-Uri", "X-Original-URI")
# retry_after on /_tutorgate/denial: ASCII digits, at most a year or so
_RETRY = re.compile(r"[0-9]{1,8}")


def original_target(request: web.Request) -> str | None:
    """The request target being decided: `X-Forwarded-Uri` (Traefik), else
    `X-Original-URI` (nginx), else the path after `/_tutorgate/authz`
    (Envoy's `path_prefix`) with this request's own query, else `/`.
    None when the authz path itself came encoded (nothing safe to cut) or
    a target header came twice."""
    h = request.headers
    for name in _TARGET_HEADERS:
        # Two copies: which one the ingress set is unknowable (a client's
        # own could come first): nothing safe to decide.
        if len(h.getall(name, ())) > 1:
            return None
    uri = h.get("X-Forwarded-Uri") or h.get("X-Original-URI")
    if uri:
        return uri
    raw = request.raw_path
    if raw[:1] != "/":  # absolute form: the path alone counts, as in serve
        m = _ABSOLUTE.match(raw)
        raw = raw[m.end():] if m is not None else raw
    if not raw.startswith(AUTHZ_PATH):
        return None
    tail = raw[len(AUTHZ_PATH):]
    if tail[:1] == "?":
        tail = "/" + tail
    return tail or "/"


class Authz:
    """The `/_tutorgate/authz` and `/_tutorgate/denial` handlers."""

    def __init__(self, enforcer: Enforcer, metrics: Metrics) -> None:
        self.enforcer = enforcer
        self._answers = {a: metrics.authz_checks.labels(a) for a in ("pass", "allow", "deny")}

    async def check(self, request: web.Request) -> web.Response:
        """Decide the forwarded request: 200 pass/allow, or the denial."""
        headers = request.headers
        logs.begin_request(headers.get(logs.REQUEST_ID))
        enforcer = self.enforcer
        rt = enforcer.rt
        nginx = headers.get(MODE_HEADER, "").lower() == "nginx"
        # The method does not change a decision (serve decides every method
        # alike), so X-Forwarded-Method needs no reading.
        uri = original_target(request)
        target = canonical(uri, rt.policy.case_sensitive_paths) if uri is not None \
            else Refused("an encoded authz path or a target header sent twice")
        if isinstance(target, Refused):
            enforcer.refuse_path(target)
            return self._denied(None if nginx else denial(rules.BAD_PATH, None, headers,
                                                          rt.policy.locale),
                                rules.BAD_PATH, None, nginx)
        route = rt.policy.match(target.key)
        if route is None:
            self._answers["pass"].inc()
            return web.Response(headers={**_PASS, logs.REQUEST_ID: logs.request_id()})
        # a check holds no connection: an upgrade is decided as a plain request
        verdict = await enforcer.enforce(route, headers, request, False)
        decision, lesson = verdict.decision, verdict.lesson
        if not decision.allowed:
            rule = decision.rule or rules.STATE_UNAVAILABLE
            return self._denied(None if nginx else denial(rule, decision.retry_after, headers,
                                                          rt.policy.locale),
                                rule, decision.retry_after, nginx)
        self._answers["allow"].inc()
        out = {"X-Tutorgate-Decision": "allow", logs.REQUEST_ID: logs.request_id()}
        if lesson is not None:
            out.update(lesson.headers(False))
        return web.Response(headers=out)

    def _denied(self, resp: web.Response | None, rule: str, retry_after: float | None,
                nginx: bool) -> web.Response:
        self._answers["deny"].inc()
        if nginx:
            # The body would be dropped by auth_request; nginx asks DENIAL_PATH.
            retry = whole_seconds_up(retry_after)
            out = {"X-Tutorgate-Decision": "deny", "X-Tutorgate-Rule": rule,
                   "X-Tutorgate-Status": str(STATUS.get(rule, 403)),
                   "Cache-Control": "no-store", logs.REQUEST_ID: logs.request_id()}
            if retry is not None:
                out["Retry-After"] = str(retry)
            return web.Response(status=403, headers=out)
        assert resp is not None
        resp.headers["X-Tutorgate-Decision"] = "deny"
        resp.headers["X-Tutorgate-Rule"] = rule
        return resp

    async def render(self, request: web.Request) -> web.Response:
        """The answer `serve` gives for a denial already decided (nginx's
        error_page asks here): `?rule=CODE&retry_after=SECONDS`. Touches
        no store and counts nothing: the check counted the decision."""
        rule = request.query.get("rule", "")
        retry = request.query.get("retry_after", "")
        if rule not in STATUS or not (retry == "" or _RETRY.fullmatch(retry)):
            return web.json_response({"error": "rule must be a rule code and retry_after "
                                      "whole seconds or empty"}, status=400)
        return denial(rule, int(retry) if retry else None, request.headers,
                      self.enforcer.rt.policy.locale)
