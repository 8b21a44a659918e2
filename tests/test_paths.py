"""paths.canonical: one path for matching and forwarding (tables and properties)."""

from __future__ import annotations

import re
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit import policy_text

from gateway.errors import PolicyError
from gateway.paths import Refused, Target, canonical, route_key
from gateway.policy import parse_policy


def ok(target: str, case_sensitive: bool = True) -> Target:
    t = canonical(target, case_sensitive)
    assert isinstance(t, Target), t
    return t


@pytest.mark.parametrize(("target", "path", "key"), [
    ("/classroom/subject/math", "/classroom/subject/math", "/classroom/subject/math"),
    ("/a/b/.", "/a/b/", "/a/b/"),
    ("/a/b/..", "/a/", "/a/"),
    ("/a/b/../", "/a/", "/a/"),
    ("/a/./b", "/a/b", "/a/b"),
    ("/..", "/", "/"),
    ("/../../a", "/a", "/a"),
    ("/classroom/subject/.", "/classroom/subject/", "/classroom/subject/"),
    ("/classroom/subject/math/..", "/classroom/subject/", "/classroom/subject/"),
    ("/api/photo-search/..", "/api/", "/api/"),
    ("/api/photo-search/%2e%2e", "/api/", "/api/"),
    ("/api/photo-search/%2E%2e/", "/api/", "/api/"),
    ("//classroom//subject///math", "/classroom/subject/math", "/classroom/subject/math"),
    ("/a//..", "/", "/"),
    ("/%61%62c", "/abc", "/abc"),
    ("/a%7e%2D%5f", "/a~-_", "/a~-_"),
    ("/a%3a%c3%a9", "/a%3A%C3%A9", "/a:é"),
    ("/课程/", "/%E8%AF%BE%E7%A8%8B/", "/课程/"),
    ("/a%2e/b", "/a./b", "/a./b"),
    ("/a%25zz", "/a%25zz", "/a%zz"),
    ("/api/photo-search;x=1", "/api/photo-search;x=1", "/api/photo-search"),
    ("/classroom/subject;a=1/math;b", "/classroom/subject;a=1/math;b", "/classroom/subject/math"),
    ("/classroom/subject%3bx/math", "/classroom/subject%3Bx/math", "/classroom/subject/math"),
    ("/x/;y/a", "/x/;y/a", "/x/a"),
    ("/x/...;/a", "/x/...;/a", "/x/.../a"),
    ("/.well-known/acme", "/.well-known/acme", "/.well-known/acme"),
    ("/a/..b/c.", "/a/..b/c.", "/a/..b/c."),
    ("http://h/x?q=1", "/x", "/x"),
    ("evil://h/x", "/x", "/x"),
    ("http://h", "/", "/"),
    ("https://user@h:8443/classroom/subject/./m", "/classroom/subject/m",
     "/classroom/subject/m"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_canonical_table(target: str, path: str, key: str) -> None:
    """Decoding, dot segments, slashes, parameters and absolute form, case by case."""
    t = ok(target)
    assert (t.path, t.key) == (path, key)


@pytest.mark.parametrize(("target", "why"), [
    ("/a%2Fb", "encoded '/'"),
    ("/a%2fb", "encoded '/'"),
    ("/a%5Cb", "encoded '/' or '\\'"),
    ("/a%5cb", "encoded '/' or '\\'"),
    ("/a\\b", "backslash"),
    ("/a%00", "control"),
    ("/a%0a", "control"),
    ("/a%7F", "control"),
    ("/a\x00b", "control"),
    ("/a\tb", "control"),
    ("/a\x7f", "control"),
    ("/a%", "invalid percent"),
    ("/a%2", "invalid percent"),
    ("/a%zz", "invalid percent"),
    ("/a%g0", "invalid percent"),
    ("/a%252e", "double-encoded"),
    ("/a%252F", "double-encoded"),
    ("/a%25%32%65", "double-encoded"),
    ("/a#b", "'#'"),
    ("/x/..;/api/photo-search", "dot segment with parameters"),
    ("/x/.;y/a", "dot segment with parameters"),
    ("/x/%2e%2e%3Bz/a", "dot segment with parameters"),
    ("/x/..;", "dot segment with parameters"),
    ("a/b", "neither a path"),
    ("*", "neither a path"),
    ("http:/x", "neither a path"),
])
def test_refused_table(target: str, why: str) -> None:
    """Paths that cannot be made safe are refused, saying why."""
    r = canonical(target)
    assert isinstance(r, Refused)
    assert why in r.why


def test_query_is_kept_as_it_came() -> None:
    """The query string (from the first '?') is not checked or changed."""
    t = ok("/a/./b?x=%2F..//\\&y=%zz#f")
    assert (t.path, t.query, t.origin) == ("/a/b", "?x=%2F..//\\&y=%zz#f",
                                           "/a/b?x=%2F..//\\&y=%zz#f")
    assert ok("/a?").origin == "/a?"
    assert ok("/a").query == ""


def test_case_insensitive_key() -> None:
    """With case_sensitive false the key is lower case; the forwarded path is not."""
    t = ok("/API/Photo-Search;X=1", case_sensitive=False)
    assert (t.path, t.key) == ("/API/Photo-Search;X=1", "/api/photo-search")
    assert ok("/API/Photo-Search", case_sensitive=False).key == "/api/photo-search"


def test_policy_matches_on_the_key() -> None:
    """Route prefixes go through the same key: case folding and non-ASCII prefixes."""
    routes = ("- {prefix: /Classroom/Subject/, kind: lesson, category: subject}\n"
              "- {prefix: /课程/, kind: lesson, category: non_subject}\n")
    p = parse_policy(policy_text(routes=routes, extra="paths: {case_sensitive: false}"))
    r = p.match(ok("/CLASSROOM/subject/x", case_sensitive=False).key)
    assert r is not None and r.category == "subject"
    r = p.match(ok("/%E8%AF%BE%E7%A8%8B/x", case_sensitive=False).key)
    assert r is not None and r.category == "non_subject"
    strict = parse_policy(policy_text(routes=routes))
    assert strict.match(ok("/classroom/subject/x").key) is None


@pytest.mark.parametrize("prefix", ["/a%2Fb/", "/a\\\\b", "/a%zz", "/a?b"])
def test_policy_refuses_an_unusable_prefix(prefix: str) -> None:
    """A route prefix the gateway would refuse as a path is a policy error."""
    routes = f'- {{prefix: "{prefix}", kind: forbidden}}\n'
    with pytest.raises(PolicyError, match="is not a usable path"):
        parse_policy(policy_text(routes=routes))


# ---------------------------------------------------------------- properties

PREFIXES = ("/classroom/subject/", "/classroom/arts/", "/api/photo-search", "/Api/x", "/课/",
            "/a:b/")

# Pieces attackers combine: names of routes, dots, encodings, parameters.
PIECES = ["/", "/", "/", ".", "..", "%2e", "%2E", "%2e%2e", ";", ";x=1", "%3B", "%3b", "%2F",
          "%5C", "\\", "%25", "%252e", "%00", "%", "%4", "%41", "%c3%a9", "é", "#", "?",
          "classroom", "subject", "arts", "api", "photo-search", "Api", "x", "%73", "~",
          "%7e", "..;", ":", "@", "%20", "//"]
pieces = st.lists(st.sampled_from(PIECES), max_size=14).map(lambda p: "/" + "".join(p))
# Whole segments: route names, dot segments, and names with something stuck on.
NAMES = ["classroom", "subject", "arts", "api", "photo-search", "Api", "x", "", ".", "..",
         "%2e", "%2e%2e", "..;", "%63lassroom", "SUBJECT", "课", "%E8%AF%BE", "a:b", "a%3Ab"]
DECOR = ["", "", ";x=1", ";", "%3B", "%3bx", ".", "%2e", "/", "%41", "é"]
segments = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(DECOR)).map("".join),
                    max_size=8).map(lambda segs: "/" + "/".join(segs))
targets = st.one_of(pieces, segments)
any_text = st.text(max_size=40).map(lambda s: "/" + s)


def route_of(key: str, fold: bool = False) -> str | None:
    key = key.lower() if fold else key
    for p in PREFIXES:
        if key.startswith(p.lower() if fold else p):
            return p
    return None


def dot_free(path: str) -> bool:
    return not any(s in (".", "..") for s in path.split("/"))


def readings(fwd: str) -> list[str]:
    """Ways an upstream may read a forwarded path before matching it."""
    decoded = urllib.parse.unquote(fwd, errors="surrogateescape")
    tomcat = "/".join(s.split(";", 1)[0] for s in fwd.split("/"))
    tomcat = urllib.parse.unquote(tomcat, errors="surrogateescape")
    after = "/".join(s.split(";", 1)[0] for s in decoded.split("/"))
    out = []
    for r in (fwd, decoded, tomcat, after):
        # every reading also resolves its own dot segments and slashes
        segs: list[str] = []
        parts = [s for s in r.split("/")[1:]]
        for i, s in enumerate(parts):
            last = i == len(parts) - 1
            if s == "..":
                if segs:
                    segs.pop()
                if last:
                    segs.append("")
            elif s == ".":
                if last:
                    segs.append("")
            elif s or last:
                segs.append(s)
        out.append("/" + "/".join(segs))
    return out


@settings(max_examples=600, deadline=None)
@given(st.one_of(targets, any_text), st.booleans())
def test_canonical_is_idempotent(target: str, case_sensitive: bool) -> None:
    """Canonicalising the forwarded path again changes nothing, key included."""
    t = canonical(target, case_sensitive)
    if isinstance(t, Refused):
        return
    again = canonical(t.path, case_sensitive)
    assert isinstance(again, Target)
    assert (again.path, again.key) == (t.path, t.key)
    assert route_key(t.path, case_sensitive) == t.key


@settings(max_examples=600, deadline=None)
@given(st.one_of(targets, any_text))
def test_accepted_paths_are_clean(target: str) -> None:
    """An accepted path has no dot segment, no '//', no encoded slash or
    backslash, no raw backslash or control byte, and is ASCII."""
    t = canonical(target)
    if isinstance(t, Refused):
        return
    p = t.path
    assert p.startswith("/")
    assert "//" not in p
    assert dot_free(p)
    assert not re.search(r"%(2F|5C|0[0-9A-F]|1[0-9A-F]|7F)", p, re.I)
    assert not re.search(r"[\x00-\x1f\x7f\\#?]", p)
    assert p.isascii()
    assert not re.search(r"%25[0-9A-Fa-f]{2}", p)
    assert dot_free(t.key) and "//" not in t.key


@settings(max_examples=800, deadline=None)
@given(targets, st.booleans())
def test_no_reading_of_the_forwarded_path_escapes_its_route(target: str, fold: bool) -> None:
    """However an upstream reads the forwarded path (as is, decoded, Tomcat's
    ;-stripping, either order), it matches the route the gateway matched, or
    no route at all (the gateway then enforces more, never less)."""
    t = canonical(target, not fold)
    if isinstance(t, Refused):
        return
    ours = route_of(t.key, fold)
    for r in readings(t.path):
        theirs = route_of(r, fold)
        assert theirs is None or theirs == ours, (t, r)


@settings(max_examples=300, deadline=None)
@given(st.one_of(targets, any_text))
def test_plain_paths_take_the_fast_path_unchanged(target: str) -> None:
    """A path of plain characters with no dot segment or '//' is its own
    canonical form and its own key."""
    t = canonical(target)
    if isinstance(t, Refused):
        return
    if re.fullmatch(r"/[A-Za-z0-9\-_~!$&'()*+,=:@/.]*", target.split("?")[0]) and \
            "/." not in target and "//" not in target:
        assert t.path == t.key == target.split("?")[0]
