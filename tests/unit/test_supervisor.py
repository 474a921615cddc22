"""The master's parts that need no process: the shared tunnel counts, the worker channel, the
control socket's request and answer, and how a worker's end is described."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

from handyproxy.config import Config
from handyproxy.supervisor import control
from handyproxy.supervisor.channel import Channel
from handyproxy.supervisor.master import describe
from handyproxy.supervisor.table import BUCKETS, SharedTable, bucket_of


def test_caps_count_every_row_and_refuse_without_counting():
    table = SharedTable(rows=4)
    table.reserve(1)
    a, b = table.row(0), table.row(1)
    bucket = bucket_of("198.51.100.2")
    assert a.admit(bucket, 3, 0) is None
    assert b.admit(bucket, 3, 0) is None
    assert b.admit(bucket_of("198.51.100.3"), 3, 0) is None
    assert a.admit(bucket, 3, 0) == "connection-cap"  # three open, in two rows
    assert table.open_total() == 3
    a.add(bucket, -1)
    assert a.admit(bucket, 3, 0) is None


def test_the_client_cap_is_per_bucket_across_rows_and_a_cleared_row_frees_its_share():
    table = SharedTable(rows=4)
    table.reserve(2)
    a, b = table.row(0), table.row(2)
    ip = "2001:db8:100::2"
    assert a.admit(bucket_of(ip), 0, 2) is None
    assert b.admit(bucket_of(ip), 0, 2) is None
    assert b.admit(bucket_of(ip), 0, 2) == "client-cap"
    assert b.admit(bucket_of("198.51.100.2"), 0, 2) is None  # another client
    table.clear(2)  # that worker died: its tunnels went with it
    assert table.open_total() == 1
    assert b.admit(bucket_of(ip), 0, 2) is None


def test_buckets_are_stable_and_a_shared_fd_maps_the_same_counts():
    assert bucket_of("198.51.100.2") == bucket_of("198.51.100.2") < BUCKETS
    table = SharedTable(rows=2)
    table.reserve(1)
    table.row(1).add(5, 1)
    again = SharedTable(fd=os.dup(table.fd), rows=2)  # as the re-executed master maps it
    assert again.open_total() == 1 and again.client_total(5) == 1


def test_a_channel_carries_a_whole_config_and_notices_the_peer_closing():
    left, right = socket.socketpair()
    ours, theirs = Channel(left), Channel(right)
    cfg = Config(max_connections=7).validate()
    assert ours.send("config", cfg)
    assert ours.send("ready")
    messages = []
    while len(messages) < 2:
        messages += theirs.received()
    assert messages[0][0] == "config" and messages[0][1].max_connections == 7
    assert messages[1] == ("ready",)
    ours.close()
    assert theirs.received() == [] and theirs.closed
    theirs.close()


def test_the_reload_client_exits_by_the_masters_answer(tmp_path: Path, capsys):
    server = control.ControlServer.bind(str(tmp_path / "ctl"))
    assert (tmp_path / "ctl").stat().st_mode & 0o777 == 0o600
    answers = iter(["ok reload done", "failed: reload failed: x: bad"])

    def answer_twice() -> None:
        for _ in range(2):
            server.sock.setblocking(True)
            request = server.accept()
            assert request is not None and request[0] == "reload"
            request[1].sendall(next(answers).encode() + b"\n")
            request[1].close()

    thread = threading.Thread(target=answer_twice)
    thread.start()
    assert control.main(server.path, "reload") == 0
    assert control.main(server.path, "reload") == 1
    thread.join()
    assert "failed: reload failed: x: bad" in capsys.readouterr().err
    server.close()
    assert not (tmp_path / "ctl").exists()
    ok, why = control.request(server.path, "reload")
    assert not ok and "cannot ask the master" in why


def test_a_workers_end_reads_as_its_exit_status_or_signal():
    assert describe(0) == "exit 0"
    assert describe(1 << 8) == "exit 1"
    assert describe(signal.SIGKILL) == "signal SIGKILL"
