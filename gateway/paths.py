"""One path for matching and forwarding: the request target made canonical.

A route is only as good as the agreement between the path the gateway
matches and the path the upstream serves. If they are read differently
(`/classroom/subject/.` is a lesson page to nginx but matched no route
here; `/api/photo-search/%2e%2e` is resolved by aiohttp after decoding) a
client walks around the rules. So the gateway reads the target once,
forwards exactly what it read, and matches routes on a key that is at
least as eager as any upstream reading of that forwarded path.

`canonical(target)` returns a `Target` (what goes upstream and the key routes
are matched on) or a `Refused` (rule `bad_path`, 400). The forwarded path:

- absolute-form (`http://host/x?q`): the scheme and authority are dropped:
  the path alone decides and goes upstream in origin form (`/x?q`); an empty
  path is `/`. The upstream's address never comes from the request;
- the query string (from the first `?`) is not a path: it goes upstream
  exactly as it came, unchecked;
- percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded,
  once; every other escape stays encoded, its hex upper-cased; raw non-ASCII
  (a lenient parser lets it through) is percent-encoded as UTF-8;
- repeated slashes are merged (as nginx does by default), then dot segments
  are removed as RFC 3986 §5.2.4 does: `/a/b/.` -> `/a/b/`, `/a/b/..` -> `/a/`,
  never above the root;
- `;parameters` stay in it.

Refused (`bad_path`), because some upstream would read them as something
the gateway cannot match safely:

- `%2F` or `%5C` (an encoded `/` or `\\`: a server that decodes before it
  splits sees another path), a raw `\\` (Windows and some frameworks read it
  as `/`);
- NUL and other control bytes, raw or encoded (C servers cut at NUL);
- invalid percent-encoding (`%`, `%2`, `%zz`);
- a double-encoded byte, `%25` followed by two hex digits (`%252e`): a
  server that decodes twice would resolve `..` the gateway never saw;
- a raw `#` before the query (aiohttp's two parsers disagree on it; a
  fragment is never part of a request);
- a segment that is a dot segment only once its `;parameters` are cut
  (`..;`, `.;x`, `..%3B`): Tomcat reads `/x/..;/api` as `/api`, nginx as a
  directory `..;` under `/x/`, and no one key matches both;
- a target that is neither a path nor an absolute URL.

The match key, from the forwarded path: `;parameters` cut off every segment
(a raw `;` or `%3B`: Tomcat cuts before decoding, others after), then every
escape decoded, then repeated slashes merged again (`/a/;x/b` is `/a//b` to
Tomcat), lower-cased when the policy says
`paths: {case_sensitive: false}`. Route prefixes go through the same key.
So every reading an upstream may make of the forwarded path (as it is,
decoded, or with parameters cut) matches either the route the key matched
or no route at all, where the gateway enforces more than the upstream
serves, never less.

Not handled: servers that ignore trailing dots or spaces of a name (IIS,
Windows file systems: `/classroom/subject./`); put such an upstream behind
one that does not, or list both spellings as routes. Case folding is ASCII
and Unicode `str.lower()`, not a file system's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 3986 2.3
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_RAW_BAD = re.compile(r"[\x00-\x1f\x7f\\#]")
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/]*")
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")
_PARAMS = re.compile(r"(?:;|%3B)[^/]*")
_DOT_PARAMS = re.compile(r"/\.{1,2}(?:;|%3B)[^/]*(?=/|$)")
_ESCAPES = re.compile(r"(?:%[0-9A-F]{2})+")


# Not frozen: a frozen dataclass's __init__ costs ~3x, and this runs on every
# request; treat instances as values all the same.
@dataclass(slots=True)
class Target:
    """A request target made canonical."""

    path: str   # what the upstream receives (";params" kept)
    query: str  # "" or "?..." exactly as it came
    key: str    # what routes are matched on

    @property
    def origin(self) -> str:
        """The request target in origin form, as it goes upstream."""
        return self.path + self.query


@dataclass(frozen=True, slots=True)
class Refused:
    """A path that cannot be made safe: rule bad_path."""

    why: str


def canonical(target: str, case_sensitive: bool = True) -> Target | Refused:
    """The canonical form of a raw request target (`request.raw_path`)."""
    path, sep, query = target.partition("?")
    if path[:1] != "/":
        m = _ABSOLUTE.match(path)
        if m is None:
            return Refused("the request target is neither a path nor an absolute URL")
        path = path[m.end():] or "/"
    # The fast path: most requests are already canonical.
    if (path.isascii() and path.isprintable() and "%" not in path and ";" not in path
            and "/." not in path and "//" not in path and "\\" not in path and "#" not in path):
        return Target(path, sep + query, path if case_sensitive else path.lower())
    clean = _decode_unreserved(path)
    if isinstance(clean, Refused):
        return clean
    clean = _resolve(clean)
    if _DOUBLE.search(clean):
        return Refused("a double-encoded byte (%25 and two hex digits)")
    if _DOT_PARAMS.search(clean):
        return Refused("a dot segment with parameters ('..;')")
    return Target(clean, sep + query, route_key(clean, case_sensitive))


def route_key(path: str, case_sensitive: bool = True) -> str:
    """The key routes are matched on, from a canonical path."""
    key = _PARAMS.sub("", path) if ";" in path or "%3B" in path else path
    if "%" in key:
        key = _ESCAPES.sub(_unescape, key)
    if "/." in key or "//" in key:
        key = _resolve(key)
    return key if case_sensitive else key.lower()


def _unescape(m: re.Match[str]) -> str:
    return bytes.fromhex(m.group(0).replace("%", "")).decode("utf-8", "surrogateescape")


def _decode_unreserved(path: str) -> str | Refused:
    """Unreserved escapes decoded, other escapes upper-cased, non-ASCII
    escaped; refusals for the bytes no upstream may read differently."""
    bad = _RAW_BAD.search(path)
    if bad is not None:
        c = bad.group(0)
        if c == "\\":
            return Refused("a backslash in the path")
        if c == "#":
            return Refused("a '#' in the path")
        return Refused("a control character in the path")
    if not path.isascii():
        path = "".join(c if c.isascii() else _escape(c) for c in path)
    if "%" not in path:
        return path
    out: list[str] = []
    start = 0
    n = len(path)
    while True:
        i = path.find("%", start)
        if i < 0:
            out.append(path[start:])
            return "".join(out)
        out.append(path[start:i])
        hx = path[i + 1:i + 3]
        if len(hx) < 2 or hx[0] not in _HEX or hx[1] not in _HEX:
            return Refused("invalid percent-encoding in the path")
        b = int(hx, 16)
        if b in (0x2F, 0x5C):
            return Refused("an encoded '/' or '\\' in the path")
        if b < 0x20 or b == 0x7F:
            return Refused("an encoded control character in the path")
        c = chr(b)
        out.append(c if c in _UNRESERVED else "%" + hx.upper())
        start = min(i + 3, n)


def _escape(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))


def _resolve(path: str) -> str:
    """Repeated slashes merged, then dot segments removed (RFC 3986 5.2.4);
    `path` starts with "/"."""
    segs = path.split("/")
    last = len(segs) - 1
    out: list[str] = []
    for i in range(1, last + 1):
        seg = segs[i]
        if seg == "..":
            if out:
                out.pop()
            if i == last:
                out.append("")
        elif seg == ".":
            if i == last:
                out.append("")
        elif seg or i == last:
            out.append(seg)
    return "/" + "/".join(out)
