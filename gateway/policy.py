"""The policy: YAML text -> validated, immutable `Policy`.

`parse_policy(text, source)` is shared by the server, its reloads and the
offline `tutorgate check`, so they can never disagree. Every problem is
reported with its field path and line (`PolicyError`). The parsed policy is
compiled once into one `Profile` per (region, stage), so a request only
does a dict lookup.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from .calendar import (
    CalendarYear,
    Holiday,
    NationalCalendar,
    RestCalendar,
    Vacation,
    missing_law_days,
)
from .clock import Limits
from .codes import SHADOWABLE
from .errors import PolicyError
from .messages import Locale
from .paths import Target, canonical
from .policy_schema import (
    OTHER_REGION,
    CalendarFileModel,
    IdentitySettings,
    JwtSettings,
    LessonOverride,
    LessonSettings,
    PolicyModel,
    RegionSettings,
    RestDaysOverride,
)

# The schema's names a caller of the policy reads (policy_schema.py holds them).
__all__ = [
    "SHADOWABLE", "IdentitySettings", "JwtSettings", "Limits", "Policy", "PolicyModel",
    "Profile", "Route", "decode_text", "load_policy", "parse_calendar_file", "parse_policy",
    "read_policy_text", "relative_reader", "stage_of",
]

# ---------------------------------------------------------------- compiled

@dataclass(frozen=True)
class Route:
    prefix: str
    kind: Literal["lesson", "forbidden"]
    category: str  # "subject" | "non_subject" | "forbidden"
    feature: str | None
    read_timeout: int | None


@dataclass(frozen=True)
class Profile:
    """Everything the rules need for one (region, stage)."""

    region: str            # metric label: a policy region code or "base"
    tz: ZoneInfo
    curfew_start: dt.time
    curfew_end: dt.time
    calendar: RestCalendar
    limits: Limits         # as the lesson clock takes them (shadowing applied)

    @property
    def clock(self) -> Limits:
        """The lesson-clock limits (the same object as `limits`)."""
        return self.limits


@dataclass(frozen=True)
class Policy:
    model: PolicyModel
    source: str
    sha: str
    routes: tuple[Route, ...]
    profiles: Mapping[tuple[str | None, str | None], Profile]
    national: NationalCalendar
    shadow: frozenset[str]
    route_keys: tuple[tuple[str, Route], ...]  # (the prefix's match key, route)

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def identity(self) -> IdentitySettings:
        return self.model.identity

    # Read on every request: cached on first use (a plain attribute then,
    # not a call; the model is immutable).
    @cached_property
    def locale(self) -> Locale:
        return self.model.locale

    @cached_property
    def fail_open(self) -> bool:
        return self.model.failure_mode == "fail_open"

    @cached_property
    def case_sensitive_paths(self) -> bool:
        return self.model.paths.case_sensitive

    def match(self, key: str) -> Route | None:
        """First route whose prefix the path starts with; `key` is the
        path's match key (paths.canonical), compared with the prefixes' own."""
        for prefix, r in self.route_keys:
            if key.startswith(prefix):
                return r
        return None

    def profile(self, region: str | None, stage: str | None) -> Profile:
        """Unknown regions get the base policy, labelled "other" in metrics."""
        p = self.profiles.get((region, stage))
        if p is None:
            p = self.profiles[(None if region is None else OTHER_REGION, stage)]
        return p

    def region_labels(self) -> tuple[str, ...]:
        """Every value the `region` metric label can take (a closed list)."""
        return ("base", "other", *self.model.regions)

    def knows_region(self, region: str) -> bool:
        return region in self.model.regions

    def is_shadowed(self, rule: str) -> bool:
        return rule in self.shadow


def stage_of(grade: int | None) -> str | None:
    """primary = grades 1-6, junior = 7-9, senior = 10-12."""
    if grade is None:
        return None
    if grade <= 6:
        return "primary"
    if grade <= 9:
        return "junior"
    return "senior"


def _compile(model: PolicyModel, source: str, sha: str, national: NationalCalendar) -> Policy:
    routes = tuple(
        Route(r.prefix, r.kind, r.category or "forbidden", r.feature, r.read_timeout)
        for r in model.routes)
    base_rd = model.rest_days

    def calendar(ov: RestDaysOverride | None) -> RestCalendar:
        def pick(name: str) -> Any:
            v = getattr(ov, name) if ov is not None else None
            return getattr(base_rd, name) if v is None else v
        return RestCalendar(
            weekends=pick("weekends"),
            statutory_holidays=pick("statutory_holidays"),
            extra_holidays=frozenset(pick("extra_holidays")),
            extra_workdays=frozenset(pick("extra_workdays")),
            vacations=tuple(Vacation(v.name, v.start, v.end) for v in pick("vacations")),
            national=national,
            makeup_days_are_rest_days=pick("makeup_days_are_rest_days"))

    def limits(*layers: tuple[LessonOverride | LessonSettings | None, int | None],
               ) -> tuple[int, int, int | None]:
        mx, mb, daily = model.lesson.max_duration, model.lesson.min_break, model.daily_max
        for lesson, dmax in layers:
            if lesson is not None:
                mx = lesson.max_duration or mx
                mb = lesson.min_break or mb
            if dmax is not None:
                daily = dmax
        return mx, mb, daily

    shadow = frozenset(SHADOWABLE) if model.mode == "shadow" else frozenset(model.shadow_rules)
    profiles: dict[tuple[str | None, str | None], Profile] = {}
    regions: list[tuple[str | None, RegionSettings | None]] = [(None, None)]
    regions += list(model.regions.items())
    # The base settings once more under the label "other", for codes the
    # policy does not list (a region label must come from a closed list).
    regions.append((OTHER_REGION, None))
    base_cal = calendar(None)
    for code, reg in regions:
        tz = ZoneInfo((reg.timezone if reg and reg.timezone else None) or model.timezone)
        cf = (reg.curfew if reg and reg.curfew else None) or model.curfew
        cal = calendar(reg.rest_days) if reg and reg.rest_days else base_cal
        region_layer = (reg.lesson if reg else None, reg.daily_max if reg else None)
        for stage in (None, "primary", "junior", "senior"):
            st = model.stages.get(stage) if stage else None
            stage_layer = (st.lesson if st else None, st.daily_max if st else None)
            mx, mb, daily = limits(region_layer, stage_layer)
            profiles[(code, stage)] = Profile(
                region="other" if code == OTHER_REGION else code or "base", tz=tz,
                curfew_start=cf.start, curfew_end=cf.end,
                calendar=cal,
                limits=Limits(mx, mb, daily, enforce_break="break_required" not in shadow,
                              enforce_daily="daily_limit" not in shadow))
    # prefixes were validated: canonical() accepts them
    keys = tuple((t.key if isinstance(t := canonical(r.prefix, model.paths.case_sensitive),
                                      Target) else r.prefix, r) for r in routes)
    return Policy(model=model, source=source, sha=sha, routes=routes, profiles=profiles,
                  national=national, shadow=shadow, route_keys=keys)


# ---------------------------------------------------------------- parsing

def _fmt_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself is wrong"
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_of(root: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """Line (1-based) of the YAML node at `loc`, or of its nearest parent."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        nxt: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if str(k.value) == str(part):
                    nxt = v
                    line = k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and 0 <= part < len(node.value):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
    return line


