"""The state stores: one lesson-clock suite for memory and Redis, then Redis only.

Times are injected (`now=`) so nothing sleeps; Redis runs for real
(tests/conftest.py). The Redis store runs store/lua/*.lua, the memory store
runs gateway/clock.py: this suite is what keeps the two in step.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from conftest import RedisServer

from gateway.clock import ClockLimits, ClockState, Step
from gateway.errors import StoreUnavailable
from gateway.identity import Pseudonymizer
from gateway.store.base import LEASE_SECONDS, Cut, StateStore
from gateway.store.memory import MemoryStore
from gateway.store.redis import ADVANCE, FAST_MARGIN, TOUCH_EVERY, RedisStore
from gateway.timesource import StoreClock

T0 = 1_767_225_600.0          # 2026-01-01T00:00:00Z
DAY = 20_000
DAY_END = 40_000.0
MAX, BRK = 1800.0, 600.0
L = ClockLimits(max_duration=MAX, min_break=BRK)
LD = ClockLimits(max_duration=MAX, min_break=BRK, daily_max=3000.0)


@pytest.fixture
def key() -> str:
    """A fresh student pseudonym per test (tests share the session's Redis)."""
    return uuid.uuid4().hex


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        s: StateStore = MemoryStore()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisStore(server.url)
    yield s
    await s.close()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


async def step(store: StateStore, key: str, now: float, limits: ClockLimits = L,
               day: int = DAY, hold: str | None = None) -> Step:
    return await store.advance(key, limits, day, DAY_END, hold=hold, now=now)


async def full_lesson(store: StateStore, key: str, limits: ClockLimits = L) -> None:
    """A lesson from T0, active up to its limit T0 + MAX: its break ends at T0 + MAX + BRK."""
    for t in (0, 500, 1000, 1500, 1790):
        assert (await step(store, key, T0 + t, limits)).outcome == "allow"


# ------------------------------------------------------------ both stores


async def test_first_request_starts_a_lesson(store: StateStore, key: str) -> None:
    """The first lesson request starts a lesson now with the whole max_duration left."""
    s = await step(store, key, T0)
    assert s == Step("allow", T0, T0, MAX, None, started=True)


async def test_lesson_continues(store: StateStore, key: str) -> None:
    """Requests inside a lesson continue it and report the time left."""
    await step(store, key, T0)
    s = await step(store, key, T0 + 250.5)
    assert s == Step("allow", T0 + 250.5, T0, MAX - 250.5, None)


async def test_limit_reached_requires_the_break(store: StateStore, key: str) -> None:
    """At the limit the break starts; retry_after = start + max + break - now."""
    await full_lesson(store, key)
    for now in (T0 + MAX, T0 + MAX + 123.25):
        s = await step(store, key, now)
        assert s == Step("break_required", now, 0.0, None, T0 + MAX + BRK - now)
    s = await step(store, key, T0 + MAX + BRK)
    assert s == Step("allow", T0 + MAX + BRK, T0 + MAX + BRK, MAX, None, started=True,
                     ended_duration=MAX, break_taken=BRK, ended_start=T0)


async def test_quiet_gap_ends_the_lesson(store: StateStore, key: str) -> None:
    """min_break without activity was the break: a new lesson starts."""
    await step(store, key, T0)
    await step(store, key, T0 + 300)
    s = await step(store, key, T0 + 300 + BRK)
    assert s == Step("allow", T0 + 900, T0 + 900, MAX, None, started=True,
                     ended_duration=300.0, break_taken=BRK, ended_start=T0)


async def test_short_gap_does_not_reset(store: StateStore, key: str) -> None:
    """A gap shorter than min_break keeps the same lesson."""
    await step(store, key, T0)
    await step(store, key, T0 + 300)
    s = await step(store, key, T0 + 300 + BRK - 0.5)
    assert (s.outcome, s.started, s.start) == ("allow", False, T0)


async def test_denials_leave_the_state_unchanged(store: StateStore, key: str) -> None:
    """A denied request neither extends the break nor counts as lesson time."""
    await full_lesson(store, key)
    before = await store.peek(key, now=T0 + MAX + 1)
    for now in (T0 + MAX + 1, T0 + MAX + 300, T0 + MAX + BRK - 0.001):
        assert (await step(store, key, now, hold="c1")).outcome == "break_required"
    assert await store.peek(key, now=T0 + MAX + 1) == before
    assert before[0].conns == 0  # a denied step leases nothing


async def test_daily_limit_in_a_lesson(store: StateStore, key: str) -> None:
    """The lesson's remaining time stops at daily_max, and then requests get daily_limit."""
    await full_lesson(store, key, LD)
    s = await step(store, key, T0 + MAX + BRK, LD)          # second lesson: 1200 s left today
    assert (s.started, s.remaining) == (True, 1200.0)
    for t in (500, 1000, 1190):
        s = await step(store, key, T0 + MAX + BRK + t, LD)
        assert (s.outcome, s.remaining) == ("allow", 1200.0 - t)
    s = await step(store, key, T0 + MAX + BRK + 1200, LD)   # 3000 s spent
    assert s == Step("daily_limit", s.now, T0 + MAX + BRK, None, DAY_END)


async def test_daily_limit_before_break_required(store: StateStore, key: str) -> None:
    """A lesson that spends the day answers its break, and after, with daily_limit."""
    day_is_one_lesson = replace(L, daily_max=MAX)
    await full_lesson(store, key, day_is_one_lesson)
    for now in (T0 + MAX + 10, T0 + MAX + BRK + 10):
        s = await step(store, key, now, day_is_one_lesson)
        assert s == Step("daily_limit", now, 0.0, None, DAY_END)


async def test_daily_counter_resets_on_a_new_day(store: StateStore, key: str) -> None:
    """A new day starts with no lesson time used."""
    day_is_one_lesson = replace(L, daily_max=MAX)
    await full_lesson(store, key, day_is_one_lesson)
    now = T0 + MAX + BRK
    assert (await step(store, key, now, day_is_one_lesson)).outcome == "daily_limit"
    s = await step(store, key, now, day_is_one_lesson, day=DAY + 1)
    assert (s.outcome, s.started, s.remaining) == ("allow", True, MAX)
    state, _ = await store.peek(key, now=now)
    assert (state.day, state.used) == (DAY + 1, 0.0)


async def test_shadowed_rules_allow(store: StateStore, key: str) -> None:
    """Shadowed break or daily rules let the request through and say which rule."""
    no_break = replace(LD, enforce_break=False)
    await full_lesson(store, key, no_break)
    s = await step(store, key, T0 + MAX + 5, no_break)
    assert (s.outcome, s.started, s.shadowed) == ("allow", True, ("break_required",))
    no_daily = replace(LD, enforce_daily=False)
    for t in (500, 1000):  # 1800 s of the first lesson + 1000 s: under daily_max
        s = await step(store, key, T0 + MAX + 5 + t, no_daily)
        assert (s.outcome, s.shadowed) == ("allow", ())
    s = await step(store, key, T0 + MAX + 5 + 1300, no_daily)
    assert (s.outcome, s.started, s.shadowed) == ("allow", False, ("daily_limit",))
    assert s.remaining == MAX - 1300


async def test_open_connection_keeps_the_lesson_going(store: StateStore, key: str) -> None:
    """A held connection is activity: the lesson lasts past the quiet time, not past the limit."""
    await step(store, key, T0, hold="ws1")
    await store.renew([(key, "ws1")], now=T0 + 20)
    await store.renew([(key, "ws1")], now=T0 + 40)
    s = await step(store, key, T0 + 45)
    assert (s.started, s.start) == (False, T0)
    state, now = await store.peek(key, now=T0 + 50)
    assert (state.conns, state.last, now) == (1, T0 + 45, T0 + 50)
    for t in range(60, 1800, 25):  # renewed every 25 s, as live.py does
        await store.renew([(key, "ws1")], now=T0 + t)
    assert (await step(store, key, T0 + 1799)).started is False
    assert (await step(store, key, T0 + MAX)).outcome == "break_required"


async def test_release_is_activity_until_then(store: StateStore, key: str) -> None:
    """Closing a held connection counts as activity at that moment; the quiet time starts there."""
    await step(store, key, T0, hold="ws1")
    await store.renew([(key, "ws1")], now=T0 + 25)
    await store.release(key, "ws1", now=T0 + 30)
    state, _ = await store.peek(key, now=T0 + 31)
    assert (state.conns, state.last) == (0, T0 + 30)
    s = await step(store, key, T0 + 30 + BRK - 1)
    assert s.started is False
    s = await step(store, key, T0 + 30 + BRK - 1 + BRK)
    assert (s.started, s.ended_duration) == (True, 30 + BRK - 1)


async def test_lease_expires_without_renewal(store: StateStore, key: str) -> None:
    """A lease not renewed (its instance died) stops counting after LEASE_SECONDS."""
    await step(store, key, T0, hold="ws1")
    state, _ = await store.peek(key, now=T0 + LEASE_SECONDS - 0.001)
    assert state.conns == 1
    state, _ = await store.peek(key, now=T0 + LEASE_SECONDS)
    assert state.conns == 0
    s = await step(store, key, T0 + BRK)
    assert (s.started, s.ended_duration, s.break_taken) == (True, 0.0, BRK)


async def test_lapsed_lease_is_not_revived(store: StateStore, key: str) -> None:
    """Renewing or releasing a lapsed lease changes nothing."""
    await step(store, key, T0, hold="ws1")
    await store.renew([(key, "ws1")], now=T0 + LEASE_SECONDS + 1)
    await store.release(key, "ws1", now=T0 + LEASE_SECONDS + 2)
    state, _ = await store.peek(key, now=T0 + LEASE_SECONDS + 3)
    assert (state.conns, state.last) == (0, T0)


async def test_leases_of_many_connections_and_students(store: StateStore, key: str) -> None:
    """Each connection id holds its own lease; one renew call covers many students."""
    other = uuid.uuid4().hex
    await step(store, key, T0, hold="a")
    await step(store, key, T0 + 1, hold="b")
    await step(store, other, T0 + 2, hold="c")
    await store.renew([(key, "a"), (key, "b"), (other, "c"), (other, "unknown")], now=T0 + 20)
    await store.release(key, "a", now=T0 + 21)
    mine, _ = await store.peek(key, now=T0 + 45)
    theirs, _ = await store.peek(other, now=T0 + 45)
    assert (mine.conns, mine.last, theirs.conns, theirs.last) == (1, T0 + 21, 1, T0 + 20)
    await store.renew([], now=T0 + 46)  # nothing to do is fine


async def test_renew_of_many_students(store: StateStore, key: str) -> None:
    """One renew call extends the leases of over a thousand students (several writes)."""
    keys = [f"{key}-{i}" for i in range(1200)]
    await asyncio.gather(*(step(store, k, T0, hold="ws") for k in keys))
    await store.renew([(k, "ws") for k in keys], now=T0 + 25)
    states = await asyncio.gather(*(store.peek(k, now=T0 + 50) for k in keys[::97]))
    assert {(st.conns, st.last) for st, _ in states} == {(1, T0 + 25)}


async def test_peek_unknown_student(store: StateStore, key: str) -> None:
    """A student never seen has the empty clock."""
    assert await store.peek(key, now=T0) == (ClockState(), T0)


async def test_store_clock(store: StateStore, key: str) -> None:
    """Without `now` the store uses its own clock and says which now it used."""
    before = time.time()
    s = await store.advance(key, L, DAY, DAY_END)
    assert before - 1 < s.now < time.time() + 1 and s.start == s.now
    assert abs(await store.now() - s.now) < 1
    _, now = await store.peek(key)
    assert now >= s.now
    assert await store.ping()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_published_cut_reaches_handlers(store: StateStore, key: str, kind: str) -> None:
    """A cut reaches every subscribed handler (this instance's too), sync or async."""
    got: asyncio.Queue[Cut] = asyncio.Queue()

    async def on_cut_async(cut: Cut) -> None:
        got.put_nowait(cut)

    await store.subscribe_cuts(got.put_nowait if kind == "sync" else on_cut_async)
    await store.publish_cut(Cut(key, "policy", "here"))
    cut = await wait_for_key(got, key)
    assert cut == Cut(key, "policy", "here")


async def wait_for_key(queue: asyncio.Queue[Cut], key: str, within: float = 1.0) -> Cut:
    """The first cut for `key` (other tests share the channel)."""
    async with asyncio.timeout(within):
        while True:
            cut = await queue.get()
            if cut.key == key:
                return cut


# ------------------------------------------------------------ Redis only


async def test_redis_mirrors_the_clock_on_random_histories(redis_server: RedisServer) -> None:
    """advance.lua & co. give exactly what clock.py gives, float for float, on random histories."""
    rnd = random.Random(20260101)
    red, mem = RedisStore(redis_server.url), MemoryStore()
    variants = [L, LD, replace(LD, enforce_break=False), replace(LD, enforce_daily=False),
                replace(LD, enforce_break=False, enforce_daily=False),
                ClockLimits(90.0, 45.5, 200.25)]
    try:
        for _ in range(20):
            key, t, day = uuid.uuid4().hex, T0 + rnd.random(), DAY
            limits = rnd.choice(variants)
            mx, brk = limits.max_duration, limits.min_break
            conns: list[str] = []
            for i in range(150):
                # steps around every boundary: lease, break, limit; and random ones
                t += rnd.choice([0.0, 0.25, LEASE_SECONDS - 0.001, LEASE_SECONDS, brk * 0.5,
                                 brk - 0.001, brk, mx * 0.3, mx - 0.5, rnd.random() * brk,
                                 rnd.random() * 2 * mx])
                if rnd.random() < 0.02:
                    day += 1
                op = rnd.random()
                if op < 0.6:
                    hold = f"c{i}" if rnd.random() < 0.3 else None
                    a = await red.advance(key, limits, day, DAY_END - (t - T0), hold=hold, now=t)
                    b = await mem.advance(key, limits, day, DAY_END - (t - T0), hold=hold, now=t)
                    assert a == b, (i, t)
                    if hold and a.outcome == "allow":
                        conns.append(hold)
                elif op < 0.75 and conns:
                    cid = conns.pop(rnd.randrange(len(conns)))
                    await red.release(key, cid, now=t)
                    await mem.release(key, cid, now=t)
                elif op < 0.9 and conns:
                    pairs = [(key, c) for c in conns]
                    await red.renew(pairs, now=t)
                    await mem.renew(pairs, now=t)
                assert await red.peek(key, now=t) == await mem.peek(key, now=t), (i, t)
    finally:
        await red.close()


async def test_keys_carry_the_hash_tag_and_expire(redis_server: RedisServer,
                                                  client: aioredis.Redis) -> None:
    """Keys are tutorgate:{pseudonym}:..., never hold the raw id, and all expire."""
    raw = f"student-{uuid.uuid4().hex[:8]}"
    key = Pseudonymizer(b"test secret")(raw)
    store = RedisStore(redis_server.url)
    try:
        await store.advance(key, L, DAY, 3600.0, hold="ws1", now=T0)
    finally:
        await store.close()
    mine = sorted([k.decode() async for k in client.scan_iter(match=f"*{key}*")])
    assert mine == [f"tutorgate:{{{key}}}:clock", f"tutorgate:{{{key}}}:conns"]
    assert not [k async for k in client.scan_iter(match=f"*{raw}*")]
    clock_ttl = await client.pttl(mine[0])
    conns_ttl = await client.pttl(mine[1])
    # clock: max(start + max + break, now + seconds to day end) + 60 s; conns: lease + 60 s
    assert (3600 + 60) * 1000 - 5000 < clock_ttl <= (3600 + 60) * 1000
    assert (LEASE_SECONDS + 60) * 1000 - 5000 < conns_ttl <= (LEASE_SECONDS + 60) * 1000


async def test_noscript_is_recovered(redis_server: RedisServer, client: aioredis.Redis,
                                     key: str) -> None:
    """After SCRIPT FLUSH (restart, failover) calls still work and reload the script."""
    store = RedisStore(redis_server.url)
    try:
        await step(store, key, T0)
        await client.script_flush()
        s = await step(store, key, T0 + 1)
        assert (s.outcome, s.start) == ("allow", T0)
        assert await client.script_exists(ADVANCE.sha) == [True]
        await client.script_flush()
        await asyncio.gather(*(step(store, key, T0 + 2) for _ in range(20)))
        await store.renew([(key, "x")], now=T0 + 3)
        assert (await store.peek(key, now=T0 + 3))[0].last == T0 + 2
    finally:
        await store.close()


async def test_concurrent_first_requests_start_one_lesson(redis_server: RedisServer,
                                                          key: str) -> None:
    """200 simultaneous first requests over two instances start exactly one lesson."""
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    try:
        steps = await asyncio.gather(*(
            (a if i % 2 else b).advance(key, L, DAY, DAY_END) for i in range(200)))
    finally:
        await a.close()
        await b.close()
    assert [s.outcome for s in steps] == ["allow"] * 200
    assert sum(s.started for s in steps) == 1
    assert len({s.start for s in steps}) == 1


async def test_break_boundary_race_starts_one_lesson(redis_server: RedisServer, key: str) -> None:
    """Requests racing across the end of a break over two instances start one lesson, not two."""
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    try:
        await full_lesson(a, key)
        end = T0 + MAX + BRK
        nows = [end - 0.05 + i * 0.0005 for i in range(200)]
        random.Random(7).shuffle(nows)
        steps = await asyncio.gather(*(
            step(a if i % 2 else b, key, now) for i, now in enumerate(nows)))
    finally:
        await a.close()
        await b.close()
    started = [s for s in steps if s.started]
    assert len(started) == 1 and started[0].now >= end
    assert {s.start for s in steps if s.outcome == "allow"} == {started[0].now}


async def test_calls_of_one_loop_pass_are_one_write(redis_server: RedisServer, key: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent calls are pipelined: 100 advances go out in a single socket write."""
    store = RedisStore(redis_server.url)
    try:
        assert await store.ping()
        writes: list[int] = []
        node = store.client.node_for(key)
        conn = node.conn if node is not None else None
        assert conn is not None and conn.transport is not None
        real_write = conn.transport.write

        def counting_write(data: bytes | bytearray | memoryview) -> None:
            writes.append(len(data))
            real_write(data)

        monkeypatch.setattr(conn.transport, "write", counting_write)
        steps = await asyncio.gather(*(step(store, f"{key}-{i}", T0) for i in range(100)))
        assert all(s.started for s in steps)
        assert len(writes) == 1
    finally:
        await store.close()


async def test_on_call_reports_every_call(private_redis: RedisServer, key: str) -> None:
    """The metrics hook gets (op, seconds, ok) for each call, failures included."""
    seen: list[tuple[str, float, bool]] = []
    store = RedisStore(private_redis.url, on_call=lambda op, s, ok: seen.append((op, s, ok)))
    try:
        await step(store, key, T0, hold="c")
        await store.renew([(key, "c")], now=T0 + 1)
        await store.release(key, "c", now=T0 + 2)
        await store.peek(key, now=T0 + 3)
        await store.publish_cut(Cut(key, "policy", "t"))
        await store.now()
        private_redis.stop()
        with pytest.raises(StoreUnavailable):
            await step(store, key, T0 + 4)
    finally:
        await store.close()
    assert [(op, ok) for op, _, ok in seen] == [
        ("advance", True), ("renew", True), ("release", True), ("peek", True),
        ("publish", True), ("now", True), ("advance", False)]
    assert all(0 <= s < 1 for _, s, _ in seen)


async def test_outage_fails_fast_and_recovers(private_redis: RedisServer, key: str) -> None:
    """Redis down: every call raises StoreUnavailable in milliseconds; back up: calls work again."""
    store = RedisStore(private_redis.url, op_timeout=0.25)
    try:
        assert (await step(store, key, T0)).started
        private_redis.stop()
        for call in [lambda: step(store, key, T0 + 1), lambda: store.peek(key, now=T0),
                     lambda: store.release(key, "c", now=T0), lambda: store.now(),
                     lambda: store.renew([(key, "c")], now=T0), lambda: step(store, key, T0 + 2)]:
            t = time.perf_counter()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.perf_counter() - t < 0.5
        assert await store.ping() is False
        private_redis.start()
        assert (await step(store, key, T0 + 3)).started  # the restart lost the clock
        assert await store.ping()
    finally:
        await store.close()


async def test_hung_redis_times_out_and_recovers(private_redis: RedisServer, key: str) -> None:
    """A Redis that accepts but never answers costs op_timeout, not seconds; then it recovers."""
    store = RedisStore(private_redis.url, op_timeout=0.2)
    assert private_redis.proc is not None
    try:
        await step(store, key, T0)
        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            t = time.perf_counter()
            results = await asyncio.gather(*(step(store, key, T0 + 1) for _ in range(50)),
                                           return_exceptions=True)
            assert all(isinstance(r, StoreUnavailable) for r in results)
            assert time.perf_counter() - t < 0.5
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)
        s = await step(store, key, T0 + 2)
        assert (s.outcome, s.start) == ("allow", T0)
    finally:
        await store.close()


async def test_cancelled_caller_does_not_disturb_others(redis_server: RedisServer,
                                                        key: str) -> None:
    """A caller cancelled mid-flight leaves the connection and the other callers fine."""
    store = RedisStore(redis_server.url)
    try:
        tasks = [asyncio.ensure_future(step(store, f"{key}-{i}", T0)) for i in range(10)]
        await asyncio.sleep(0)
        tasks[3].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[3], asyncio.CancelledError)
        assert sum(isinstance(r, Step) for r in results) == 9
        assert (await step(store, key, T0 + 1)).outcome == "allow"
    finally:
        await store.close()


async def test_cut_reaches_another_instance(redis_server: RedisServer, key: str) -> None:
    """A cut published by one instance reaches another instance's handler within 1 s."""
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    got: asyncio.Queue[Cut] = asyncio.Queue()
    try:
        await b.subscribe_cuts(got.put_nowait)
        t = time.perf_counter()
        await a.publish_cut(Cut(key, "lesson_limit", "instance-a"))
        assert await wait_for_key(got, key) == Cut(key, "lesson_limit", "instance-a")
        assert time.perf_counter() - t < 1.0
    finally:
        await a.close()
        await b.close()


async def test_subscriber_reconnects_after_an_outage(private_redis: RedisServer,
                                                     key: str) -> None:
    """After Redis restarts, cuts flow again without re-subscribing."""
    a, b = RedisStore(private_redis.url), RedisStore(private_redis.url)
    got: asyncio.Queue[Cut] = asyncio.Queue()
    try:
        await b.subscribe_cuts(got.put_nowait)
        private_redis.stop()
        await asyncio.sleep(0.3)
        private_redis.start()
        async with asyncio.timeout(5):
            while True:
                try:
                    await a.publish_cut(Cut(key, "curfew", "a"))
                    assert await wait_for_key(got, key, within=0.2) == Cut(key, "curfew", "a")
                    break
                except (StoreUnavailable, TimeoutError):
                    await asyncio.sleep(0.05)
    finally:
        await a.close()
        await b.close()


async def test_closed_store_raises(redis_server: RedisServer, key: str) -> None:
    """After close() calls raise StoreUnavailable instead of hanging."""
    store = RedisStore(redis_server.url)
    await step(store, key, T0)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await step(store, key, T0 + 1)
    assert await store.ping() is False


def test_bad_url_is_refused() -> None:
    """A URL that is not redis://, rediss:// or unix:// is a configuration error."""
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisStore("http://127.0.0.1:6379")


async def test_non_ascii_arguments_are_sent_intact(redis_server: RedisServer, key: str) -> None:
    """RESP lengths are UTF-8 byte counts: a non-ASCII connection id round-trips."""
    store = RedisStore(redis_server.url)
    try:
        await step(store, key, T0, hold="连接-é")
        assert (await store.peek(key, now=T0 + 1))[0].conns == 1
        await store.release(key, "连接-é", now=T0 + 2)
        assert (await store.peek(key, now=T0 + 3))[0] == ClockState(T0, T0 + 2, 0, DAY, 0.0)
    finally:
        await store.close()


def test_works_on_uvloop(redis_server: RedisServer, key: str) -> None:
    """The gateway runs on uvloop: clock calls and cuts work there too."""
    import uvloop

    async def scenario() -> None:
        a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
        got: asyncio.Queue[Cut] = asyncio.Queue()
        try:
            await b.subscribe_cuts(got.put_nowait)
            steps = await asyncio.gather(*(step(a if i % 2 else b, key, T0, hold=f"c{i}")
                                           for i in range(20)))
            assert sum(s.started for s in steps) == 1
            assert (await a.peek(key, now=T0 + 1))[0].conns == 20
            await a.publish_cut(Cut(key, "curfew", "a"))
            assert await wait_for_key(got, key) == Cut(key, "curfew", "a")
        finally:
            await a.close()
            await b.close()

    async def bounded() -> None:
        async with asyncio.timeout(10):
            await scenario()

    uvloop.run(bounded())


# --------------------------------------------------------------- the fast path

async def test_known_lesson_continues_without_a_round_trip(private_redis: RedisServer,
                                                           key: str) -> None:
    """A lesson Redis just allowed goes on while Redis is frozen (SIGSTOP): the
    continuing request waits for nothing. The activity is written behind:
    once Redis runs again it holds the last activity, and a script of this
    instance that reads the clock sees it."""
    store, other = RedisStore(private_redis.url), RedisStore(private_redis.url)
    proc = private_redis.proc
    assert proc is not None
    try:
        first = await store.advance(key, L, DAY, DAY_END)
        assert first.started
        await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)
        try:
            t = time.perf_counter()
            second = await asyncio.wait_for(store.advance(key, L, DAY, DAY_END), 0.1)
            assert time.perf_counter() - t < 0.05
        finally:
            proc.send_signal(signal.SIGCONT)
        assert second.outcome == "allow" and not second.started
        assert second.start == first.start
        assert second.remaining == pytest.approx(MAX - (second.now - first.start), abs=0.01)
        state, _ = await store.peek(key)                   # this instance: written first
        assert state.start == first.start
        assert state.last == pytest.approx(second.now, abs=1e-3)
        third = await store.advance(key, L, DAY, DAY_END)
        await asyncio.sleep(TOUCH_EVERY + 0.1)             # another instance: within TOUCH_EVERY
        seen, _ = await other.peek(key)
        assert seen.last == pytest.approx(third.now, abs=1e-3)
    finally:
        await store.close()
        await other.close()


async def test_known_lesson_needs_no_resync_until_its_end(redis_server: RedisServer,
                                                          key: str) -> None:
    """Nothing another instance does can end a lesson this instance sees
    going on, so the knowledge holds for the lesson's whole length: 25 min
    later (the store clock's monotonic time moved on) the request is still
    answered locally, with the remaining time counted from the start."""
    shift = [0.0]
    calls: list[str] = []
    store = RedisStore(redis_server.url, on_call=lambda op, s, ok: calls.append(op),
                       clock=StoreClock(mono=lambda: time.monotonic() + shift[0]))
    try:
        first = await store.advance(key, L, DAY, DAY_END)
        for minutes in (5, 10, 15, 20, 25):   # activity every 5 min < the 10 min break
            shift[0] += 300.0
            step_ = await store.advance(key, L, DAY, DAY_END)
            assert step_.start == first.start and not step_.started
            assert step_.remaining == pytest.approx(MAX - minutes * 60, abs=0.5)
        assert calls == ["advance"]
        shift[0] += 300.0 - FAST_MARGIN / 2  # within FAST_MARGIN of the limit: ask Redis
        await store.advance(key, L, DAY, DAY_END)
        assert calls[-1] == "advance" and calls.count("advance") == 2
    finally:
        await store.close()


async def test_fast_path_never_starts_a_lesson_or_ends_a_break(redis_server: RedisServer,
                                                               key: str) -> None:
    """Near the lesson's limit, near its quiet-time end, with a held
    connection, a daily limit, after a cut, or on a new connection to Redis,
    the request takes the script."""
    short = ClockLimits(max_duration=1.5, min_break=30.0)
    calls: list[str] = []
    store = RedisStore(redis_server.url, on_call=lambda op, s, ok: calls.append(op))
    try:
        await store.advance(key, short, DAY, DAY_END)          # a 1.5 s lesson
        await asyncio.sleep(0.6)                                # < FAST_MARGIN to its end
        await store.advance(key, short, DAY, DAY_END)
        assert calls == ["advance", "advance"]
        calls.clear()
        quiet = ClockLimits(max_duration=MAX, min_break=1.5)
        await store.advance(key + "-q", quiet, DAY, DAY_END)
        await asyncio.sleep(0.6)                                # < FAST_MARGIN to quiet end
        await store.advance(key + "-q", quiet, DAY, DAY_END)
        assert calls == ["advance", "advance"]
        calls.clear()
        other = key + "-b"
        await store.advance(other, L, DAY, DAY_END)
        await store.advance(other, L, DAY, DAY_END, hold="c1")  # a lease: the script
        await store.advance(other, LD, DAY, DAY_END)            # other limits: the script
        assert calls == ["advance"] * 3
        calls.clear()
        await store.advance(other, L, DAY, DAY_END)             # learnt again: fast
        await store.advance(other, L, DAY, DAY_END)
        assert calls == ["advance"]
        calls.clear()
        heard = asyncio.Event()
        await store.subscribe_cuts(lambda cut: heard.set())
        await store.publish_cut(Cut(other, "policy", "test"))
        await asyncio.wait_for(heard.wait(), 2)
        calls.clear()
        await store.advance(other, L, DAY, DAY_END)             # a cut: the script
        assert "advance" in calls, "a cut must send the student back to Redis"
        calls.clear()
        await store.advance(other, L, DAY, DAY_END)             # learnt again: fast
        async with aioredis.Redis.from_url(redis_server.url) as admin:
            await admin.client_kill_filter(_type="normal", skipme=True)  # Redis drops us
        await store.advance(other, L, DAY, DAY_END)             # a new connection: the script
        assert calls.count("advance") == 1
    finally:
        await store.close()


async def test_fast_path_stops_before_the_daily_limit(redis_server: RedisServer,
                                                      key: str) -> None:
    """With daily_max the lesson is known until today's lesson time runs out
    (FAST_MARGIN before it), and answers with that remaining time; a
    shadowed daily limit takes the script every time (it counts the
    shadowed denials)."""
    daily = ClockLimits(max_duration=MAX, min_break=BRK, daily_max=1.6)
    calls: list[str] = []
    store = RedisStore(redis_server.url, on_call=lambda op, s, ok: calls.append(op))
    try:
        first = await store.advance(key, daily, DAY, DAY_END)
        fast = await store.advance(key, daily, DAY, DAY_END)
        assert calls == ["advance"]
        assert fast.remaining == pytest.approx(1.6 - (fast.now - first.start), abs=0.01)
        await asyncio.sleep(0.7)                                # < FAST_MARGIN to the day's end
        await store.advance(key, daily, DAY, DAY_END)
        assert [c for c in calls if c != "touch"] == ["advance", "advance"]
        calls.clear()
        shadow = ClockLimits(max_duration=MAX, min_break=BRK, daily_max=3000.0,
                             enforce_daily=False)
        for _ in range(3):
            await store.advance(key + "-s", shadow, DAY, DAY_END)
        assert calls == ["advance"] * 3
    finally:
        await store.close()


async def test_touch_leaves_a_newer_lesson_alone(redis_server: RedisServer, key: str) -> None:
    """A written-behind touch for a lesson that ended meanwhile (another
    instance started a new one) does not move the new lesson's activity."""
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    try:
        first = await a.advance(key, L, DAY, DAY_END)              # a knows this lesson
        later = first.now + MAX + BRK + 1
        new = await b.advance(key, L, DAY, DAY_END, now=later)     # b: a new lesson
        assert new.started
        state, _ = await b.peek(key, now=later)
        fast = await a.advance(key, L, DAY, DAY_END)               # a: the old lesson, fast
        assert fast.start == first.start
        await asyncio.sleep(TOUCH_EVERY + 0.1)                     # its touch is written
        after, _ = await b.peek(key, now=later)
        assert (after.start, after.last) == (state.start, state.last)
        again = await a.advance(key, L, DAY, DAY_END)              # a asks Redis again
        assert again.start == new.start
    finally:
        await a.close()
        await b.close()


async def test_a_lesson_redis_lost_is_forgotten(redis_server: RedisServer, key: str,
                                                client: aioredis.Redis) -> None:
    """A touch that finds another lesson or none (evicted, flushed, replaced)
    sends the student back to the script, which starts a lesson Redis holds."""
    store = RedisStore(redis_server.url)
    try:
        first = await store.advance(key, L, DAY, DAY_END)
        await client.delete(f"tutorgate:{{{key}}}:clock")
        await store.advance(key, L, DAY, DAY_END)            # fast: Redis not asked
        await asyncio.sleep(TOUCH_EVERY + 0.1)                # the touch answers 0
        again = await store.advance(key, L, DAY, DAY_END)
        assert again.started and again.start > first.start
    finally:
        await store.close()


async def test_known_lessons_are_bounded(redis_server: RedisServer, key: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """At KNOWN_MAX the lessons that are over are dropped; the ones going on stay."""
    import gateway.store.fastpath as fastpath

    monkeypatch.setattr(fastpath, "KNOWN_MAX", 3)
    brief = ClockLimits(max_duration=0.3, min_break=30.0)
    store = RedisStore(redis_server.url)
    try:
        await store.advance(key + "-long", L, DAY, DAY_END)
        for i in range(2):
            await store.advance(f"{key}-{i}", brief, DAY, DAY_END)
        assert len(store.fast) == 3
        await asyncio.sleep(0.4)                               # the brief ones are over
        await store.advance(key + "-new", L, DAY, DAY_END)
        assert len(store.fast) == 2
        assert key + "-long" in store.fast and key + "-new" in store.fast
    finally:
        await store.close()


async def test_touch_survives_a_flushed_script_cache(redis_server: RedisServer, key: str,
                                                     client: aioredis.Redis) -> None:
    """SCRIPT FLUSH (or a failover) between two touches: the touch that meets
    NOSCRIPT goes again as EVAL, and the activity still reaches Redis."""
    calls: list[tuple[str, bool]] = []
    store = RedisStore(redis_server.url, on_call=lambda op, s, ok: calls.append((op, ok)))
    try:
        await store.advance(key, L, DAY, DAY_END)
        await client.script_flush()
        fast = await store.advance(key, L, DAY, DAY_END)
        await asyncio.sleep(2 * TOUCH_EVERY + 0.1)   # the refused touch, then its retry
        state, _ = await RedisStore(redis_server.url).peek(key)
        assert state.last == pytest.approx(fast.now, abs=1e-3)
        assert ("touch", True) in calls
    finally:
        await store.close()


async def test_close_writes_the_last_activity(redis_server: RedisServer, key: str) -> None:
    """A store closed with touches still queued (a graceful shutdown) writes them first."""
    store = RedisStore(redis_server.url)
    await store.advance(key, L, DAY, DAY_END)
    fast = await store.advance(key, L, DAY, DAY_END)
    await store.close()
    reader = RedisStore(redis_server.url)
    try:
        state, _ = await reader.peek(key)
        assert state.last == pytest.approx(fast.now, abs=1e-3)
    finally:
        await reader.close()


async def test_claim_is_first_come_once(store: StateStore, key: str) -> None:
    """claim() answers True once per (student, token) within its ttl, on both stores."""
    assert await store.claim(key, "1767225600.0", 60.0) is True
    assert await store.claim(key, "1767225600.0", 60.0) is False
    assert await store.claim(key, "1767227400.5", 60.0) is True
    assert await store.claim(key + "-other", "1767225600.0", 60.0) is True
