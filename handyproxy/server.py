"""A worker process: the accept loop, timers, signals, draining, and applying a reloaded config.

The listeners are made here too, but by the master (handyproxy.supervisor), which holds them for
the instance's whole life and hands each worker its share; a worker never binds.

Accepting is done by hand (a reader callback on the listening socket) rather than by
``loop.create_server`` so that running out of descriptors can be handled the way operators want:
stop accepting for a moment, leave the clients waiting in the backlog, log it once, and never spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import os
import resource
import signal
import socket
import time
from collections.abc import Callable

from handyproxy import config, log, metrics, relay, systemd
from handyproxy.address import authority
from handyproxy.config import Config
from handyproxy.log import logger
from handyproxy.rules import RuleSet
from handyproxy.sockets import reset_socket, tune_socket
from handyproxy.supervisor.channel import Channel
from handyproxy.supervisor.table import Row, SharedTable, bucket_of
from handyproxy.tunnel import Hub, Tunnel
from handyproxy.upstream import UpstreamSet

EXIT_STARTUP_FAILURE = 3
BACKLOG = 4096
ACCEPT_BATCH = 64
TICK = 1.0
BACKOFF_FIRST = 0.01
BACKOFF_MAX = 1.0
BACKOFF_LOG_EVERY = 10.0
FD_HEADROOM = 8  # a tunnel needs up to 6: two sockets and, while busy, two pipes
_ACCEPT_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: The master's signals: a worker that gets one anyway (kill to the whole cgroup) ignores it
#: rather than die with its tunnels by the default action.
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class StartupError(Exception):
    """The forwarder cannot start (cannot bind, for instance); exit status 3."""


def make_listeners(cfg: Config, count: int = 1) -> list[socket.socket]:
    """Sockets from systemd, or ``count`` bound sockets sharing the port with SO_REUSEPORT."""
    inherited = systemd.listen_fds()
    if inherited:
        for sock in inherited:
            sock.setblocking(False)
            tune_socket(sock)
            reset_socket(sock)  # accepted sockets inherit the armed reset
        return inherited
    socks: list[socket.socket] = []
    port = cfg.local_port
    try:
        for _ in range(count):
            sock = _bind(cfg.listen_address, port, reuse_port=count > 1)
            port = sock.getsockname()[1]  # port 0: the others join the kernel's choice
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind(address: str, port: int, reuse_port: bool) -> socket.socket:
    if address:
        candidates = [(socket.AF_INET6 if ":" in address else socket.AF_INET, address)]
    else:
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    last: OSError | None = None
    for family, host in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # no IPv6 in this kernel or namespace
            last = exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and not address:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            tune_socket(sock)
            reset_socket(sock)  # accepted sockets inherit the armed reset (handyproxy.sockets)
            sock.listen(BACKLOG)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                break
    raise StartupError(f"cannot listen on {authority(address or '::', port)}: {last}")


class Server:
    """Owns the listeners and the lifecycle; each connection's story lives in tunnel.py."""

    def __init__(
        self,
        cfg: Config,
        listeners: list[socket.socket],
        row: Row | None = None,
        channel: Channel | None = None,
    ) -> None:
        self.cfg = cfg
        self.listeners = listeners
        self.channel = channel
        self.hub = Hub(
            config=cfg,
            listen_ports={s.getsockname()[1] for s in listeners},
            relay_cls=relay.load(cfg.relay),
            upstreams=UpstreamSet.from_config(cfg),
            rules=RuleSet.from_config(cfg),
            row=row if row is not None else _private_row(),
        )
        self.stop_requested: asyncio.Event | None = None
        self.accept_paused = False
        self.backoff = BACKOFF_FIRST
        self.exhausted_count = 0
        self.exhausted_logged = 0.0
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_limit = soft if soft != resource.RLIM_INFINITY else 1 << 30
        self.fd_base = len(os.listdir("/proc/self/fd"))

    # Lifecycle

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.hub.loop = loop
        self.stop_requested = asyncio.Event()
        for sig in IGNORED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        for sig in _HANDLED_SIGNALS:
            loop.add_signal_handler(sig, self.request_stop, sig)
        log.attach(loop)
        channel = self.channel
        try:
            await self.hub.upstreams.start(loop)
            metrics.attach(self.hub)
            # What exists now (modules, config, upstreams) lives as long as the worker: kept
            # out of the cyclic collector's passes, which then cover only what tunnels allocate.
            gc.freeze()
            self.start_accepting()
            if channel is not None:
                loop.add_reader(channel.fileno(), self.on_message)
                channel.send("ready")
            ticker = loop.create_task(self.tick_forever())
            await self.stop_requested.wait()
            ticker.cancel()
            self.hub.upstreams.close()
            await self.shutdown()
            metrics.record.tick(self.hub)  # the last figures, before the process ends
        finally:
            log.detach()
            for sig in _HANDLED_SIGNALS:
                loop.remove_signal_handler(sig)
            if channel is not None and not channel.closed:
                loop.remove_reader(channel.fileno())

    def on_message(self) -> None:
        """The master speaks: a new config to apply, or its end of the pair closed."""
        assert self.channel is not None
        for message in self.channel.received():
            if message[0] == "config":
                self.hub.loop.create_task(self.apply(message[1]))
        if self.channel.closed:
            self.hub.loop.remove_reader(self.channel.fileno())
            if self.stop_requested is not None and not self.stop_requested.is_set():
                # Without a master nobody would restart or stop us: finish and go.
                logger.warning("master gone; draining")
                self.request_stop()

    async def apply(self, cfg: Config) -> None:
        """Take a reloaded config for the tunnels accepted from now on; open ones keep theirs.

        Upstreams that stayed the same keep their state (health, counters); the new set is
        started before it replaces the old one, so a tunnel always finds a working set.
        """
        hub = self.hub
        error = None
        try:
            upstreams = UpstreamSet.from_config(cfg, previous=hub.upstreams)
            await upstreams.start(hub.loop)
            old, hub.upstreams = hub.upstreams, upstreams
            old.close()
            hub.rules = RuleSet.from_config(cfg)
            hub.relay_cls = relay.load(cfg.relay)
            hub.config = self.cfg = cfg
            log.setup(cfg.log_format, cfg.log_level)
            log.attach(hub.loop)  # the new handler batches as the old one did
        except Exception as exc:  # the master reports it; this worker keeps the old config
            logger.exception("applying the reloaded config failed")
            error = f"{type(exc).__name__}: {exc}"
        if self.channel is not None:
            self.channel.send("applied", error)

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        if self.stop_requested is None or self.stop_requested.is_set():
            return
        # Here rather than in shutdown(), before the line that says so: from the moment the
        # signal is handled, a new client is refused instead of queued behind a closing port.
        self.close_listeners()
        logger.info(
            "stopping: no new connections, draining open tunnels",
            extra={"fields": {"signal": sig.name if sig else "-", "open": len(self.hub.tunnels)}},
        )
        self.stop_requested.set()

    def close_listeners(self) -> None:
        self.hub.draining = True
        self.stop_accepting()
        for sock in self.listeners:
            sock.close()

    async def shutdown(self) -> None:
        """Give open tunnels the drain timeout, then reset what is left (the listeners are
        already closed: request_stop did it)."""
        deadline = time.monotonic() + self.cfg.drain_timeout
        while self.hub.tunnels and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        left = list(self.hub.tunnels)
        for tunnel in left:
            if tunnel.task is not None:
                tunnel.task.cancel()
            elif tunnel.relay is not None:
                tunnel.relay.abort("shutdown")
        for _ in range(100):  # let the resets and their access records happen
            if not self.hub.tunnels:
                break
            await asyncio.sleep(0.01)
        logger.info("stopped", extra={"fields": {"reset": len(left), "served": self.hub.total}})

    # Accepting

    def start_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.listeners:
            loop.add_reader(sock.fileno(), self.on_readable, sock)
        self.accept_paused = False

    def stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.listeners:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())

    def fds_in_use(self) -> int:
        """Descriptors we hold, counted without a syscall: base, two per tunnel, pipes."""
        return self.fd_base + 2 * len(self.hub.tunnels) + self.hub.relay_cls.descriptors_in_use()

    def on_readable(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.fds_in_use() + FD_HEADROOM >= self.fd_limit:
                # Leave the client in the backlog rather than accept it and fail its upstream.
                self.exhausted(OSError(errno.EMFILE, "descriptor budget reached"))
                return
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_EXHAUSTED:
                    self.exhausted(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that client gave up before we got to it
                logger.warning("accept failed", extra={"fields": {"error": str(exc)}})
                return
            self.backoff = BACKOFF_FIRST
            self.accepted(conn, addr)

    def exhausted(self, exc: OSError) -> None:
        """Out of descriptors: pause accepting with a growing delay; clients wait in the backlog."""
        loop = asyncio.get_running_loop()
        self.stop_accepting()
        self.accept_paused = True
        self.exhausted_count += 1
        now = time.monotonic()
        if now - self.exhausted_logged >= BACKOFF_LOG_EVERY:
            logger.warning(
                "out of file descriptors: accepting slowed down",
                extra={
                    "fields": {
                        "error": exc.strerror,
                        "open": len(self.hub.tunnels),
                        "events": self.exhausted_count,
                        "retry_in": f"{self.backoff:g}s",
                    }
                },
            )
            self.exhausted_logged = now
            self.exhausted_count = 0
        loop.call_later(self.backoff, self.resume_accepting)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def resume_accepting(self) -> None:
        if self.accept_paused and not self.hub.draining:
            self.start_accepting()

    def accepted(self, conn: socket.socket, addr: tuple) -> None:
        conn.setblocking(False)
        hub, cfg = self.hub, self.cfg
        tunnel = Tunnel(hub, conn, addr)
        hub.total += 1
        bucket = bucket_of(tunnel.client_ip)
        # The caps hold for the instance: the shared table counts every worker's tunnels.
        refused = hub.row.admit(bucket, cfg.max_connections, cfg.max_client_connections)
        if refused:
            tunnel.refuse(refused)
            return
        tunnel.bucket = bucket
        hub.tunnels.add(tunnel)
        tunnel.task = hub.loop.create_task(tunnel.run())

    # Timers

    async def tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK)
            self.tick(loop.time())

    def tick(self, now: float) -> None:
        idle, half = self.cfg.idle_timeout, self.cfg.half_close_timeout
        if idle > 0 or half > 0:
            for tunnel in list(self.hub.tunnels):
                if tunnel.relay is not None:
                    tunnel.relay.check_timers(now, idle, half)
        metrics.record.tick(self.hub)


def log_listening(listeners: list[socket.socket], cfg: Config, **fields: object) -> None:
    """One ``listening on`` line per socket: operators and tests read the real port here."""
    upstreams = config.display("upstream-proxy", cfg.upstreams)
    for sock in listeners:
        host, port = sock.getsockname()[:2]
        logger.info(
            f"listening on {authority(host, port)}",
            extra={"fields": {"upstream": upstreams, **fields}},
        )


def _private_row() -> Row:
    """A table of one row, for a Server run without a master (its caps are its own)."""
    table = SharedTable(rows=1)
    table.reserve(0)
    return table.row(0)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; a broken install still runs
        logger.warning("uvloop is not installed; using the slower asyncio event loop")
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def serve(
    cfg: Config, listeners: list[socket.socket], row: Row | None, channel: Channel | None
) -> int:
    """Run one worker until it has stopped; its exit status."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(Server(cfg, listeners, row, channel).serve())
    return 0


def raise_fd_limit() -> None:
    """Lift the soft descriptor limit to the hard one: each tunnel holds two sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def usable_relay(cfg: Config) -> Config:
    """``cfg`` with a relay this kernel can run: splice falls back to copy, said once."""
    _, why = relay.choose(cfg.relay)
    if why:
        logger.warning(f"{cfg.relay} relay unavailable ({why}); using {relay.FALLBACK} instead")
        cfg = dataclasses.replace(cfg, relay=relay.FALLBACK)
    return cfg
