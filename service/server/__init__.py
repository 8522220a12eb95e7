"""densemap's gRPC server: densemap.v1, KServe v2, health, reflection and metrics.

Light to import: ``create_server``, ``DensemapServer`` and ``ServerConfig`` load on first use,
so ``densemap.service.server.codec`` (shared with the client) does not pull in the server.
"""

from __future__ import annotations

__all__ = ["DensemapServer", "ServerConfig", "create_server"]


def __getattr__(name: str):
    if name in ("DensemapServer", "create_server"):
        from densemap.service.server import app

        return getattr(app, name)
    if name == "ServerConfig":
        from densemap.service.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'densemap.service.server' has no attribute {name!r}")
