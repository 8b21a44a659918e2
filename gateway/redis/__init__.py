"""The Redis connection layer every Redis user of the process shares.

`url` (URL forms, TLS, prefix) -> `conn` (one connection) -> `node` (one
server: batching, reconnect) -> `topology` (Sentinel, cluster slot map) ->
`client` (routing, scripts, redirections) and `pubsub` (subscriptions).
The lesson store, the audit trail, fleet policy and the audit CLI all
talk to Redis through `RedisClient`.
"""

from .client import RedisClient
from .url import RedisTarget

__all__ = ["RedisClient", "RedisTarget"]
