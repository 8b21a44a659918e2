"""Finding the master: what Sentinel names, and a cluster's slot map.

Both are asked again whenever a node fails or answers that it is not the
one to ask (MOVED, READONLY, CLUSTERDOWN...), so a failover is followed
without a restart: the interruption is the failover itself plus one
refresh (REFRESH_EVERY at worst).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import StoreUnavailable
from .conn import Conn, open_conn
from .resp import SLOTS, pack
from .url import Addr, RedisTarget

# At most one slot-map refresh or Sentinel question this often while nodes fail.
REFRESH_EVERY = 0.1


async def sentinel_master(target: RedisTarget, within: float) -> Addr:
    """The master's address as the first Sentinel that knows it says."""
    assert target.service is not None
    why = "no sentinel configured"
    for addr in target.nodes:
        try:
            conn = await open_conn(target, addr, within,
                                   password=target.sentinel_password or False)
        except StoreUnavailable as exc:
            why = str(exc)
            continue
        try:
            (reply,) = await _ask(conn, within, pack(
                "SENTINEL", "get-master-addr-by-name", target.service))
        except (StoreUnavailable, TimeoutError) as exc:
            why = str(exc) or "no answer"
            continue
        finally:
            conn.fail("done")
        if isinstance(reply, list) and len(reply) == 2:
            return reply[0].decode(), int(reply[1])
        why = f"sentinel {addr[0]}:{addr[1]} does not know {target.service!r}: {reply!r}"
    raise StoreUnavailable(f"no master for {target.service!r}: {why}")


async def open_master(target: RedisTarget, within: float, setup: list[bytes]) -> Conn:
    """A connection to the master Sentinel names, checked to be a master
    (ROLE): right after a failover a Sentinel may still name the old one."""
    addr = await sentinel_master(target, within)
    return await open_conn(target, addr, within, [pack("ROLE"), *setup], check=_is_master)


def _is_master(replies: list[Any]) -> str | None:
    role = replies[0]
    if isinstance(role, list) and role and role[0] == b"master":
        return None
    return f"not a master (ROLE says {role[0] if isinstance(role, list) else role!r})"


async def cluster_slots(target: RedisTarget, seeds: list[Addr],
                        within: float) -> list[Addr | None]:
    """The master of every slot, as the first answering node says (CLUSTER SLOTS)."""
    why = "no node to ask"
    for addr in seeds:
        try:
            conn = await open_conn(target, addr, within)
        except StoreUnavailable as exc:
            why = str(exc)
            continue
        try:
            (reply,) = await _ask(conn, within, pack("CLUSTER", "SLOTS"))
        except (StoreUnavailable, TimeoutError) as exc:
            why = str(exc) or "no answer"
            continue
        finally:
            conn.fail("done")
        if not isinstance(reply, list) or not reply:
            why = f"{addr[0]}:{addr[1]} answered CLUSTER SLOTS with {reply!r}"
            continue
        table: list[Addr | None] = [None] * SLOTS
        for start, end, master, *_ in reply:
            host = master[0].decode() or addr[0]  # empty: the node we asked
            table[start:end + 1] = [(host, int(master[1]))] * (end - start + 1)
        return table
    raise StoreUnavailable(f"cluster slot map unavailable: {why}")


async def _ask(conn: Conn, within: float, *commands: bytes) -> list[Any]:
    async with asyncio.timeout(within):
        return await conn.ask(*commands)
