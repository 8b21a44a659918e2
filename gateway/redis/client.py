"""The Redis client every Redis user of the process shares.

One server, a Sentinel-named master, or a Redis Cluster (`url.py` has the
URL forms), behind one interface: `call` a list of packed commands (one
loop pass's calls go out in one write per server, `node.py`), `eval` a
script by EVALSHA (EVAL again after NOSCRIPT: a restart, a failover or
SCRIPT FLUSH emptied the cache), and the pub/sub of `pubsub.py`.

Where a failover moved things, the client follows: a cluster's MOVED and
ASK are followed and the slot map refreshed; a replica's READONLY, a
CLUSTERDOWN or a dead connection makes it find the master again (Sentinel
or CLUSTER SLOTS). A call that met the failover fails (StoreUnavailable);
no call is retried behind its caller's back, so a call never waits for
more than its `op_timeout` (twice, when it had to wait for a connection).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import hiredis

from ..errors import StoreUnavailable
from .conn import Conn, open_conn
from .node import Node
from .resp import RELOCATE, Script, noscript, pack, redirect, slot
from .topology import REFRESH_EVERY, cluster_slots, open_master
from .url import Addr, RedisTarget

log = logging.getLogger("tutorgate.redis")

OnCall = Callable[[str, float, bool], None]
"""Metrics hook: (op, seconds, ok) once per reported call; it must be cheap."""
Calls = Sequence[tuple[int, str]]
"""A script's calls: (number of keys and args, keys and args packed by `resp.bulks`)."""


