"""Our exceptions. Imports nothing of the package (bottom layer)."""

from __future__ import annotations


class TutorgateError(Exception):
    """Base of every error tutorgate raises on purpose."""


class PolicyError(TutorgateError):
    """A policy did not validate. Carries one line per problem."""

    def __init__(self, source: str, problems: list[tuple[str, str, int | None]]) -> None:
        # problems: (field.path, message, line number or None)
        self.source = source
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """`FILE: field.path: message (line N)`, the contract's shape."""
        out = []
        for path, message, line in self.problems:
            where = f" (line {line})" if line else ""
            out.append(f"{self.source}: {path or '<root>'}: {message}{where}")
        return out


class StoreUnavailable(TutorgateError):
    """The state store did not answer (Redis down, timeout, refused)."""


class CalendarGap(TutorgateError):
    """A date the calendar data does not cover was asked about."""
