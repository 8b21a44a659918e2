"""gateway/identity.py: trusted headers, JWTs and the keyed hash of student ids."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict

from gateway.identity import (
    HeaderIdentity,
    JwtIdentity,
    Pseudonymizer,
    load_key,
    make_identify,
    parse_grade,
)
from gateway.policy import IdentitySettings, JwtSettings, parse_policy
from gateway.rules import Student

SECRET = b"test-id-secret"
PSEUDONYM = Pseudonymizer(SECRET)
ROUTES = "routes:\n  - {prefix: /classroom/subject/, kind: lesson, category: subject}\n"


def identity_settings(section: str = "") -> IdentitySettings:
    """The identity settings of a policy with this `identity:` body (YAML, indented)."""
    text = "version: 1\n" + (f"identity:\n{section}" if section else "") + ROUTES
    return parse_policy(text, "test.yaml").identity


def header_identity(section: str = "") -> HeaderIdentity:
    return HeaderIdentity(identity_settings(section), PSEUDONYM)


def ask(ident: Callable[[Any, Any], Student], headers: dict[str, str],
        cookies: dict[str, str] | None = None) -> Student:
    # aiohttp hands over a case-insensitive multidict
    return ident(CIMultiDict(headers), cookies or {})


# ---------------------------------------------------------------- headers

@pytest.mark.parametrize(("sid", "problem"), [
    (None, "missing"),
    ("", "missing"),
    ("stu-0042", None),
    ("a", None),
    ("Zhang.San_01:class-3@school", None),
    ("x" * 128, None),
    ("x" * 129, "malformed"),
    ("stu 42", "malformed"),
    ("stu/42", "malformed"),
    ("学生42", "malformed"),
    ("stu+42", "malformed"),
    ("stu-42\n", "malformed"),
    ("x" * 128 + "\n", "malformed"),
], ids=["absent", "empty", "plain", "one-char", "all-allowed-punctuation", "128-chars",
        "129-chars", "space", "slash", "non-ascii", "plus", "trailing-newline",
        "128-chars-and-newline"])
def test_header_student_id(sid: str | None, problem: str | None) -> None:
    """An id of 1-128 letters, digits and -_.:@ is accepted; absent or empty is
    "missing", anything else "malformed"."""
    headers = {} if sid is None else {"X-Student-Id": sid}
    s = ask(header_identity(), headers)
    assert s.problem == problem
    if problem is None:
        assert s.key == PSEUDONYM(sid or "")
    else:
        assert s.key is None
        assert s.why


@pytest.mark.parametrize(("raw", "grade", "problem"), [
    (None, None, None),
    ("", None, None),
    ("preschool", "preschool", None),
    *[(str(g), g, None) for g in range(1, 13)],
    ("0", None, "malformed"),
    ("13", None, "malformed"),
    ("kindergarten", None, "malformed"),
    ("-1", None, "malformed"),
    ("grade 3", None, "malformed"),
    ("3.0", None, "malformed"),
], ids=lambda v: repr(v))
def test_header_grade(raw: str | None, grade: int | str | None, problem: str | None) -> None:
    """Grades are preschool or 1 to 12; the grade header is optional; others are malformed."""
    headers = {"X-Student-Id": "stu-0042"}
    if raw is not None:
        headers["X-Student-Grade"] = raw
    s = ask(header_identity(), headers)
    assert (s.grade, s.problem) == (grade, problem)


@pytest.mark.parametrize(("raw", "want"), [
    (None, (None, True)), ("", (None, True)), ("preschool", ("preschool", True)),
    ("1", (1, True)), ("12", (12, True)), ("0", (None, False)), ("13", (None, False)),
    ("kindergarten", (None, False)),
], ids=repr)
def test_parse_grade(raw: str | None, want: tuple[object, bool]) -> None:
    """parse_grade returns (grade, ok); absence is ok."""
    assert parse_grade(raw) == want


@pytest.mark.parametrize(("raw", "region"), [
    (None, None), ("650000", "650000"), ("cn-xj", "cn-xj"), ("", None), ("65 0000", None),
    ("x" * 33, None),
], ids=["absent", "code", "letters", "empty", "space", "too-long"])
def test_header_region(raw: str | None, region: str | None) -> None:
    """The region header is carried as given when well formed, else dropped (base policy)."""
    headers = {"X-Student-Id": "stu-0042"}
    if raw is not None:
        headers["X-Student-Region"] = raw
    s = ask(header_identity(), headers)
    assert s.problem is None
    assert s.region == region


def test_header_names_come_from_the_policy() -> None:
    """Custom header names are read, and the default names are then ignored."""
    ident = header_identity("  student_header: X-User\n  grade_header: X-Grade\n"
                            "  region_header: X-Province\n")
    s = ask(ident, {"x-user": "u-1", "x-grade": "preschool", "x-province": "540000"})
    assert (s.key, s.grade, s.region, s.problem) == (PSEUDONYM("u-1"), "preschool", "540000",
                                                     None)
    assert ask(ident, {"X-Student-Id": "u-1"}).problem == "missing"


def test_header_names_are_case_insensitive() -> None:
    """Headers match whatever case the client sent."""
    s = ask(header_identity(), {"x-student-id": "stu-1", "X-STUDENT-GRADE": "9"})
    assert (s.key, s.grade) == (PSEUDONYM("stu-1"), 9)


# ---------------------------------------------------------------- pseudonyms

IDS = ["stu-0042", "Zhang.San_01:class-3@school", "x" * 128, "z"]


@pytest.mark.parametrize("sid", IDS, ids=["plain", "punctuation", "long", "one-char"])
def test_pseudonym_is_an_hmac_of_the_id(sid: str) -> None:
    """The pseudonym is HMAC-SHA256(secret, id) in hex: stable, and never the id itself."""
    want = hmac.new(SECRET, sid.encode(), hashlib.sha256).hexdigest()[:32]
    assert PSEUDONYM(sid) == want
    assert Pseudonymizer(SECRET)(sid) == PSEUDONYM(sid)
    assert PSEUDONYM(sid) != sid
    assert sid not in PSEUDONYM(sid)
    assert len(PSEUDONYM(sid)) == 32


def test_pseudonym_differs_across_secrets_and_ids() -> None:
    """Another secret or another id gives another pseudonym."""
    assert Pseudonymizer(b"other-secret")("stu-0042") != PSEUDONYM("stu-0042")
    assert len({PSEUDONYM(s) for s in IDS}) == len(IDS)


def test_student_never_carries_the_raw_id() -> None:
    """The Student built from headers holds the keyed hash, not the id."""
    s = ask(header_identity(), {"X-Student-Id": "stu-0042", "X-Student-Grade": "3"})
    assert "stu-0042" not in repr(s)


# ---------------------------------------------------------------- JWT

HS_KEY = "an-hs256-key-of-at-least-32-bytes!!"
KEY_ENV = "TUTORGATE_TEST_JWT_KEY"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "stu-0042", "grade": "7", "region": "650000",
                            "exp": int(time.time()) + 3600}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def jwt_settings(section: str) -> JwtSettings:
    settings = identity_settings("  source: jwt\n  jwt:\n" + section)
    assert settings.jwt is not None
    return settings.jwt


@pytest.fixture
def hs256(monkeypatch: pytest.MonkeyPatch) -> JwtIdentity:
    monkeypatch.setenv(KEY_ENV, HS_KEY)
    return JwtIdentity(jwt_settings(f"    algorithm: HS256\n    key_env: {KEY_ENV}\n"
                                    "    cookie: tg_session\n"), PSEUDONYM)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand (PyJWT refuses to build some of these attacks)."""
    signing = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    sig = "" if key is None else b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())
    return signing + "." + sig


