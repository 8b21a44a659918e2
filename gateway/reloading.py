"""Where the live policy comes from: its file (watched) and fleet pushes.

A text that does not validate is refused and counted
(`tutorgate_policy_reload_failures_total`), one ERROR line per problem, and
the policy in force stays. Of the file and a fleet push, the newer wins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .errors import PolicyError
from .fleet import POLICY_KEY
from .identity import Identify, Pseudonymizer, make_identify
from .metrics import Metrics
from .policy import Policy, decode_text, parse_policy, read_policy_text, relative_reader

log = logging.getLogger("tutorgate")



def file_stamp(path: str) -> tuple[float, int] | None:
    """What tells a changed policy file: its mtime and size (None if it
    cannot be read). os.stat follows the kubelet's ..data symlink swap."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime, st.st_size

class PolicySource:
    def __init__(self, path: str, policy_dir: Path | None, pseudonym: Pseudonymizer,
                 metrics: Metrics, current: Callable[[], Policy],
                 apply: Callable[[Policy, Identify], None]) -> None:
        self.path = path
        self.policy_dir = policy_dir
        self.pseudonym = pseudonym
        self.metrics = metrics
        self.current = current   # the live policy
        self.apply = apply       # make a validated policy the live one
        self._stamp_seen = file_stamp(self.path)
        # when the live policy was written: the newer of file and fleet push wins
        self._time = self._stamp_seen[0] if self._stamp_seen else 0.0

    def reload_text(self, text: str, source: str) -> bool:
        """Validate and apply; an invalid policy is refused and counted, and
        the old one stays live."""
        try:
            # what it names (key variables and files, calendar files) is
            # checked here too: a reload must not fail after it was accepted
            policy = parse_policy(text, source, relative_reader(self.policy_dir or Path(".")),
                                  os.environ.get)
            if policy.sha == self.current().sha:
                return True
            try:
                identify = make_identify(policy.identity, self.pseudonym, self.policy_dir)
            except (OSError, ValueError) as e:  # the key changed since the check
                raise PolicyError(source, [("identity.jwt", f"cannot load the key: {e}",
                                            None)]) from None
        except PolicyError as e:
            self.refuse(e)
            return False
        self.apply(policy, identify)
        return True

    def refuse(self, e: PolicyError) -> None:
        """A policy that is not applied: counted, one ERROR line per problem."""
        self.metrics.policy_reload_failures.inc()
        for line in e.lines():
            log.error("policy reload refused: %s", line)

    def reload_file(self) -> bool:
        """Read the policy file again: applied if valid."""
        path = self.path
        try:
            text = read_policy_text(path)
        except PolicyError as e:
            self.refuse(e)
            return False
        return self.reload_text(text, path)

    async def watch(self) -> None:
        """Reload the file if it changed since last seen (a scheduled job)."""
        stamp = file_stamp(self.path)
        if stamp is not None and stamp != self._stamp_seen:
            self._stamp_seen = stamp
            self._time = max(self._time, stamp[0])
            self.reload_file()

    def apply_pushed(self, raw: bytes, pushed_at: float) -> None:
        """A policy published with `tutorgate policy push` (fleet-wide).
        Anything may be in Redis: a text that is not UTF-8 is refused and
        counted like any invalid policy."""
        if pushed_at <= self._time:
            return
        self._time = pushed_at
        source = "redis:" + POLICY_KEY
        try:
            text = decode_text(raw, "the pushed policy")
        except ValueError as e:
            self.refuse(PolicyError(source, [("", str(e), None)]))
            return
        self.reload_text(text, source)
