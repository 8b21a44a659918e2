"""lessons.py: the lessons an instance watches for their end report."""

from __future__ import annotations

from gateway.activity import ActivityView
from gateway.clock import Limits
from gateway.lessons import LessonBook
from gateway.metrics import Metrics
from gateway.store.memory import MemoryStore


def test_full_book_drops_the_oldest_and_counts_it() -> None:
    """Past its size the book drops its oldest lesson, not all of them, and
    counts each drop in tutorgate_lesson_reports_dropped_total."""
    store, metrics = MemoryStore(), Metrics()
    book = LessonBook(store, metrics, store.clock, ActivityView(store.clock.now), max_owned=2)
    lim = Limits(60, 30)
    book.started("a", 1.0, lim, "subject", "base")
    book.started("b", 2.0, lim, "subject", "base")
    book.started("a", 3.0, lim, "subject", "base")  # a's new lesson: now the youngest
    book.started("c", 4.0, lim, "subject", "base")
    assert list(book.owned) == ["a", "c"]
    assert book.owned["a"].start == 3.0
    dropped = metrics.registry.get_sample_value("tutorgate_lesson_reports_dropped_total")
    assert dropped == 1.0