def test_jwt_hs256_bearer(hs256: JwtIdentity) -> None:
    """A valid HS256 bearer token gives the student, grade and region of its claims."""
    token = jwt.encode(claims(), HS_KEY, algorithm="HS256")
    s = ask(hs256, {"Authorization": f"Bearer {token}"})
    assert (s.problem, s.key, s.grade, s.region) == (None, PSEUDONYM("stu-0042"), 7, "650000")


def test_jwt_bearer_scheme_is_case_insensitive(hs256: JwtIdentity) -> None:
    """'bearer' in any case is the bearer scheme."""
    token = jwt.encode(claims(), HS_KEY, algorithm="HS256")
    assert ask(hs256, {"authorization": f"bearer {token}"}).key == PSEUDONYM("stu-0042")


def test_jwt_from_cookie(hs256: JwtIdentity) -> None:
    """Without a bearer header the token is read from the configured cookie."""
    token = jwt.encode(claims(grade="preschool"), HS_KEY, algorithm="HS256")
    s = ask(hs256, {}, {"tg_session": token})
    assert (s.problem, s.key, s.grade) == (None, PSEUDONYM("stu-0042"), "preschool")


def test_jwt_cookie_needs_configuring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `cookie:` in the policy, a session cookie proves nothing."""
    monkeypatch.setenv(KEY_ENV, HS_KEY)
    ident = JwtIdentity(jwt_settings(f"    key_env: {KEY_ENV}\n"), PSEUDONYM)
    token = jwt.encode(claims(), HS_KEY, algorithm="HS256")
    assert ask(ident, {}, {"tg_session": token}).problem == "missing"


def test_jwt_integer_claims(hs256: JwtIdentity) -> None:
    """Numeric grade and region claims are read like their strings."""
    token = jwt.encode(claims(grade=11, region=650000), HS_KEY, algorithm="HS256")
    s = ask(hs256, {"Authorization": f"Bearer {token}"})
    assert (s.grade, s.region) == (11, "650000")


def test_jwt_claims_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """student_claim, grade_claim and region_claim name the claims to read."""
    monkeypatch.setenv(KEY_ENV, HS_KEY)
    ident = JwtIdentity(jwt_settings(f"    key_env: {KEY_ENV}\n    student_claim: uid\n"
                                     "    grade_claim: nianji\n    region_claim: prov\n"),
                        PSEUDONYM)
    token = jwt.encode(claims(sub="someone-else", uid="stu-7", nianji="3", prov="110000"),
                       HS_KEY, algorithm="HS256")
    s = ask(ident, {"Authorization": f"Bearer {token}"})
    assert (s.problem, s.key, s.grade, s.region) == (None, PSEUDONYM("stu-7"), 3, "110000")


def test_jwt_rs256_with_key_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """An RS256 token verifies against the public key file, relative to the policy's folder."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "public.pem").write_bytes(public_pem(rsa_key))
    ident = JwtIdentity(jwt_settings("    algorithm: RS256\n    key_file: keys/public.pem\n"),
                        PSEUDONYM, base_dir=tmp_path)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    s = ask(ident, {"Authorization": f"Bearer {token}"})
    assert (s.problem, s.key, s.grade) == (None, PSEUDONYM("stu-0042"), 7)
    # and make_identify builds the same thing from the identity settings
    settings = identity_settings("  source: jwt\n  jwt:\n    algorithm: RS256\n"
                                 "    key_file: keys/public.pem\n")
    built = make_identify(settings, PSEUDONYM, base_dir=tmp_path)
    assert isinstance(built, JwtIdentity)
    assert ask(built, {"Authorization": f"Bearer {token}"}).key == PSEUDONYM("stu-0042")


