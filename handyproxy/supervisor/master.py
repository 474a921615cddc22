"""The master: holds the listening sockets, runs the workers, reloads and upgrades in place.

HAProxy's ``-W`` model, used even with ``-workers 1``: the master never carries a tunnel, so it
can re-execute itself (same PID: systemd keeps tracking it) while its workers go on relaying.
It is a small synchronous loop over a selector (its signals arrive through a wakeup socket),
with no event loop and no threads, so ``fork()`` from it is safe.

* A worker that dies unexpectedly is replaced after an exponential backoff; the reason (exit
  status or signal) is logged once.
* SIGHUP (or ``reload`` on the control socket) re-reads the config; the workers apply it to the
  tunnels they accept from then on. A setting that cannot change in place (the listen address
  or port, the number of workers), or code that changed on disk, turns the reload into an
  upgrade.
* SIGUSR2 (or ``upgrade``) re-executes the master on the installed code. The listeners, the
  shared counts, the old workers' channels and any waiting control client cross the exec as
  inherited descriptors named in ``HANDYPROXY_MASTER_STATE``; the new master starts workers on
  the same sockets, and only once they all serve tells the old ones to drain and exit. The
  sockets are never closed, so there is no moment without a listener.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import handyproxy
from handyproxy import cli, log, metrics, server, systemd
from handyproxy.config import Config
from handyproxy.log import logger
from handyproxy.supervisor.channel import Channel
from handyproxy.supervisor.control import ControlServer
from handyproxy.supervisor.table import SharedTable

STATE_ENV = "HANDYPROXY_MASTER_STATE"
#: Set for the trial run before an upgrade: parse the config, import everything, exit 0.
CHECK_ENV = "HANDYPROXY_CHECK"
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: A worker that served this long before it died starts the next backoff afresh.
BACKOFF_RESET_AFTER = 60.0
#: New workers must serve (or acknowledge a config) within this, or the operation failed.
OPERATION_TIMEOUT = 30.0
CHECK_TIMEOUT = 60.0
TICK = 1.0
EXIT_FAILED = 1
#: Settings a running worker cannot take: a reload that changes one becomes an upgrade.
FIXED_SETTINGS = ("local_port", "listen_address", "workers", "metrics_address")
#: Blocked across the exec (the mask survives it): one arriving while the new interpreter
#: starts stays pending until the new master handles it, instead of killing it.
MASTER_SIGNALS = (
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGCHLD,
)


@dataclasses.dataclass(eq=False)
class Worker:
    pid: int
    slot: int
    row: int
    generation: int
    channel: Channel
    started: float
    ready: bool = False
    leaving: bool = False  # told to stop: an old generation, or the instance stopping


@dataclasses.dataclass(eq=False)
class Operation:
    """A start, reload or upgrade under way: what it waits for and who wants the answer."""

    kind: str  # "start", "reload", "upgrade"
    generation: int
    deadline: float
    replies: list[socket.socket] = dataclasses.field(default_factory=list)
    waiting: set[int] = dataclasses.field(default_factory=set)  # reload: pids yet to apply
    errors: list[str] = dataclasses.field(default_factory=list)
    old_listeners: list[socket.socket] = dataclasses.field(default_factory=list)
    logged: bool = False  # its failure was logged where it happened, with the fields


def code_fingerprint() -> str:
    """What the installed code looks like on disk (names, sizes, mtimes of the package's
    files): a reload that finds it changed upgrades instead, so a package upgrade needs no
    separate step."""
    digest = hashlib.sha256()
    root = Path(handyproxy.__file__).parent
    for path in sorted(root.rglob("*.py")):
        with contextlib.suppress(OSError):
            st = path.stat()
            digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def describe(status: int) -> str:
    """A wait status as an operator reads it: ``exit 1``, ``signal SIGKILL``."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"signal {signal.Signals(sig).name}"
        except ValueError:
            return f"signal {sig}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def reexec_argv() -> list[str]:
    """The command that started us, run by the same interpreter (works for ``-m handyproxy``
    and for the console script alike)."""
    return [sys.executable, *sys.orig_argv[1:]]


