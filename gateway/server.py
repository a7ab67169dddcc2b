"""Running the app: one process, or N worker processes sharing one port (SO_REUSEPORT).

Each worker is an aiohttp ``AppRunner`` + ``connections.LimitedSite`` (``TCPSite`` plus a
header-read timeout and a connection cap). On SIGTERM/SIGINT a worker stops accepting, lets
in-flight requests finish (bounded by ``SHUTDOWN_TIMEOUT``) and exits. With ``WORKERS>1`` the
parent only supervises: it forwards SIGTERM/SIGINT to the workers and exits when they have; if a
worker dies on its own, the parent logs it and stops the rest with a nonzero exit (the service
manager restarts the whole thing; there is no respawn logic here).
"""

import asyncio
import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any, Protocol

from aiohttp import web

from gateway import metrics
from gateway.app import create_app
from gateway.connections import LimitedSite
from gateway.limits import Limits, apply_fd_limit
from gateway.logs import ACCESS_LOGGER, AccessLogger, flush_logs, log_event, setup_logging
from gateway.settings import Settings, SettingsError, load_settings
from gateway.store import preflight

__all__ = ["GC_GEN0_THRESHOLD", "AppFactory", "main", "runner_kwargs", "serve", "tune_gc"]

log = logging.getLogger("gateway.server")


class AppFactory(Protocol):
    """Builds a worker's app (:func:`gateway.app.create_app`) with the limits planned once at
    startup (:func:`gateway.limits.apply_fd_limit`)."""

    def __call__(self, settings: Settings, *, limits: Limits) -> web.Application: ...


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# Beyond SHUTDOWN_TIMEOUT, time a worker gets for its cleanup before the parent kills it.
_EXIT_MARGIN = 10.0
# How often the parent re-checks its shutdown deadline while waiting for workers.
_SUPERVISE_TICK = 0.5
#: Young-generation threshold of the cyclic GC in a worker (CPython's default: 700 net
#: allocations of tracked objects). A proxy with a few dozen requests in flight keeps thousands
#: of young objects alive (tasks, futures, requests, header dicts), so with the default a
#: collection walks and promotes them every few requests, and the promotions set off frequent
#: full collections of the whole heap: measured at 64 connections, one collection per ~28
#: requests and ~8 % of the worker's CPU. Above the in-flight working set, collections become
#: rare (about one per thousand requests there); the cost is at most this many objects of cyclic
#: garbage kept a little longer.
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Raise the young-generation GC threshold to :data:`GC_GEN0_THRESHOLD` (never lower it)."""
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def runner_kwargs(settings: Settings) -> dict[str, Any]:
    """``AppRunner`` options shared by :func:`serve` and the tests' servers."""
    return {
        "access_log_class": AccessLogger,
        "access_log": ACCESS_LOGGER if settings.access_log else None,
        "shutdown_timeout": settings.shutdown_timeout,
        "keepalive_timeout": settings.keepalive_timeout,
    }


def serve(settings: Settings, app_factory: AppFactory) -> None:
    """Serve until SIGTERM/SIGINT. Raises ``SystemExit`` with a nonzero code on failure (a
    port that can't be bound, a worker that died), :class:`SettingsError` when the store
    cannot be opened."""
    setup_logging(settings)
    # Before workers fork: the store opened and migrated once (workers start on a current
    # schema, and a store that cannot be opened is one line, not a traceback per worker); the
    # open-file limit raised, so they inherit it.
    try:
        preflight(settings)
    finally:
        flush_logs()  # its lines were logged inside an event loop that is gone now
    limits = apply_fd_limit(settings)  # the one plan, for every worker (they inherit the limit)
    if settings.workers == 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            code = asyncio.run(_run(settings, app_factory, limits, reuse_port=False))
        finally:
            flush_logs()
    else:
        code = _supervise(settings, app_factory, limits)
    if code:
        raise SystemExit(code)


async def _run(
    settings: Settings, app_factory: AppFactory, limits: Limits, *, reuse_port: bool
) -> int:
    """One worker. Expects SIGTERM/SIGINT blocked; unblocks them once they are handled."""
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    app = app_factory(settings, limits=limits)
    if reuse_port:  # a worker: its in-process counts go to the shared metrics files
        app.cleanup_ctx.append(metrics.publisher_ctx)
    runner = web.AppRunner(app, handler_cancellation=True, **runner_kwargs(settings))
    await runner.setup()
    try:
        site = LimitedSite(
            runner, settings.host, settings.port, limits, reuse_port=reuse_port or None
        )
        try:
            await site.start()
        except OSError as exc:
            log_event(
                log,
                "bind_failed",
                level=logging.ERROR,
                host=settings.host,
                port=settings.port,
                detail=str(exc),
            )
            return 1
        # The bound port: PORT=0 asks the kernel for a free one.
        port = runner.addresses[0][1] if runner.addresses else settings.port
        if settings.port == 0:
            _log_chosen_port(port)
        log_event(log, "listening", host=settings.host, port=port, pid=os.getpid())
        await stop.wait()
        log_event(log, "stopping", pid=os.getpid(), grace_s=settings.shutdown_timeout)
    finally:
        await runner.cleanup()
    log_event(log, "stopped", pid=os.getpid())
    return 0