def test_make_identify_defaults_to_headers() -> None:
    """source: header (the default) builds a HeaderIdentity."""
    assert isinstance(make_identify(identity_settings(), PSEUDONYM), HeaderIdentity)


def test_key_env_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key_env naming an unset variable is an error at load, naming the variable."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        load_key(jwt_settings(f"    key_env: {KEY_ENV}\n"), None)


def _rejected_tokens(rsa_key: rsa.RSAPrivateKey) -> dict[str, dict[str, str]]:
    now = int(time.time())
    pem = public_pem(rsa_key)
    return {
        "expired": {"Authorization": "Bearer " + jwt.encode(claims(exp=now - 60), HS_KEY,
                                                            algorithm="HS256")},
        "no-exp": {"Authorization": "Bearer " + jwt.encode(claims(exp=None), HS_KEY,
                                                           algorithm="HS256")},
        "bad-signature": {"Authorization": "Bearer " + jwt.encode(
            claims(), "another-key-that-is-32-bytes-long!!", algorithm="HS256")},
        "wrong-algorithm": {"Authorization": "Bearer " + jwt.encode(claims(), rsa_key,
                                                                    algorithm="RS256")},
        "alg-none": {"Authorization": "Bearer " + hand_signed(
            {"alg": "none", "typ": "JWT"}, claims(), None)},
        "hs256-signed-with-public-pem": {"Authorization": "Bearer " + hand_signed(
            {"alg": "HS256", "typ": "JWT"}, claims(), pem)},
        "garbage": {"Authorization": "Bearer not.a.jwt"},
        "not-base64": {"Authorization": "Bearer %%%"},
        "empty-bearer": {"Authorization": "Bearer "},
        "basic-auth": {"Authorization": "Basic c3R1OnB3"},
        "nothing": {},
        "id-header-is-not-enough": {"X-Student-Id": "stu-0042"},
    }


REJECTED = ["expired", "no-exp", "bad-signature", "wrong-algorithm", "alg-none",
            "hs256-signed-with-public-pem", "garbage", "not-base64", "empty-bearer",
            "basic-auth", "nothing", "id-header-is-not-enough"]