class RedisClient:
    """The connection layer (see the module docstring)."""

    def __init__(self, url: str | RedisTarget, *, op_timeout: float = 0.25,
                 on_call: OnCall | None = None) -> None:
        self.target = RedisTarget.parse(url) if isinstance(url, str) else url
        self.prefix = self.target.prefix
        self.cluster = self.target.mode == "cluster"
        self.timeout = op_timeout
        self.on_call = on_call
        self._scripts: list[Script] = []
        self._resets: list[Callable[[], None]] = []
        self._nodes: dict[Addr, Node] = {}
        self._slots: list[Node | None] = []
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -REFRESH_EVERY
        self.closed = False
        # one server or a Sentinel-named master: one node, no routing
        self._single: Node | None = None
        if not self.cluster:
            self._single = Node(str(self.target), self._open_single, op_timeout,
                                self._connected, self._failed)

    def preload(self, script: Script) -> None:
        """Load `script` on every new connection, before anything else is
        sent: commands nobody awaits (fire-and-forget EVALSHA) can rely on it."""
        self._scripts.append(script)

    def on_reset(self, hook: Callable[[], None]) -> None:
        """Call `hook` when a node (re)connects or the slot map changes: what
        a caller knew of Redis may no longer hold."""
        self._resets.append(hook)

    # ----------------------------------------------------------- routing

    def node_for(self, key: str) -> Node | None:
        """The node holding `key` as far as known now (None: not known yet)."""
        if self._single is not None:
            return self._single
        return self._slots[slot(key)] if self._slots else None

    async def _node(self, key: str | None) -> Node:
        node = self.node_for(key or self.prefix)
        if node is None:
            await self._refresh_now()
            node = self.node_for(key or self.prefix)
            if node is None:
                raise StoreUnavailable("no cluster node serves that slot")
        return node

    def _node_at(self, addr: Addr) -> Node:
        node = self._nodes.get(addr)
        if node is None:
            async def opener() -> Conn:
                return await open_conn(self.target, addr, self.timeout, self._setup())

            node = self._nodes[addr] = Node(f"{addr[0]}:{addr[1]}", opener, self.timeout,
                                            self._connected, self._failed)
        return node

    def _setup(self) -> list[bytes]:
        setup = [pack("SCRIPT", "LOAD", s.body) for s in self._scripts]
        if self.target.db:
            setup.insert(0, pack("SELECT", str(self.target.db)))
        return setup

    async def _open_single(self, setup: list[bytes] | None = None) -> Conn:
        """A connection to the one server or the Sentinel-named master, set
        up with `setup` (None: the scripts and SELECT every call needs)."""
        t = self.target
        if setup is None:
            setup = self._setup()
        if t.mode == "sentinel":
            return await open_master(t, self.timeout, setup)
        return await open_conn(t, None if t.path else t.nodes[0], self.timeout, setup)

    def _seeds(self) -> list[Addr]:
        """Cluster nodes to ask, the connected ones first, then every node
        known, then the URL's."""
        live = [a for a, n in self._nodes.items() if n.up]
        return list(dict.fromkeys([*live, *self._nodes, *self.target.nodes]))

    def _connected(self, node: Node) -> None:
        for hook in self._resets:
            hook()

    def _failed(self, node: Node) -> None:
        if self.cluster:
            self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        if self._refreshing is None and not self.closed:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh_now(self) -> None:
        self._schedule_refresh()
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        try:
            wait = self._refreshed_at + REFRESH_EVERY - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            table = await cluster_slots(self.target, self._seeds(), self.timeout)
            self._apply(table)
        except StoreUnavailable as exc:
            log.warning("redis cluster: %s", exc)
        except Exception:
            log.exception("redis cluster: refreshing the slot map failed")
        finally:
            self._refreshed_at = time.monotonic()
            self._refreshing = None

    def _apply(self, table: list[Addr | None]) -> None:
        slots = [None if a is None else self._node_at(a) for a in table]
        if slots == self._slots:
            return
        changed = bool(self._slots)
        self._slots = slots
        masters = {n for n in slots if n is not None}
        for addr, node in list(self._nodes.items()):
            if node not in masters:  # no longer a master: its calls get MOVED anyway
                del self._nodes[addr]
                asyncio.get_running_loop().create_task(node.close("no longer a master"))
        if changed:
            log.info("redis cluster: slot map changed; %d masters", len(masters))
            for hook in self._resets:
                hook()

    # ----------------------------------------------------------- calls

    async def command(self, op: str | None, *args: str, key: str | None = None) -> Any:
        """One plain command, routed by `key` (a keyless one: any node)."""
        return (await self.call(op, [pack(*args)], key))[0]

    async def eval(self, op: str | None, script: Script, key: str, calls: Calls) -> list[Any]:
        """Run `script` once per call in `calls`, all on `key`'s slot."""
        return await self.call(op, [script.command(n, a) for n, a in calls], key, script, calls)

    async def call(self, op: str | None, commands: list[bytes], key: str | None = None,
                   script: Script | None = None, calls: Calls = ()) -> list[Any]:
        """Send `commands` (all for `key`'s slot) in this loop pass's write;
        their replies. Error replies, after NOSCRIPT and redirections are
        dealt with, raise StoreUnavailable. `op` names the call to `on_call`."""
        t0 = time.perf_counter()
        try:
            node = self._single or await self._node(key)
            loop = asyncio.get_running_loop()
            futs = [loop.create_future() for _ in commands]
            node.queue(commands, futs)
            replies = [await futs[0]] if len(futs) == 1 else list(await asyncio.gather(*futs))
            for r in replies:
                if isinstance(r, hiredis.ReplyError):
                    replies = await self._recover(node, op, commands, replies, script, calls)
                    break
        except StoreUnavailable:
            self.report(op, t0, False)
            raise
        self.report(op, t0, True)
        return replies

    async def _recover(self, node: Node, op: str | None, commands: list[bytes],
                       replies: list[Any], script: Script | None, calls: Calls) -> list[Any]:
        """Send again what met NOSCRIPT (as EVAL), MOVED or ASK (where told),
        up to 3 rounds; any other error reply is StoreUnavailable."""
        for _ in range(3):
            again = [i for i, r in enumerate(replies) if isinstance(r, hiredis.ReplyError)]
            if not again:
                return replies
            for i in again:
                replies[i] = self._redo(node, op, commands[i], replies[i], script,
                                        calls[i] if calls else None)
            done = await asyncio.gather(*(r for r in replies if isinstance(r, asyncio.Future)))
            it = iter(done)
            replies = [next(it) if isinstance(r, asyncio.Future) else r for r in replies]
        raise StoreUnavailable(f"redis refused {op}: redirected too often")

    def _redo(self, node: Node, op: str | None, command: bytes, reply: Any,
              script: Script | None, call: tuple[int, str] | None) -> asyncio.Future[Any]:
        if noscript(reply) and script is not None and call is not None:
            return _send1(node, script.command(*call, load=True))
        moved = redirect(reply)
        if moved is not None:
            kind, _, addr = moved
            target = self._node_at(addr)
            if kind == "MOVED":
                self._schedule_refresh()
                return _send1(target, command)
            return _send1(target, command, asking=True)
        text = str(reply)
        if text.startswith(RELOCATE):
            # a replica now, or the cluster is moving: find the master again
            if node.conn is not None:
                node.conn.fail(f"redis answered {text.split(' ', 1)[0]}")
            self._failed(node)
        raise StoreUnavailable(f"redis refused {op or 'a call'}: {text}")

    def report(self, op: str | None, t0: float, ok: bool) -> None:
        if op is not None and self.on_call is not None:
            try:
                self.on_call(op, time.perf_counter() - t0, ok)
            except Exception:  # metrics must never fail a call
                log.exception("on_call hook failed")

    # ----------------------------------------------------------- pub/sub, life

    async def open_pubsub(self) -> Conn:
        """A connection of its own for SUBSCRIBE. On a cluster any node will
        do: PUBLISH reaches every node of a cluster."""
        if not self.cluster:
            return await self._open_single([])
        why = "no node"
        for addr in self._seeds():
            try:
                return await open_conn(self.target, addr, self.timeout)
            except StoreUnavailable as exc:
                why = str(exc)
        raise StoreUnavailable(why)

    async def close(self) -> None:
        self.closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
        nodes = [self._single] if self._single is not None else list(self._nodes.values())
        for node in nodes:
            if node is not None:
                await node.close()


def _send1(node: Node, command: bytes, *, asking: bool = False) -> asyncio.Future[Any]:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    if asking:  # ASKING and the command in one write, nothing between them
        node.queue([pack("ASKING"), command], [loop.create_future(), fut])
    else:
        node.queue([command], [fut])
    return fut