def _worker_main(settings: Settings, app_factory: AppFactory, limits: Limits) -> None:
    """Entry point of a worker process (forked from the supervisor)."""
    try:
        code = asyncio.run(_run(settings, app_factory, limits, reuse_port=True))
    finally:
        flush_logs()  # a forked worker ends in os._exit, which skips logging's flush
    if code:
        raise SystemExit(code)


class _Supervisor:
    def __init__(
        self, settings: Settings, app_factory: AppFactory, limits: Limits, metrics_dir: str
    ) -> None:
        self.settings = settings
        self.metrics_dir = metrics_dir
        # fork, not spawn: a forked worker keeps the parent's blocked signal mask (spawn's exec
        # resets it), starts without re-importing anything, and the app factory can be any
        # callable. The parent has no event loop or threads at this point.
        ctx = multiprocessing.get_context("fork")
        self.workers = [
            ctx.Process(
                target=_worker_main,
                args=(settings, app_factory, limits),
                name=f"gateway-worker-{i}",
            )
            for i in range(settings.workers)
        ]
        self.deadline: float | None = None  # set once stopping
        self.failed = False

    def stop(self, reason: str) -> None:
        if self.deadline is not None:
            return
        log_event(log, "stopping_workers", reason=reason)
        self.deadline = time.monotonic() + self.settings.shutdown_timeout + _EXIT_MARGIN
        self.signal_all(signal.SIGTERM)

    def signal_all(self, sig: signal.Signals) -> None:
        for proc in self.workers:
            if proc.pid is not None and proc.exitcode is None:
                # It may exit between the check and the kill: then there is nothing to signal.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop(signal.Signals(signum).name)

    def run(self) -> int:
        # Workers inherit the blocked mask, so a signal that arrives before a worker's handlers
        # exist waits for them instead of killing the worker mid-startup.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self.on_signal)
        for proc in self.workers:
            proc.start()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        log_event(log, "supervising", workers=len(self.workers), pid=os.getpid())
        alive = {proc.sentinel: proc for proc in self.workers}
        while alive:
            ready = set(multiprocessing.connection.wait(list(alive), _SUPERVISE_TICK))
            for sentinel in [s for s in alive if s in ready]:
                self._reap(alive.pop(sentinel))
            if self.deadline is not None and time.monotonic() > self.deadline and alive:
                log_event(
                    log,
                    "workers_killed",
                    level=logging.ERROR,
                    pids=",".join(str(p.pid) for p in alive.values()),
                )
                self.failed = True
                self.signal_all(signal.SIGKILL)
                self.deadline = float("inf")
        return 1 if self.failed else 0

    def _reap(self, proc: multiprocessing.process.BaseProcess) -> None:
        proc.join()
        if proc.pid is not None:
            metrics.mark_worker_dead(proc.pid, self.metrics_dir)
        if self.deadline is None:
            log_event(log, "worker_died", level=logging.ERROR, pid=proc.pid, exitcode=proc.exitcode)
            self.failed = True
            self.stop("worker_died")
        elif proc.exitcode != 0:
            log_event(
                log, "worker_failed", level=logging.ERROR, pid=proc.pid, exitcode=proc.exitcode
            )
            self.failed = True


def _supervise(settings: Settings, app_factory: AppFactory, limits: Limits) -> int:
    # One metrics directory per run, set before the fork so that every worker's prometheus
    # counters land in it and one scrape reads them all (see gateway.metrics).
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    try:
        metrics.use_multiprocess_dir(metrics_dir)
        with _reserve_port(settings) as port:
            if settings.port == 0:
                _log_chosen_port(port)
            settings = dataclasses.replace(settings, port=port)
            return _Supervisor(settings, app_factory, limits, metrics_dir).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _log_chosen_port(port: int) -> None:
    # PORT=0: this line is the only way to learn the port, so it is a warning, shown at the
    # default and at LOG_LEVEL=warning (tests and scripts read it).
    log_event(log, "port_chosen", level=logging.WARNING, port=port)


@contextlib.contextmanager
def _reserve_port(settings: Settings) -> Iterator[int]:
    """The port the workers share. PORT=0: a free one, held (bound with SO_REUSEPORT, never
    listening, so it takes no connections) until the workers are gone, so that no other program
    can take it between the choice and the workers' binds."""
    if settings.port != 0:
        yield settings.port
        return
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((settings.host, 0))
        yield int(sock.getsockname()[1])


def main() -> None:
    """``python -m gateway.server``: serve the app configured by the environment."""
    try:
        settings = load_settings(os.environ)
        serve(settings, create_app)
    except SettingsError as exc:  # a bad value, or a store that cannot be opened: one line
        print(f"gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
