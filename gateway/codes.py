"""Every rule code tutorgate speaks, in one place.

The bottom layer: imports nothing of the package, so the engine, the
metrics, the close codes of live connections, the policy's shadow lists,
the messages and the stores' script outcomes can all share it. The values
are the contract's codes: a `Rule` is a `str` and compares, hashes, prints
and serialises as its code.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Rule(StrEnum):
    # the decision table, in the contract's order
    BAD_PATH = "bad_path"                    # the path cannot be made safe (paths.py)
    FORBIDDEN_FEATURE = "forbidden_feature"
    IDENTITY_REQUIRED = "identity_required"
    BAD_IDENTITY = "bad_identity"
    PRESCHOOL = "preschool"
    CURFEW = "curfew"
    REST_DAY = "rest_day"
    DAILY_LIMIT = "daily_limit"
    BREAK_REQUIRED = "break_required"
    STATE_UNAVAILABLE = "state_unavailable"
    # answers about the transport, not the student
    UPSTREAM_ERROR = "upstream_error"
    BODY_TOO_LARGE = "body_too_large"
    # what ends a lesson connection early (live cut-offs)
    LESSON_LIMIT = "lesson_limit"
    POLICY = "policy"                        # a reload forbids the open lesson
    SHUTDOWN = "shutdown"                    # not enforcement: the process stops


# HTTP status of each denial.
STATUS: Final[dict[str, int]] = {
    Rule.BAD_PATH: 400,
    Rule.FORBIDDEN_FEATURE: 403, Rule.IDENTITY_REQUIRED: 401, Rule.BAD_IDENTITY: 400,
    Rule.PRESCHOOL: 403, Rule.CURFEW: 403, Rule.REST_DAY: 403, Rule.DAILY_LIMIT: 429,
    Rule.BREAK_REQUIRED: 429, Rule.STATE_UNAVAILABLE: 503, Rule.UPSTREAM_ERROR: 502,
    Rule.BODY_TOO_LARGE: 413,
}

# Rules a policy may shadow (mode: shadow, shadow_rules).
SHADOWABLE: Final[tuple[Rule, ...]] = (
    Rule.FORBIDDEN_FEATURE, Rule.IDENTITY_REQUIRED, Rule.BAD_IDENTITY, Rule.PRESCHOOL,
    Rule.CURFEW, Rule.REST_DAY, Rule.DAILY_LIMIT, Rule.BREAK_REQUIRED)

# Rules that deny on a lesson route (metrics priming: every series exists).
LESSON_DENIALS: Final[tuple[Rule, ...]] = (
    Rule.IDENTITY_REQUIRED, Rule.BAD_IDENTITY, Rule.PRESCHOOL, Rule.CURFEW, Rule.DAILY_LIMIT,
    Rule.BREAK_REQUIRED, Rule.STATE_UNAVAILABLE)

# WebSocket close codes of cut-offs (4000-4999 is the application range).
CLOSE_CODES: Final[dict[str, int]] = {
    Rule.LESSON_LIMIT: 4001, Rule.CURFEW: 4002, Rule.DAILY_LIMIT: 4003, Rule.POLICY: 4004,
    Rule.SHUTDOWN: 1001,
}

# Cuts that enforce a rule (counted); a shutdown is not enforcement.
ENFORCING: Final[frozenset[Rule]] = frozenset(
    {Rule.LESSON_LIMIT, Rule.CURFEW, Rule.DAILY_LIMIT, Rule.POLICY})