def _step(tp: Any, part: int | str) -> list[Any]:
    """The types found at `part` (a key or an index) inside a value of type `tp`."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(part))
        return [] if field is None else [field.annotation]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType, Annotated):
        inner = args if origin is not Annotated else args[:1]
        return [t for a in inner for t in _step(a, part)]
    if origin in (tuple, list) and isinstance(part, int) and args:
        return [args[0]]
    if origin is dict and len(args) == 2:  # a region code, a stage name
        return [args[1]]
    return []


def _keys_at(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The keys a policy may use in the mapping at `loc`."""
    tps: list[Any] = [model]
    for part in loc:
        tps = [t for tp in tps for t in _step(tp, part)]
    out: set[str] = set()
    for tp in tps:  # the mapping itself may sit inside an Optional
        for t in [tp, *typing.get_args(tp)]:
            if isinstance(t, type) and issubclass(t, BaseModel):
                out.update(t.model_fields)
    return sorted(out)


def _unknown_key(model: type[BaseModel] | None, loc: Sequence[int | str]) -> str:
    """"unknown key", with the nearest allowed spelling when there is one."""
    if model is None or not loc:
        return "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), _keys_at(model, loc[:-1]), n=1, cutoff=0.75)
    return f"unknown key; did you mean {close[0]}?" if close else "unknown key"


