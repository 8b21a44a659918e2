"""Durations as a person reads them (explain's texts and the rules' reasons).

Pure: no I/O, no clock.
"""

from __future__ import annotations


def human_duration(seconds: int) -> str:
    """Whole seconds as a reader counts them: 45 s, 12 m 5 s, 3 h 20 m, 4 d 5 h."""
    if seconds < 60:
        return f"{seconds} s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m} m {s} s" if s else f"{m} m"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m} m" if m else f"{h} h"
    d, h = divmod(h, 24)
    return f"{d} d {h} h" if h else f"{d} d"
