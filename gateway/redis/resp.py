"""RESP commands packed by hand, Lua scripts, cluster hash slots.

Building one str per command and encoding it once costs half of
`hiredis.pack_command` on the same arguments; the hot path packs what does
not change (a script's head, a policy's limits) once.
"""

from __future__ import annotations

import hashlib
from binascii import crc_hqx
from collections.abc import Iterable
from importlib import resources
from typing import Any

import hiredis

SLOTS = 16384


def bulk(arg: str) -> str:
    # RESP counts bytes: len() of the str is that for ASCII, the usual case
    return f"${len(arg) if arg.isascii() else len(arg.encode())}\r\n{arg}\r\n"


def bulks(args: Iterable[str]) -> str:
    """Arguments as RESP bulk strings, one str."""
    return "".join([f"${len(a)}\r\n{a}\r\n" if a.isascii() else bulk(a) for a in args])


def pack(*args: str) -> bytes:
    """One plain command."""
    return f"*{len(args)}\r\n{bulks(args)}".encode()


def slot(key: str) -> int:
    """The cluster hash slot of `key` (its `{tag}` if it has one)."""
    start = key.find("{")
    if start > -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc_hqx(key.encode(), 0) % SLOTS


class Script:
    """One atomic operation: a Lua file run by EVALSHA (EVAL after NOSCRIPT).
    `package`'s lua/<name>.lua, after `prelude` (shared code) if given."""

    def __init__(self, package: str, name: str, prelude: str | None = None,
                 keys: int = 2) -> None:
        lua = resources.files(package).joinpath("lua")
        head = lua.joinpath(f"{prelude}.lua").read_text("utf-8") if prelude else ""
        self.name = name
        self.body = head + lua.joinpath(f"{name}.lua").read_text("utf-8")
        self.sha = hashlib.sha1(self.body.encode()).hexdigest()
        nkeys = str(keys)
        self._heads = (f"$7\r\nEVALSHA\r\n$40\r\n{self.sha}\r\n{bulk(nkeys)}",
                       f"$4\r\nEVAL\r\n{bulk(self.body)}{bulk(nkeys)}")

    def command(self, argc: int, packed: str, *, load: bool = False) -> bytes:
        """The command for `argc` keys and args already packed by `bulks`
        (EVAL with `load`: it runs and caches the script again)."""
        return f"*{argc + 3}\r\n{self._heads[load]}{packed}".encode()


def error(reply: Any) -> str | None:
    """The text of an error reply, None for any other reply."""
    return str(reply) if isinstance(reply, hiredis.ReplyError) else None


def noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


def redirect(reply: Any) -> tuple[str, int, tuple[str, int]] | None:
    """("MOVED"|"ASK", slot, (host, port)) of a cluster redirection, else None."""
    if not isinstance(reply, hiredis.ReplyError):
        return None
    text = str(reply)
    if not (text.startswith("MOVED ") or text.startswith("ASK ")):
        return None
    kind, num, addr = text.split(" ", 2)
    host, _, port = addr.rpartition(":")
    return kind, int(num), (host, int(port))


# Replies meaning "this node cannot serve that now; find where Redis is":
# a replica after a failover (READONLY), a cluster losing a master, a
# master without its replica (MASTERDOWN), a node loading its data.
RELOCATE = ("READONLY", "CLUSTERDOWN", "MASTERDOWN", "LOADING", "TRYAGAIN")