def _message(err: Mapping[str, Any], model: type[BaseModel] | None = None) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return _unknown_key(model, [p for p in err["loc"] if p != "[key]"])
    if kind == "missing":
        return "required"
    msg = str(err.get("msg", "invalid"))
    # pydantic prefixes errors raised in our validators with "Value error, "
    return msg.removeprefix("Value error, ")


def _validation_problems(exc: ValidationError, root: yaml.Node | None,
                         prefix: Sequence[int | str] = (),
                         model: type[BaseModel] | None = None,
                         ) -> list[tuple[str, str, int | None]]:
    problems = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        problems.append((_fmt_loc([*prefix, *loc]), _message({**err, "loc": loc}, model),
                         _line_of(root, loc)))
    return problems


def _load_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise PolicyError(source, [("", f"not valid YAML: {problem}", line)]) from None
    except ValueError as e:
        # PyYAML builds dates itself: 2026-02-30 looks like a date and fails here.
        line, value = _bad_date(text)
        what = f"{value} is not a date ({e})" if value else f"not a valid value: {e}"
        raise PolicyError(source, [("", what, line)]) from None
    return data, node


_DATE_LIKE = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")


def _bad_date(text: str) -> tuple[int | None, str | None]:
    """The first line holding a date-shaped value that is no date, and the value."""
    for n, line in enumerate(text.splitlines(), 1):
        for m in _DATE_LIKE.finditer(line):
            try:
                dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            except ValueError:
                return n, m.group(0)
    return None, None


FileReader = Callable[[str], str]
EnvLookup = Callable[[str], str | None]


