"""``handyproxy demo``: watch a plain ``curl`` reach an origin through the forwarder, in seconds.

Why: a newcomer rarely has an upstream proxy and a REDIRECT rule at hand. The demo builds a
throwaway lab of network namespaces (``handyproxy.lab.netns``): a client, a router running
handyproxy
behind an nftables REDIRECT rule, an upstream host running the built-in CONNECT proxy
(``handyproxy.lab.connect_proxy``) and an origin HTTP server that only the upstream can reach. The
client runs ``curl http://198.18.0.2/`` and ``curl http://[2001:db8:18::2]/`` as if there were
no proxy at all; the demo prints the response and each hop's log lines, then removes the lab
(also on Ctrl-C). Exit status 0 means the origin's bytes arrived over IPv4 and IPv6.

Needs root, ``ip`` (iproute2), ``nft`` (nftables) and ``curl``; nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from handyproxy.lab import netns as lablib
from handyproxy.lab.output import Output

FORWARDER_PORT = 8443
PROXY_MODULE = "handyproxy.lab.connect_proxy"
ORIGIN_MODULE = "handyproxy.lab.origin"
PROXY_PORT = lablib.PROXY_PORT
ORIGIN_PORT = 80
GREETING = "Hello from the origin 198.18.0.2 / 2001:db8:18::2: you came through the CONNECT proxy."
URLS = (f"http://{lablib.ORIGIN_V4}/", f"http://[{lablib.ORIGIN_V6}]/")
START_TIMEOUT = 10.0
LOG_SETTLE = 5.0


def missing_requirements() -> list[str]:
    """The lab's needs plus curl, each named so the user knows what to install."""
    missing = lablib.missing_requirements()
    if shutil.which("curl") is None:
        missing.append("the 'curl' command (Debian package curl)")
    return missing


@dataclass
class Hop:
    """One process of the lab, with its output lines (also sent, tagged, to the demo's sink)."""

    name: str
    proc: subprocess.Popen[str]
    output: Output

    def wait_for(self, text: str, timeout: float, start: int = 0) -> bool:
        """True once a line (from index ``start`` on) contains ``text``; False on timeout/exit."""
        try:
            self.output.wait_for(re.escape(text), timeout, since=start)
        except TimeoutError:
            return False
        return True


class Demo:
    """The demo's steps, in the order a reader would perform them by hand."""

    def __init__(self, lab: lablib.Lab, workdir: Path, out: queue.Queue[str]) -> None:
        self.lab = lab
        self.workdir = workdir
        self.out = out
        self.hops: dict[str, Hop] = {}

    def start(self, name: str, ns: str, argv: Sequence[str]) -> Hop:
        def tagged(line: str) -> None:
            self.out.put(f"{name:<10} | {line}")

        proc, output = self.lab.spawn(ns, argv, name=name, on_line=tagged)
        hop = self.hops[name] = Hop(name, proc, output)
        return hop

    def start_lab_processes(self) -> str | None:
        """Start origin, proxy and forwarder; return why one failed, or None."""
        docroot = self.workdir / "www"
        docroot.mkdir()
        (docroot / "index.html").write_text(GREETING + "\n")
        py = sys.executable
        upstream = f"{lablib.UPSTREAM_V4}:{PROXY_PORT}"
        origin_flags = ["http", "--port", str(ORIGIN_PORT), "--root", str(docroot)]
        proxy_flags = ["--listen", f":{PROXY_PORT}"]
        forwarder_flags = ["-local-port", str(FORWARDER_PORT), "-upstream-proxy", upstream]
        origin = self.start("origin", "origin", [py, "-m", ORIGIN_MODULE, *origin_flags])
        proxy = self.start("upstream", "upstream", [py, "-m", PROXY_MODULE, *proxy_flags])
        forwarder = self.start(
            "router", "router", [py, "-m", "handyproxy", *forwarder_flags, "-sniff-timeout", "0"]
        )
        for hop in (origin, proxy, forwarder):
            if not hop.wait_for("listening on", START_TIMEOUT):
                return f"the {hop.name} process did not start (exit status {hop.proc.poll()})"
        self.lab.redirect(FORWARDER_PORT)
        return None

    def fetch(self, url: str) -> bool:
        """Run curl in the client namespace; print its answer and the hops' lines for it."""
        marks = {name: hop.output.mark() for name, hop in self.hops.items()}
        self.say(f"\n$ curl -sS -i {url}      # in the client namespace, no proxy settings")
        proc = self.lab.run(
            "client", ["curl", "-sS", "-i", "--max-time", "10", url], capture_output=True, text=True
        )
        for line in (proc.stdout + proc.stderr).splitlines():
            print(f"{'client':<10} | {line}", flush=True)
        # each hop's line for this request: the origin's as it answers, the others' at the end
        for name, text in (
            ("origin", '"GET /'),
            ("upstream", "tunnel end"),
            ("router", "tunnel end"),
        ):
            self.hops[name].wait_for(text, LOG_SETTLE, start=marks[name])
        print("-- what each hop logged for it:", flush=True)
        self.flush()
        return proc.returncode == 0 and GREETING in proc.stdout

    def say(self, text: str) -> None:
        self.flush()
        print(text, flush=True)

    def flush(self) -> None:
        """Print the hop lines that arrived so far (they are quiet until a request runs)."""
        while True:
            try:
                print(self.out.get_nowait(), flush=True)
            except queue.Empty:
                return


