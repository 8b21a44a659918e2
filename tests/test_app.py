"""The app's wiring: one cleanup context per resource, typed app state."""

from __future__ import annotations

import pytest
from kit import make_policy

from gateway.app import GATEWAY, Gateway
from gateway.settings import Settings
from gateway.store.memory import MemoryStore


class TrackedStore(MemoryStore):
    """A memory store that says whether it was closed."""

    closed = False

    async def close(self) -> None:
        self.closed = True
        await super().close()


async def test_a_resource_failing_to_start_releases_those_before_it() -> None:
    """When the scheduler cannot start, the app does not serve, and the store
    and upstream session started before it are closed."""
    store = TrackedStore()
    gw = Gateway(Settings(policy_path="", upstream="http://127.0.0.1:9"), make_policy(),
                 store=store)

    def broken() -> None:
        raise RuntimeError("the scheduler cannot start")

    gw.scheduler.start = broken  # type: ignore[method-assign]
    app = gw.main_app()
    assert app[GATEWAY] is gw
    main, _ = gw.runners(None)
    with pytest.raises(RuntimeError, match="scheduler cannot start"):
        await main.setup()
    assert not gw.ready
    assert store.closed
    assert gw.forwarder.session is not None and gw.forwarder.session.closed
