"""Cost of the lesson-clock call: plain redis-py against the RedisStore's batching.

Starts its own redis-server on a free 127.0.0.1 port, then runs N `advance`
calls (the same advance.lua, the same arguments, many students) from C
concurrent tasks, once per client:

    naive     redis-py Script.__call__ per call (EVALSHA, hiredis parser)
    pipeline  redis-py, the calls of one loop pass in one pipeline(transaction=False)
    store     gateway.store.redis.RedisStore.advance (own RESP on one connection)

and prints calls/s and CPU microseconds per call of this process (the
gateway's side) and of redis-server.

    .venv/bin/python bench/store_bench.py [--calls 20000] [--concurrency 50] [--uvloop]

Figures, not a test: compare lines of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import harness
import redis.asyncio as aioredis
from harness import Children

from gateway.clock import ClockLimits
from gateway.store.base import LEASE_SECONDS
from gateway.store.redis import ADVANCE, RedisStore

LIMITS = ClockLimits(max_duration=1800.0, min_break=600.0, daily_max=7200.0)
DAY, DAY_END = 20_000, 40_000.0

Advance = Callable[[str], Awaitable[Any]]


@dataclass
class Result:
    name: str
    calls: int
    wall: float
    cpu: float
    redis_cpu: float

    def row(self) -> str:
        return (
            f"{self.name:<10} {self.calls / self.wall:>10,.0f} {self.cpu / self.calls * 1e6:>12.1f}"
            f" {self.redis_cpu / self.calls * 1e6:>12.1f}"
        )


def script_args(key: str) -> tuple[list[str], list[str]]:
    """advance.lua's KEYS and ARGV, as RedisStore.advance builds them."""
    k = f"tutorgate:{{{key}}}:"
    return [k + "clock", k + "conns"], [
        "",
        repr(LIMITS.max_duration),
        repr(LIMITS.min_break),
        repr(LIMITS.daily_max),
        "1",
        "1",
        str(DAY),
        repr(DAY_END),
        repr(LEASE_SECONDS),
        "",
    ]


async def naive(url: str) -> tuple[Advance, Callable[[], Awaitable[None]]]:
    client = aioredis.Redis.from_url(url)
    script = client.register_script(ADVANCE.body)

    async def call(key: str) -> Any:
        keys, args = script_args(key)
        return await script(keys=keys, args=args)

    return call, client.aclose


async def pipelined(url: str) -> tuple[Advance, Callable[[], Awaitable[None]]]:
    """The obvious batching with redis-py: one pipeline per loop pass."""
    client = aioredis.Redis.from_url(url)
    await client.script_load(ADVANCE.body)
    loop = asyncio.get_running_loop()
    queue: list[tuple[list[str], asyncio.Future[Any]]] = []
    flushing: set[asyncio.Task[None]] = set()

    async def flush(batch: list[tuple[list[str], asyncio.Future[Any]]]) -> None:
        pipe = client.pipeline(transaction=False)
        for args, _ in batch:
            pipe.execute_command("EVALSHA", *args)
        try:
            replies = await pipe.execute()
        except Exception as exc:
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (_, fut), reply in zip(batch, replies, strict=True):
            fut.set_result(reply)

    def start_flush() -> None:
        batch = queue[:]
        queue.clear()
        task = loop.create_task(flush(batch))
        flushing.add(task)
        task.add_done_callback(flushing.discard)

    async def call(key: str) -> Any:
        keys, args = script_args(key)
        fut = loop.create_future()
        if not queue:
            loop.call_soon(start_flush)
        queue.append(([ADVANCE.sha, "2", *keys, *args], fut))
        return await fut

    return call, client.aclose


async def store(url: str) -> tuple[Advance, Callable[[], Awaitable[None]]]:
    s = RedisStore(url)
    await s.start()

    async def call(key: str) -> Any:
        # The script every time, like the other clients: the store's fast
        # path would answer most repeat calls of a student without Redis.
        s.fast.drop(key)
        return await s.advance(key, LIMITS, DAY, DAY_END)

    return call, s.close


CLIENTS: dict[str, Callable[[str], Awaitable[tuple[Advance, Callable[[], Awaitable[None]]]]]] = {
    "naive": naive,
    "pipeline": pipelined,
    "store": store,
}


async def run_one(
    name: str, url: str, redis_pid: int, calls: int, concurrency: int, students: Sequence[str]
) -> Result:
    call, close = await CLIENTS[name](url)
    rnd = random.Random(1)

    async def worker(n: int) -> None:
        for _ in range(n):
            await call(rnd.choice(students))

    async def burst(total: int) -> None:
        per, extra = divmod(total, concurrency)
        await asyncio.gather(*(worker(per + (i < extra)) for i in range(concurrency)))

    try:
        await burst(min(2000, calls))  # warm up: connections, script cache, keys
        r0, c0, t0 = harness.cpu_seconds(redis_pid), time.process_time(), time.perf_counter()
        await burst(calls)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return Result(name, calls, wall, cpu, harness.cpu_seconds(redis_pid) - r0)
    finally:
        await close()


async def main_async(args: argparse.Namespace) -> list[Result]:
    students = [f"{i:032x}" for i in range(args.students)]
    results: list[Result] = []
    with Children() as children:
        child, url = harness.start_redis(children, "store-bench-redis")
        for _ in range(args.rounds):
            for name in args.clients:
                results.append(
                    await run_one(name, url, child.pid, args.calls, args.concurrency, students)
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--students", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=1, help="repeat every client this often")
    p.add_argument("--clients", nargs="+", choices=list(CLIENTS), default=list(CLIENTS))
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (as the gateway does)")
    args = p.parse_args(argv)
    harness.exit_on_sigterm()
    if args.uvloop:
        import uvloop

        results = uvloop.run(main_async(args))
    else:
        results = asyncio.run(main_async(args))
    loop = "uvloop" if args.uvloop else "asyncio"
    print(
        f"{args.calls} advance calls, concurrency {args.concurrency}, {args.students} students,"
        f" {loop}"
    )
    print(f"{'client':<10} {'calls/s':>10} {'CPU us/call':>12} {'redis us/call':>12}")
    for r in results:
        print(r.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
