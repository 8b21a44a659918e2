"""One owner for every lesson deadline (issue 11): the answer X-Lesson-Remaining
gives (rules.finish), the status endpoint's countdown (status.clock_view) and
the live cut-off (the decision's deadline, rescheduled by clock.lesson_deadline)
are one answer, to the second."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from kit import SUBJECT, make_policy, policy_text

from gateway import rules
from gateway.clock import ClockState, Limits, advance, in_lesson, lesson_deadline
from gateway.codes import Rule
from gateway.status import clock_view

NOW = 1_800_000_000.0
DAY = 739_000
POLICY = make_policy()
ROUTE = POLICY.routes[0]
PROFILE = POLICY.profile(None, None)
STUDENT = rules.Student(key="k")

limits_st = st.builds(
    Limits,
    max_duration=st.integers(1, 7200), min_break=st.integers(1, 3600),
    daily_max=st.none() | st.integers(1, 14_400), enforce_break=st.booleans(),
    enforce_daily=st.booleans())
state_st = st.builds(
    ClockState,
    start=st.just(0.0) | st.floats(NOW - 20_000, NOW),
    last=st.floats(NOW - 20_000, NOW), conns=st.integers(0, 2),
    day=st.sampled_from([DAY, DAY - 1]), used=st.floats(0, 14_400))


@settings(max_examples=400, deadline=None)
@given(limits=limits_st, state=state_st, until_curfew=st.floats(0.5, 40_000),
       later=st.floats(0, 600))
def test_header_status_and_cut_agree(limits: Limits, state: ClockState, until_curfew: float,
                                     later: float) -> None:
    """For any state and policy, an allowed step's X-Lesson-Remaining, the
    status countdown and the cut-off deadline (at once and later) agree."""
    if state.start and state.last < state.start:
        state = ClockState(state.start, state.start, state.conns, state.day, state.used)
    step, new = advance(state, NOW, limits, DAY, 50_000.0)
    if step.outcome != "allow":
        return
    pending = rules.Pending(ROUTE, STUDENT, PROFILE, limits, DAY, 50_000.0, until_curfew,
                            now=NOW)
    decision = rules.finish(pending, step)
    assert decision.allowed and decision.deadline is not None
    header = max(math.floor(decision.lesson_remaining or 0.0), 0)

    view = clock_view(new, NOW, limits, DAY, until_curfew)
    assert view["state"] == "lesson"
    assert abs(view["lesson_remaining"] - header) <= 1
    d = lesson_deadline(new, NOW, limits, DAY, until_curfew)
    assert abs(d.at - decision.deadline) < 1e-6
    assert d.rule == decision.end_rule

    # a reload reschedules the cut, or the status is asked, later in the lesson
    t = NOW + later
    if t < decision.deadline and in_lesson(new, t, limits):
        d2 = lesson_deadline(new, t, limits, DAY, until_curfew - later)
        assert abs(d2.at - decision.deadline) < 1e-6 and d2.rule == decision.end_rule
        later_view = clock_view(new, t, limits, DAY, until_curfew - later)
        assert abs(later_view["lesson_remaining"] - (decision.deadline - t)) < 1


def test_daily_limit_comes_first() -> None:
    """With the day's limit before the lesson limit, the deadline is the day's
    limit and says so; a curfew before both wins."""
    lim = Limits(max_duration=600, min_break=60, daily_max=100)
    state = ClockState(start=NOW - 30, last=NOW, day=DAY, used=50.0)
    d = lesson_deadline(state, NOW, lim, DAY, 1e6)
    assert (d.at, d.rule) == (NOW + 20, Rule.DAILY_LIMIT)
    d = lesson_deadline(state, NOW, lim, DAY, 5.0)
    assert (d.at, d.rule) == (NOW + 5, Rule.CURFEW)
    d = lesson_deadline(state, NOW, lim, DAY + 1, 1e6)  # a new day: used is yesterday's
    assert (d.at, d.rule) == (NOW + 70, Rule.DAILY_LIMIT)


async def test_status_countdown_is_the_header_under_a_daily_limit(upstream, gateways, http,
                                                                  store_url):
    """With daily_max 2s and a 10s lesson limit, GET /_tutorgate/status counts
    down what X-Lesson-Remaining says, not the lesson limit (the issue-11 bug)."""
    gw = await gateways(policy_text(max_duration="10s", min_break="5s", extra="daily_max: 2s"),
                        upstream.url, redis_url=store_url)
    who = {"X-Student-Id": "daily-2s"}
    async with http.get(gw.url(SUBJECT), headers=who) as r:
        assert r.status == 200
        header = int(r.headers["X-Lesson-Remaining"])
    async with http.get(gw.url("/_tutorgate/status"), headers=who) as r:
        body = await r.json()
    assert header in (1, 2)
    assert body["state"] == "lesson" and header - 1 <= body["lesson_remaining"] <= header