def decode_text(raw: bytes, what: str) -> str:
    """UTF-8 text, or ValueError saying where it is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{what} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start} (line {line})") from None


def _referenced(model: PolicyModel, node: yaml.Node | None, read_file: FileReader | None,
                env: EnvLookup | None) -> list[tuple[str, str, int | None]]:
    """Problems with what the policy names outside itself: the JWT key's
    environment variable or file, each calendar file. `read_file` and `env`
    are passed in (the core does no I/O); a lookup not given is not checked,
    except calendar files, which a policy without a file cannot have."""
    problems: list[tuple[str, str, int | None]] = []
    jwt = model.identity.jwt if model.identity.source == "jwt" else None
    key_env = jwt.key_env if jwt is not None else None
    if key_env is not None and env is not None and not env(key_env):
        loc: list[int | str] = ["identity", "jwt", "key_env"]
        problems.append((_fmt_loc(loc), f"environment variable {key_env} is not set "
                         "(or is empty)", _line_of(node, loc)))
    if jwt is not None and jwt.key_file is not None and read_file is not None:
        loc = ["identity", "jwt", "key_file"]
        why = None
        try:
            if not read_file(jwt.key_file).strip():
                why = f"{jwt.key_file} is empty"
        except OSError as e:
            why = f"cannot read {jwt.key_file}: {e.strerror or e}"
        except ValueError as e:
            why = str(e)
        if why is not None:
            problems.append((_fmt_loc(loc), why, _line_of(node, loc)))
    return problems


def parse_calendar_file(text: str, source: str) -> CalendarYear:
    data, node = _load_yaml(text, source)
    try:
        m = CalendarFileModel.model_validate(data)
    except ValidationError as e:
        raise PolicyError(source, _validation_problems(e, node, model=CalendarFileModel)) from None
    cy = CalendarYear(
        year=m.year,
        holidays=tuple(Holiday(h.name, h.start, h.end) for h in m.holidays),
        workdays=frozenset(m.workdays))
    # Every State Council notice holds the law's statutory days: a file that
    # misses one is mistyped, and loading it would open a holiday to classes.
    missing = missing_law_days(cy) if cy.year >= 2008 else []
    if missing:
        days = ", ".join(f"{d} ({name})" for d, name in missing)
        raise PolicyError(source, [("holidays", f"misses statutory day(s) fixed by law "
                                    f"(全国年节及纪念日放假办法): {days}",
                                    _line_of(node, ["holidays"]))])
    return cy


def parse_policy(text: str, source: str = "<policy>",
                 read_file: FileReader | None = None, env: EnvLookup | None = None) -> Policy:
    """Validate policy text. `read_file(relative_path)` loads calendar files
    and the JWT key file (paths relative to the policy); without it, naming
    a calendar file is an error. `env(name)` looks up the JWT key's
    environment variable. Unreadable or non-UTF-8 files are problems too
    (`read_file` raises OSError or ValueError for them)."""
    data, node = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise PolicyError(source, [("", "a policy is a YAML mapping (version, routes, ...)",
                                    node.start_mark.line + 1 if node is not None else None)])
    try:
        model = PolicyModel.model_validate(data)
    except ValidationError as e:
        raise PolicyError(source, _validation_problems(e, node, model=PolicyModel)) from None
    years: list[CalendarYear] = []
    problems = _referenced(model, node, read_file, env)
    for i, rel in enumerate(model.rest_days.calendar_files):
        loc: list[int | str] = ["rest_days", "calendar_files", i]
        if read_file is None:
            problems.append((_fmt_loc(loc), "calendar files need a policy loaded from a file",
                             _line_of(node, loc)))
            continue
        try:
            years.append(parse_calendar_file(read_file(rel), rel))
        except OSError as e:
            problems.append((_fmt_loc(loc), f"cannot read {rel}: {e.strerror or e}",
                             _line_of(node, loc)))
        except PolicyError as e:
            problems.extend((_fmt_loc(loc), line.removeprefix(""), _line_of(node, loc))
                            for line in e.lines())
        except ValueError as e:  # not UTF-8 (decode_text)
            problems.append((_fmt_loc(loc), str(e), _line_of(node, loc)))
    if problems:
        raise PolicyError(source, problems)
    national = NationalCalendar(years)
    sha = hashlib.sha256(text.encode()).hexdigest()[:12]
    return _compile(model, source, sha, national)


def read_policy_text(path: str | Path) -> str:
    """A policy file's text, or PolicyError (unreadable, not UTF-8)."""
    try:
        raw = Path(path).read_bytes()
        return decode_text(raw, "the policy")
    except OSError as e:
        raise PolicyError(str(path),
                          [("", f"cannot read policy: {e.strerror or e}", None)]) from None
    except ValueError as e:
        raise PolicyError(str(path), [("", str(e), None)]) from None


def relative_reader(base: Path) -> FileReader:
    """Reads files a policy names, relative to `base` (its directory), as UTF-8."""
    def read(rel: str) -> str:
        return decode_text((base / rel).read_bytes(), rel)
    return read


def load_policy(path: str | Path, env: EnvLookup | None = os.environ.get) -> Policy:
    """Read and parse a policy file: calendar and key files resolve next to
    it, key variables in `env` (this process's environment)."""
    p = Path(path)
    return parse_policy(read_policy_text(p), str(path), relative_reader(p.parent), env)