def describe(lab: lablib.Lab) -> str:
    a4, a6 = lablib.ADDRESSES[4], lablib.ADDRESSES[6]
    return "\n".join(
        [
            "HandyProxy demo: a throwaway lab of network namespaces, removed on exit.",
            f"  client    {a4['client']:<13} {a6['client']:<16} plain curl, route via router",
            f"  router    {a4['router']:<13} {a6['router']:<16} handyproxy :{FORWARDER_PORT} "
            "behind an nftables REDIRECT; no route to the origin",
            f"  upstream  {a4['upstream']:<13} {a6['upstream']:<16} built-in CONNECT proxy "
            f":{PROXY_PORT}",
            f"  origin    {a4['origin']:<13} {a6['origin']:<16} HTTP server :{ORIGIN_PORT}, "
            "reachable only from the upstream",
            f"  namespaces: {', '.join(lab.namespaces.values())}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 when the origin's page arrived over IPv4 and IPv6."""
    parser = argparse.ArgumentParser(
        prog="handyproxy demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the lab after the requests until Ctrl-C, to explore it",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    missing = missing_requirements()
    if missing:
        for item in missing:
            print(f"handyproxy demo: needs {item}", file=sys.stderr)
        return 1
    out: queue.Queue[str] = queue.Queue()
    try:
        with tempfile.TemporaryDirectory(prefix="handyproxy-demo-") as tmp, lablib.Lab() as lab:
            demo = Demo(lab, Path(tmp), out)
            print(describe(lab), flush=True)
            failure = demo.start_lab_processes()
            if failure:
                demo.flush()
                print(f"handyproxy demo: {failure}", file=sys.stderr)
                return 1
            print("\nrouter nftables rule (nft list table inet handyproxy_lab):")
            print(
                lab.run(
                    "router",
                    ["nft", "list", "table", "inet", lablib.NFT_TABLE],
                    capture_output=True,
                    text=True,
                ).stdout.rstrip(),
                flush=True,
            )
            demo.flush()
            results = [demo.fetch(url) for url in URLS]
            ok = all(results)
            print(
                f"\n{'OK' if ok else 'FAILED'}: the origin's page "
                f"{'arrived' if ok else 'did not arrive'} over IPv4 and IPv6.",
                flush=True,
            )
            if args.keep:
                print(
                    "The lab stays up; try: ip netns exec "
                    f"{lab.ns('client')} curl -i http://{lablib.ORIGIN_V4}/   "
                    "(Ctrl-C removes it)",
                    flush=True,
                )
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        with contextlib.suppress(queue.Empty):
                            print(out.get(timeout=1.0), flush=True)
            return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted; the lab is removed.", file=sys.stderr)
        return 130
    except lablib.LabError as exc:
        print(f"handyproxy demo: {exc}", file=sys.stderr)
        return 1