@pytest.mark.parametrize("name", REJECTED)
def test_jwt_rejected_tokens_prove_no_identity(hs256: JwtIdentity, rsa_key: rsa.RSAPrivateKey,
                                               name: str) -> None:
    """An expired, forged, wrongly signed or garbled token is problem "missing"."""
    s = ask(hs256, _rejected_tokens(rsa_key)[name])
    assert s.problem == "missing"
    assert s.key is None


def test_jwt_rs256_refuses_hmac_with_the_public_key(tmp_path: Path,
                                                   rsa_key: rsa.RSAPrivateKey) -> None:
    """An RS256 policy rejects an HS256 token keyed with its own public key (alg confusion)."""
    (tmp_path / "public.pem").write_bytes(public_pem(rsa_key))
    ident = JwtIdentity(jwt_settings("    algorithm: RS256\n    key_file: public.pem\n"),
                        PSEUDONYM, base_dir=tmp_path)
    token = hand_signed({"alg": "HS256", "typ": "JWT"}, claims(), public_pem(rsa_key))
    assert ask(ident, {"Authorization": f"Bearer {token}"}).problem == "missing"


@pytest.mark.parametrize(("sub", "problem"), [
    (None, "missing"), ("", "missing"), ("stu 42", "malformed"), ("x" * 129, "malformed"),
    ("stu-42\n", "malformed"),
], ids=["no-sub", "empty-sub", "space", "129-chars", "trailing-newline"])
def test_jwt_student_claim_is_validated_like_a_header(hs256: JwtIdentity, sub: Any,
                                                      problem: str | None) -> None:
    """A verified token's student claim obeys the same id rules as the header."""
    token = jwt.encode(claims(sub=sub) if sub is not None else
                       {k: v for k, v in claims().items() if k != "sub"},
                       HS_KEY, algorithm="HS256")
    s = ask(hs256, {"Authorization": f"Bearer {token}"})
    assert s.problem == problem


def test_jwt_bad_grade_claim_is_malformed(hs256: JwtIdentity) -> None:
    """A verified token with grade 13 is malformed."""
    token = jwt.encode(claims(grade="13"), HS_KEY, algorithm="HS256")
    assert ask(hs256, {"Authorization": f"Bearer {token}"}).problem == "malformed"


# ---------------------------------------------------------------- hostile values

def _growth(calls: Callable[[], None]) -> int:
    import gc
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        calls()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("header", ["X-Student-Id", "X-Student-Grade", "X-Student-Region"])
def test_invented_identity_values_do_not_grow_memory(header: str) -> None:
    """Thousands of distinct 8 KB identity values (invalid ids or grades, or
    an unusable region beside a valid id) leave memory where it was."""
    ident = header_identity()
    big = "x" * 8192

    def calls() -> None:
        for i in range(2000):
            headers = {"X-Student-Id": "stu-1", header: f"{i}{big}"}
            ask(ident, headers)

    assert _growth(calls) < 1_000_000


@pytest.mark.parametrize(("name", "first", "second"), [
    ("X-Student-Id", "s-1", "s-1"), ("X-Student-Grade", "5", "preschool"),
    ("X-Student-Region", "650000", "110000")])
def test_identity_headers_sent_twice_are_malformed(name: str, first: str, second: str) -> None:
    """Two copies of the id, grade or region header: malformed, whatever they say."""
    h = CIMultiDict([("X-Student-Id", "s-1")] if name != "X-Student-Id" else [])
    h.add(name, first)
    h.add(name.lower(), second)
    assert header_identity()(h, {}).problem == "malformed"


@pytest.mark.parametrize("name", ["X-Student-Id", "X-Student-Grade", "X-Student-Region"])
def test_header_sent_twice_is_malformed_after_the_same_student_was_remembered(
        name: str) -> None:
    """A remembered student sent again with one header twice (same value): malformed."""
    ident = header_identity()
    once = {"X-Student-Id": "s-1", "X-Student-Grade": "5", "X-Student-Region": "650000"}
    assert ident(CIMultiDict(once), {}).key is not None
    assert ident(CIMultiDict(once), {}).key is not None  # remembered
    twice = CIMultiDict(once)
    twice.add(name, once[name])
    assert ident(twice, {}).problem == "malformed"


def test_remembered_students_keep_grade_and_region_apart() -> None:
    """The same value as a grade or as a region is two different answers, also when remembered."""
    ident = header_identity()
    as_grade = CIMultiDict({"X-Student-Id": "s-1", "X-Student-Grade": "5"})
    as_region = CIMultiDict({"X-Student-Id": "s-1", "X-Student-Region": "5"})
    for _ in range(2):
        g, r = ident(as_grade, {}), ident(as_region, {})
        assert (g.grade, g.region) == (5, None)
        assert (r.grade, r.region) == (None, "5")
