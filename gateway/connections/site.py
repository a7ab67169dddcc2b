"""The ``TCPSite`` that serves through the connection limiter."""

import asyncio

from aiohttp import web

from gateway.connections.limiter import ConnectionLimiter
from gateway.limits import Limits


class LimitedSite(web.TCPSite):
    """``web.TCPSite`` with :class:`ConnectionLimiter` as the protocol factory."""

    __slots__ = ("_limits", "limiter")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limits: Limits,
        *,
        reuse_port: bool | None = None,
    ) -> None:
        super().__init__(runner, host, port, reuse_port=reuse_port)
        self._limits = limits
        self.limiter: ConnectionLimiter | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        # BaseSite's (registers the site), not TCPSite's: that one would serve with the plain
        # protocol factory.
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("Call runner.setup() before starting a site")
        self.limiter = ConnectionLimiter(server, self._limits)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.limiter,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )
        # As TCPSite.start does: ``port`` (and ``name``) report the bound port for PORT=0.
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
