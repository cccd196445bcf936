"""Connections: opening and closing them off the loop, and watching them for a loss."""

from __future__ import annotations

from ._connect import aclose_connection, connect, connection_socket
from ._watch import (
    LOST_POLL_INTERVAL,
    ConnectionWatch,
    map_connection_errors,
    release_collected,
    watch_connection,
)

__all__ = [
    "connect",
    "aclose_connection",
    "connection_socket",
    "ConnectionWatch",
    "watch_connection",
    "map_connection_errors",
    "release_collected",
    "LOST_POLL_INTERVAL",
]
