"""The Envoy and Traefik examples, checked as far as no Envoy or Traefik
binary allows: well-formed YAML, the decision endpoint, every reference
resolved, enforced routes asked and WebSocket upgrades sent to serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ENFORCED = ("/classroom/subject/", "/classroom/arts/", "/api/photo-search")


def _ext_authz_disabled(route: dict[str, Any]) -> bool:
    per = route.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_authz", {})
    return bool(per.get("disabled"))


def test_envoy_example_asks_for_enforced_routes_only() -> None:
    """Envoy: ext_authz HTTP service at /_tutorgate/authz, failing closed; enforced
    prefixes checked, the rest and lesson upgrades not; every cluster exists."""
    conf = yaml.safe_load((DEPLOY / "envoy/envoy.yaml").read_text())
    res = conf["static_resources"]
    clusters = {c["name"] for c in res["clusters"]}
    hcm = res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    assert filters[-1]["name"] == "envoy.filters.http.router"
    authz = next(f for f in filters if f["name"] == "envoy.filters.http.ext_authz")
    cfg = authz["typed_config"]
    assert cfg["failure_mode_allow"] is False
    svc = cfg["http_service"]
    assert svc["path_prefix"] == "/_tutorgate/authz"
    assert svc["server_uri"]["cluster"] in clusters
    allowed = {p["exact"] for p in svc["authorization_request"]["allowed_headers"]["patterns"]}
    assert {"x-student-id", "accept", "accept-language"} <= allowed
    assert "x-forwarded-uri" not in allowed  # the path decides, never a client's header
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    for r in routes:
        assert r["route"]["cluster"] in clusters
    first = routes[0]
    assert first["route"]["cluster"] == "tutorgate_serve" and _ext_authz_disabled(first)
    for prefix in ENFORCED:
        # the first route that matches a plain request to the prefix
        r = next(r for r in routes if "headers" not in r["match"]
                 and prefix.startswith(r["match"]["prefix"]))
        assert r["match"]["prefix"] == prefix and not _ext_authz_disabled(r), prefix
    assert _ext_authz_disabled(routes[-1]) and routes[-1]["match"]["prefix"] == "/"


def test_traefik_example_asks_for_enforced_routes_only() -> None:
    """Traefik: ForwardAuth at /_tutorgate/authz on the enforced routers only;
    lesson upgrades to serve; every service and middleware exists."""
    dyn = yaml.safe_load((DEPLOY / "traefik/dynamic.yml").read_text())["http"]
    static = yaml.safe_load((DEPLOY / "traefik/traefik.yml").read_text())
    assert static["providers"]["file"]["filename"].endswith("dynamic.yml")
    fa = dyn["middlewares"]["tutorgate"]["forwardAuth"]
    assert fa["address"].endswith("/_tutorgate/authz")
    assert "X-Lesson-Remaining" in fa["authResponseHeaders"]
    for name, router in dyn["routers"].items():
        assert router["service"] in dyn["services"], name
        for m in router.get("middlewares", []):
            assert m in dyn["middlewares"], name
    enforced = dyn["routers"]["enforced"]
    for prefix in ENFORCED:
        assert f"PathPrefix(`{prefix}`)" in enforced["rule"]
    assert enforced["middlewares"] == ["tutorgate"]
    ws = dyn["routers"]["lesson-websockets"]
    assert ws["service"] == "tutorgate-serve" and ws["priority"] > enforced["priority"]
    assert "middlewares" not in dyn["routers"]["platform"]
