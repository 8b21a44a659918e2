"""Who is asking: trusted headers or a JWT -> `Student` (keyed hash, grade, region).

Trusted headers (`source: header`) are only safe behind the platform's own
auth layer, which must strip any client-sent copies of those headers: the
gateway believes whatever they say. `source: jwt` verifies a signed token.

The raw student id never leaves this module: it is replaced by an HMAC
keyed with TUTORGATE_ID_SECRET, the only form that reaches metrics, Redis
keys, audit records and logs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from multidict import CIMultiDict, CIMultiDictProxy

from .policy_schema import IdentitySettings, JwtSettings
from .rules import Grade, Student

_ID = re.compile(r"^[A-Za-z0-9\-_.:@]{1,128}$")
_GRADES: dict[str, Grade] = {str(g): g for g in range(1, 13)}
_GRADES["preschool"] = "preschool"
_REGION = re.compile(r"^[A-Za-z0-9\-_]{1,32}$")


class Pseudonymizer:
    """HMAC-SHA256 of student ids; 128 bits of it, hex."""

    def __init__(self, secret: bytes) -> None:
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    def __call__(self, student_id: str) -> str:
        m = self._mac.copy()
        m.update(student_id.encode())
        return m.hexdigest()[:32]


def parse_grade(raw: str | None) -> tuple[Grade | None, bool]:
    """(grade, ok). Absent or empty = no grade (the header is optional)."""
    if raw is None or raw == "":
        return None, True
    g = _GRADES.get(raw.strip().lower())
    return g, g is not None


# Students remembered by the header identity, cleared whole when either
# bound is reached: entries, and characters of the header values kept.
SEEN_MAX = 100_000
SEEN_CHARS = 8 * 1024 * 1024
# Longest values worth remembering: a valid id (128), grade and region (32).
_ENTRY_MAX = 128 + 16 + 32

Headers = CIMultiDictProxy[str] | CIMultiDict[str]
_NONE: list[str] = []  # never mutated
_TWICE = Student(problem="malformed", why="an identity header sent more than once")


class HeaderIdentity:
    """`source: header`: the platform's auth layer sets trusted headers."""

    uses_cookies = False  # callers may pass {} and skip parsing the Cookie header

    def __init__(self, settings: IdentitySettings, pseudonym: Pseudonymizer) -> None:
        self.student_header = settings.student_header
        self.grade_header = settings.grade_header
        self.region_header = settings.region_header
        self._pseudonym = pseudonym

        # The same students come back request after request: remembering the
        # answer saves the HMAC and the checks (Students are immutable).
        # key: every value sent, None between the three headers (see __call__)
        self._seen: dict[tuple[str | None, ...], Student] = {}
        self._seen_chars = 0

    def __call__(self, headers: Headers, cookies: Mapping[str, str]) -> Student:
        getall = headers.getall
        sids = getall(self.student_header, _NONE)
        grades = getall(self.grade_header, _NONE)
        regions = getall(self.region_header, _NONE)
        # Every value of the three headers, None between them (values are
        # str, so the Nones mark the boundaries: one key per request shape).
        # Only a request that sent each header at most once is remembered,
        # so a hit needs no duplicate check (cheaper than doing it each time).
        key = (*sids, None, *grades, None, *regions)
        student = self._seen.get(key)
        if student is not None:
            return student
        # Two copies: the gateway would read one and the upstream maybe the other.
        if len(sids) > 1 or len(grades) > 1 or len(regions) > 1:
            return _TWICE
        raw = (sids[0] if sids else None, grades[0] if grades else None,
               regions[0] if regions else None)
        student = _student(*raw, self._pseudonym)
        # Only usable, short identities are remembered: values a client
        # invents (any length, any bytes) would otherwise fill memory.
        size = sum(len(v) for v in raw if v)
        if student.problem is None and size <= _ENTRY_MAX:
            if len(self._seen) >= SEEN_MAX or self._seen_chars + size > SEEN_CHARS:
                self._seen.clear()
                self._seen_chars = 0
            self._seen[key] = student
            self._seen_chars += size
        return student


class JwtIdentity:
    """`source: jwt`: a bearer token, or a named cookie, signed HS256/RS256."""

    uses_cookies = True

    def __init__(self, settings: JwtSettings, pseudonym: Pseudonymizer,
                 base_dir: Path | None = None) -> None:
        self.s = settings
        self._pseudonym = pseudonym
        self._key = load_key(settings, base_dir)

    def __call__(self, headers: Headers, cookies: Mapping[str, str]) -> Student:
        token = None
        auths = headers.getall("Authorization", _NONE)
        if len(auths) > 1:
            return _TWICE
        auth = auths[0] if auths else ""
        if auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
        elif self.s.cookie:
            token = cookies.get(self.s.cookie)
        if not token:
            return Student(problem="missing", why="no bearer token or session cookie")
        if not token.isascii():
            # PyJWT raises UnicodeEncodeError on these, not one of its own errors
            return Student(problem="missing", why="token rejected: not ASCII")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._key, algorithms=[self.s.algorithm], audience=self.s.audience,
                issuer=self.s.issuer, leeway=self.s.leeway,
                options={"require": ["exp"], "verify_aud": self.s.audience is not None})
        except (jwt.PyJWTError, ValueError) as e:
            # Invalid or expired tokens prove no identity: identity_required.
            return Student(problem="missing", why=f"token rejected: {e}")
        sid = claims.get(self.s.student_claim)
        grade = claims.get(self.s.grade_claim)
        region = claims.get(self.s.region_claim)
        return _student(None if sid is None else str(sid),
                        None if grade is None else str(grade),
                        None if region is None else str(region), self._pseudonym)


def _student(sid: str | None, grade_raw: str | None, region: str | None,
             pseudonym: Pseudonymizer) -> Student:
    if sid is None or sid == "":
        return Student(problem="missing", why="no student id")
    if not _ID.fullmatch(sid):
        return Student(problem="malformed", why="student id must be 1-128 of A-Z a-z 0-9 -_.:@")
    grade, ok = parse_grade(grade_raw)
    if not ok:
        return Student(problem="malformed", why="grade must be preschool or 1 to 12")
    if region is not None and not _REGION.fullmatch(region):
        region = None  # an unusable region code falls back to the base policy
    return Student(key=pseudonym(sid), grade=grade, region=region)


def load_key(settings: JwtSettings, base_dir: Path | None) -> str:
    if settings.key_env is not None:
        key = os.environ.get(settings.key_env)
        if not key:
            raise ValueError(f"identity.jwt.key_env: environment variable {settings.key_env} "
                             "is not set")
        return key
    assert settings.key_file is not None
    path = Path(settings.key_file)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path.read_text(encoding="utf-8")


Identify = HeaderIdentity | JwtIdentity


def make_identify(settings: IdentitySettings, pseudonym: Pseudonymizer,
                  base_dir: Path | None = None) -> Identify:
    if settings.source == "jwt":
        assert settings.jwt is not None
        return JwtIdentity(settings.jwt, pseudonym, base_dir)
    return HeaderIdentity(settings, pseudonym)