class Master:
    """The supervisor; ``run()`` returns the instance's exit status."""

    def __init__(self, cfg: Config, argv: list[str]) -> None:
        self.cfg = cfg
        self.argv = argv
        self.listeners: list[socket.socket] = []
        self.table: SharedTable = None  # type: ignore[assignment]
        self.workers: dict[int, Worker] = {}
        self.generation = 1
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.signals: list[int] = []
        self.stopping = False
        self.serving = False  # the first generation has served: deaths are restarted now
        self.backoff: dict[int, float] = {}
        self.restart_at: dict[int, float] = {}
        self.operation: Operation | None = None
        self.queued: list[socket.socket] | None = None  # a reload asked for during another
        self.control: ControlServer | None = None
        self.exit_status = 0
        self.last_status = ""
        self.fingerprint = code_fingerprint()

    # Start: cold, or adopted from the master we were before an exec

    def start(self) -> None:
        state = os.environ.pop(STATE_ENV, None)
        if state:
            self.adopt(json.loads(state))
        else:
            self.listeners = server.make_listeners(self.cfg, self.cfg.workers)
            self.table = SharedTable()
            if self.cfg.control_socket:
                self.control = ControlServer.bind(self.cfg.control_socket)
            self.operation = Operation("start", self.generation, time.monotonic() + 1e9)
        if self.control is not None:
            self.selector.register(self.control.sock, selectors.EVENT_READ, self.on_control)
        for slot in range(self.cfg.workers):
            self.spawn(slot)

    def adopt(self, state: dict) -> None:
        """Take over from the master we were: sockets, counts, old workers, waiting clients."""
        self.serving = True
        self.generation = state["generation"] + 1
        self.table = SharedTable(fd=state["table"])
        os.set_inheritable(self.table.fd, False)
        listeners = [_adopt_socket(fd) for fd in state["listeners"]]
        op = Operation("upgrade", self.generation, time.monotonic() + OPERATION_TIMEOUT)
        op.replies = [_adopt_socket(fd) for fd in state["replies"]]
        for item in state["workers"]:
            sock = _adopt_socket(item["fd"])
            worker = Worker(
                pid=item["pid"],
                slot=item["slot"],
                row=item["row"],
                generation=item["generation"],
                channel=Channel(sock),
                started=item["started"],
                ready=True,
                leaving=item["leaving"],
            )
            self.workers[worker.pid] = worker
            self.selector.register(worker.channel.sock, selectors.EVENT_READ, worker)
            metrics.worker_started(worker.pid)
        if state["control"] is not None:
            self.control = ControlServer(_adopt_socket(state["control"]), state["control_path"])
        if self.control is None or self.control.path != self.cfg.control_socket:
            if self.control is not None:
                self.control.close()
                self.control = None
            if self.cfg.control_socket:
                self.control = ControlServer.bind(self.cfg.control_socket)
        old_listen = (state["listen_address"], state["local_port"])
        self.listeners = listeners
        if old_listen != (self.cfg.listen_address, self.cfg.local_port):
            try:
                self.listeners = server.make_listeners(self.cfg, self.cfg.workers)
                op.old_listeners = listeners
            except server.StartupError as exc:
                logger.error(f"{exc}; the old listeners stay")
                op.errors.append(str(exc))
        self.operation = op
        logger.info(
            "upgraded: new workers starting on the same sockets",
            extra={"fields": {"version": handyproxy.__version__, "from": state["version"]}},
        )

    # Workers

    def spawn(self, slot: int) -> None:
        used = {w.row for w in self.workers.values()}
        row = next(i for i in range(self.table.rows) if i not in used)
        self.table.clear(row)
        self.table.reserve(row)
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            ours.close()
            self.become_worker(slot, row, theirs)
        theirs.close()
        worker = Worker(pid, slot, row, self.generation, Channel(ours), time.monotonic())
        self.workers[pid] = worker
        metrics.worker_started(pid)
        self.selector.register(worker.channel.sock, selectors.EVENT_READ, worker)

    def shares(self) -> list[list[socket.socket]]:
        """Each worker's listeners: one each when there is one per worker (SO_REUSEPORT lets
        the kernel spread the clients), else all of them for every worker."""
        n = self.cfg.workers
        if len(self.listeners) == n:
            return [[sock] for sock in self.listeners]
        return [self.listeners] * n

    def become_worker(self, slot: int, row: int, sock: socket.socket) -> None:
        """In the forked child: drop what belongs to the master and serve; never returns."""
        code = EXIT_FAILED
        try:
            signal.set_wakeup_fd(-1)
            for sig in MASTER_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            for sig in server.IGNORED_SIGNALS:  # from the first moment, not once it serves
                signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            self.selector.close()
            self.wake_r.close()
            self.wake_w.close()
            if self.control is not None:
                self.control.sock.close()
            for other in self.workers.values():
                other.channel.sock.close()
            if self.operation is not None:
                for conn in self.operation.replies:
                    conn.close()
                for old in self.operation.old_listeners:
                    old.close()
            # The other workers' listeners came along with fork(): holding them would keep
            # those sockets (and their share of clients) alive after their owners close them.
            share = self.shares()[slot]
            for listener in self.listeners:
                if listener not in share:
                    listener.close()
            code = server.serve(self.cfg, share, self.table.row(row), Channel(sock))
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def on_worker(self, worker: Worker) -> None:
        for message in worker.channel.received():
            if message[0] == "ready":
                worker.ready = True
            elif message[0] == "applied" and self.operation is not None:
                self.operation.waiting.discard(worker.pid)
                if message[1]:
                    self.operation.errors.append(f"worker {worker.pid}: {message[1]}")
        if worker.channel.closed:
            self.selector.unregister(worker.channel.sock)
            worker.channel.close()
        self.progress()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self.gone(worker, status)

    def gone(self, worker: Worker, status: int) -> None:
        if not worker.channel.closed:
            self.selector.unregister(worker.channel.sock)
            worker.channel.close()
        self.table.clear(worker.row)  # its tunnels died with it
        metrics.worker_exited(worker.pid)
        how = describe(status)
        fields = {"pid": worker.pid, "status": how}
        op = self.operation
        if op is not None:
            op.waiting.discard(worker.pid)
        if worker.leaving:
            if os.waitstatus_to_exitcode(status) == 0:
                logger.info("worker exited", extra={"fields": fields})
            else:
                logger.warning("worker exited", extra={"fields": fields})
                if self.stopping:
                    self.exit_status = EXIT_FAILED
            self.progress()
            return
        if not self.serving:
            logger.error("worker died before serving; cannot start", extra={"fields": fields})
            self.exit_status = EXIT_FAILED
            self.stop(signal.SIGTERM)
            return
        if op is not None and op.kind == "upgrade" and worker.generation == op.generation:
            self.fail(f"a new worker died before serving ({how})")
            return
        if self.stopping or worker.generation != self.generation:
            return
        lived = time.monotonic() - worker.started
        delay = (
            BACKOFF_FIRST
            if lived >= BACKOFF_RESET_AFTER
            else self.backoff.get(worker.slot, BACKOFF_FIRST)
        )
        self.backoff[worker.slot] = min(delay * 2, BACKOFF_MAX)
        self.restart_at[worker.slot] = time.monotonic() + delay
        logger.error(
            "worker died; starting another",
            extra={"fields": {**fields, "restart_in": f"{delay:g}s"}},
        )
        self.progress()

    # Operations: start, reload, upgrade

    def progress(self) -> None:
        """Finish the operation under way once what it waits for has happened."""
        op = self.operation
        if op is None:
            return
        if op.kind == "reload":
            if not op.waiting:
                self.finish()
            return
        new = [w for w in self.workers.values() if w.generation == op.generation]
        if len(new) < self.cfg.workers or not all(w.ready for w in new):
            return
        for worker in self.workers.values():
            if worker.generation < op.generation and not worker.leaving:
                worker.leaving = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        for sock in op.old_listeners:
            sock.close()
        op.old_listeners = []
        self.serving = True
        self.finish()

    def finish(self) -> None:
        op = self.operation
        assert op is not None
        self.operation = None
        if op.kind in ("reload", "upgrade"):
            metrics.reloaded(not op.errors)
        if op.errors:
            text = f"{op.kind} failed: {'; '.join(op.errors)}"
        else:
            text = f"{op.kind} done" if op.kind != "start" else "ready"
        tunnels = f"{self.table.open_total()} tunnels open"
        if op.kind in ("start", "upgrade") and not op.errors:
            # Once the workers serve: this line is when an operator (and a test) may connect.
            server.log_listening(self.listeners, self.cfg, workers=self.cfg.workers)
        if not (op.kind == "start" and op.errors):  # a start that failed ends in an exit
            systemd.notify("READY=1", f"STATUS={text}, {tunnels}")
        if op.kind != "start" and not op.logged:
            level = logger.error if op.errors else logger.info
            level(text, extra={"fields": {"version": handyproxy.__version__}})
        for conn in op.replies:
            _reply(conn, ("failed: " + text) if op.errors else f"ok {text}, {tunnels}")
        if self.queued is not None:
            queued, self.queued = self.queued, None
            self.reload(queued)

    def fail(self, reason: str) -> None:
        """The operation under way failed: what it started goes, the old workers stay."""
        op = self.operation
        if op is None:
            return
        op.errors.append(reason)
        if op.kind in ("upgrade", "start"):
            for worker in list(self.workers.values()):
                if worker.generation == op.generation and not worker.leaving:
                    worker.leaving = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
            older = [w.generation for w in self.workers.values() if not w.leaving]
            if older:
                self.generation = max(older)
        self.finish()

    def begin(self) -> None:
        """Tell systemd a reload is under way (it waits for READY=1)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def reload(self, replies: list[socket.socket]) -> None:
        if self.stopping:
            for conn in replies:
                _reply(conn, "failed: stopping")
            return
        if self.operation is not None:
            # Run again once this one is done: the file may have changed after it was read.
            self.queued = (self.queued or []) + replies
            return
        self.begin()
        try:
            cfg = server.usable_relay(cli.parse_args(self.argv))
        except cli.UsageError as exc:
            logger.error(
                "reload failed; the running config stays",
                extra={"fields": {"field": exc.flag, "reason": exc.reason}},
            )
            op = Operation("reload", self.generation, 0.0, replies, errors=[str(exc)])
            op.logged = True
            self.operation = op
            self.finish()
            return
        fixed = [f for f in FIXED_SETTINGS if getattr(cfg, f) != getattr(self.cfg, f)]
        if code_fingerprint() != self.fingerprint:
            self.upgrade(replies, "the installed code changed", begun=True)
            return
        if fixed:
            names = ",".join(f.replace("_", "-") for f in fixed)
            self.upgrade(replies, f"{names} cannot change in place", begun=True)
            return
        self.cfg = cfg
        log.setup(cfg.log_format, cfg.log_level)
        op = Operation("reload", self.generation, time.monotonic() + OPERATION_TIMEOUT, replies)
        for worker in self.workers.values():
            current = not worker.leaving and worker.generation == self.generation
            if current and worker.channel.send("config", cfg):
                op.waiting.add(worker.pid)
        self.operation = op
        logger.info(
            "reloading: new tunnels get the new config",
            extra={"fields": {"workers": len(op.waiting)}},
        )
        self.progress()

    def upgrade(self, replies: list[socket.socket], why: str, begun: bool = False) -> None:
        if self.stopping:
            for conn in replies:
                _reply(conn, "failed: stopping")
            return
        if self.operation is not None and not begun:
            self.queued = (self.queued or []) + replies
            return
        if not begun:
            self.begin()
        op = Operation("upgrade", self.generation, 0.0, replies)
        self.operation = op
        logger.info("upgrading: re-executing the master", extra={"fields": {"why": why}})
        check = subprocess.run(
            reexec_argv(),
            env={**os.environ, CHECK_ENV: "1"},
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
        )
        if check.returncode != 0:
            lines = (check.stderr or check.stdout).strip().splitlines()
            reason = lines[-1] if lines else f"exit {check.returncode}"
            logger.error(
                "upgrade failed: the new code does not start; the running one stays",
                extra={"fields": {"reason": reason}},
            )
            op.logged = True
            self.fail(reason)
            return
        self.exec()

    def exec(self) -> None:
        """Replace this process's code, keeping what the next master needs as open fds."""
        op = self.operation
        assert op is not None
        keep = [*self.listeners, *op.replies]
        keep += [w.channel.sock for w in self.workers.values() if not w.channel.closed]
        if self.control is not None:
            keep.append(self.control.sock)
        state = {
            "generation": self.generation,
            "version": handyproxy.__version__,
            "table": self.table.fd,
            "listeners": [s.fileno() for s in self.listeners],
            "replies": [s.fileno() for s in op.replies],
            "control": self.control.sock.fileno() if self.control else None,
            "control_path": self.control.path if self.control else "",
            "listen_address": self.cfg.listen_address,
            "local_port": self.cfg.local_port,
            "workers": [
                {
                    "pid": w.pid,
                    "slot": w.slot,
                    "row": w.row,
                    "generation": w.generation,
                    "fd": w.channel.sock.fileno(),
                    "started": w.started,
                    "leaving": w.leaving,
                }
                for w in self.workers.values()
                if not w.channel.closed
            ],
        }
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            os.set_inheritable(self.table.fd, True)
            for sock in keep:
                sock.setblocking(True)
                os.set_inheritable(sock.fileno(), True)
            os.environ[STATE_ENV] = json.dumps(state)
            for handler in logger.handlers:
                handler.flush()
            metrics.shutdown(remove=False)  # the next image serves them from the same directory
            os.execv(sys.executable, reexec_argv())
        except OSError as exc:
            os.environ.pop(STATE_ENV, None)
            os.set_inheritable(self.table.fd, False)
            for sock in keep:
                os.set_inheritable(sock.fileno(), False)
                sock.setblocking(False)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            with contextlib.suppress(OSError):
                # shutdown() above forgot the state: take up the same directory again
                metrics.prepare(self.cfg, fresh=False)
                if metrics.enabled():
                    metrics.start_exporter(self.cfg)
            self.fail(f"exec failed: {exc}")

    # Stopping

    def stop(self, sig: int) -> None:
        first = not self.stopping
        self.stopping = True
        if first:
            systemd.stopping(f"draining {len(self.workers)} workers")
            # The port closes with the workers' copies: while this process held one, new
            # clients would queue and then be reset.
            for sock in self.listeners:
                sock.close()
            if self.control is not None:
                self.selector.unregister(self.control.sock)
                self.control.close()
                self.control = None
            if self.operation is not None:
                self.fail("stopping")
        for worker in self.workers.values():
            worker.leaving = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, sig)

    # The loop

    def on_control(self, _key: object) -> None:
        assert self.control is not None
        request = self.control.accept()
        if request is None:
            return
        verb, conn = request
        if verb == "reload":
            self.reload([conn])
        elif verb == "upgrade":
            self.upgrade([conn], "asked on the control socket")
        elif verb == "status":
            _reply(conn, f"ok {self.status_text()}")
        else:
            _reply(conn, f"failed: unknown request {verb!r} (reload, upgrade, status)")

    def status_text(self) -> str:
        live = sum(1 for w in self.workers.values() if not w.leaving)
        return (
            f"handyproxy {handyproxy.__version__}: {self.table.open_total()} tunnels open, "
            f"{live} workers"
        )

    def on_signal(self, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stop(sig)
        elif sig == signal.SIGHUP:
            self.reload([])
        elif sig == signal.SIGUSR2:
            self.upgrade([], "SIGUSR2")
        elif sig == signal.SIGUSR1:
            logger.info(
                "status",
                extra={
                    "fields": {
                        "version": handyproxy.__version__,
                        "workers": " ".join(
                            f"{w.pid}{'(leaving)' if w.leaving else ''}"
                            for w in self.workers.values()
                        ),
                        "open": self.table.open_total(),
                    }
                },
            )

    def timers(self, now: float) -> float:
        """Run what is due; the seconds until the next thing is."""
        for slot, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[slot]
                if not self.stopping:
                    self.spawn(slot)
        op = self.operation
        if op is not None and op.deadline <= now:
            self.fail(f"timed out after {OPERATION_TIMEOUT:g}s")
        text = f"{self.table.open_total()} tunnels open"
        if self.serving and self.operation is None and text != self.last_status:
            systemd.status(text)
            self.last_status = text
        upcoming = [*self.restart_at.values()]
        if self.operation is not None:
            upcoming.append(self.operation.deadline)
        return max(0.0, min([TICK, *(t - now for t in upcoming)]))

    def run(self) -> int:
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, lambda s, _f: self.signals.append(s))
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        watchdog = systemd.watchdog_interval()
        next_ping = 0.0
        while self.workers or (self.restart_at and not self.stopping):
            timeout = self.timers(time.monotonic())
            if watchdog:
                timeout = min(timeout, watchdog)
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self.wake_r.recv(4096)
                elif isinstance(key.data, Worker):
                    self.on_worker(key.data)
                else:
                    key.data(key)
            while self.signals:
                self.on_signal(self.signals.pop(0))
            self.reap()
            if watchdog and time.monotonic() >= next_ping:
                systemd.watchdog()
                next_ping = time.monotonic() + watchdog
        for sock in self.listeners:
            sock.close()
        if self.control is not None:
            self.control.close()
        logger.info("master stopped", extra={"fields": {"status": self.exit_status}})
        return self.exit_status


def _adopt_socket(fd: int) -> socket.socket:
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def _reply(conn: socket.socket, text: str) -> None:
    with contextlib.suppress(OSError):
        conn.setblocking(True)
        conn.settimeout(2.0)
        conn.sendall(text.encode() + b"\n")
    conn.close()


def run(cfg: Config, argv: list[str]) -> int:
    """Start the instance; 0 after a clean stop, 3 when it cannot listen, 1 when a worker
    could not start or did not stop cleanly."""
    server.raise_fd_limit()
    cfg = server.usable_relay(cfg)
    master = Master(cfg, argv)
    try:
        # Before any worker forks: they inherit where the figures go.
        metrics.prepare(cfg, fresh=STATE_ENV not in os.environ)
        if metrics.enabled():  # without -metrics-address there is nothing to serve
            metrics.start_exporter(cfg)
    except OSError as exc:
        logger.error(f"cannot serve metrics on {cfg.metrics_address}: {exc}")
        return server.EXIT_STARTUP_FAILURE
    try:
        return master.run()
    except server.StartupError as exc:
        logger.error(str(exc))
        return server.EXIT_STARTUP_FAILURE
    finally:
        metrics.shutdown()
