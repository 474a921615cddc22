"""The command line: the original's single-dash flags, a TOML file, and the ``demo`` subcommand.

argparse is not used because the original's flags are Go ``flag`` style (``-local-port 8443``,
``-local-port=8443``), which argparse would split into short options.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from handyproxy import __version__, config

EXIT_USAGE = 2
#: Client modes: ask the running master over -control-socket instead of starting one.
CLIENT_FLAGS = {"reload": "reload", "upgrade": "upgrade", "status": "status"}


class UsageError(Exception):
    """A flag or config value is wrong; the message is the one line the user sees."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


def usage() -> str:
    defaults = config.Config()
    lines = [
        f"usage: handyproxy [flags]       (handyproxy {__version__})",
        "       handyproxy demo [--keep]  build a namespace lab and show traffic flowing (root)",
        "       handyproxy -reload|-upgrade|-status -control-socket PATH",
        "                                 ask the running instance; exit 1 when it failed",
        "",
        "Flags take one or two dashes, '-flag value' or '-flag=value':",
    ]
    for f in dataclasses.fields(config.Config):
        name = f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        shown = value if f.metadata["kind"] in ("str", "int") else config.display(name, value)
        lines.append(f"  -{name:<24} {f.metadata['help']} (default {shown!r})")
    lines.append(f"  -{'config FILE':<24} TOML file with the settings above; flags win")
    lines.append(f"  -{'version':<24} print the version and exit")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> config.Config:
    """Turn argv into a validated Config; raise UsageError naming the flag or key at fault."""
    known = set(config.option_names())
    given: dict[str, Any] = {}
    config_path: str | None = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("-") or arg in ("-", "--"):
            shown = arg if arg and arg.isprintable() else repr(arg)  # '' must still show
            raise UsageError(shown, "unexpected argument (flags start with '-')")
        name, eq, value = arg.lstrip("-").partition("=")
        if name in ("h", "help"):
            raise _HelpRequested
        if name == "version":
            raise _VersionRequested
        if name != "config" and name not in known:
            raise UsageError(f"-{name}", "unknown flag (see -help)")
        kind = config.kind(name) if name != "config" else "str"
        if not eq:
            if kind == "bool":  # Go's flag: a bare boolean flag means true
                value = "true"
            elif not args:
                raise UsageError(f"-{name}", "missing value")
            else:
                value = args.pop(0)
        if name == "config":
            config_path = value
            continue
        try:
            converted = config.convert(name, value)
        except ValueError as exc:
            raise UsageError(f"-{name}", str(exc)) from None
        if kind in config.REPEATABLE_KINDS and name in given:
            converted = given[name] + converted
        given[name] = converted
    values: dict[str, Any] = {}
    if config_path is not None:
        try:
            values.update(config.load_toml(config_path))
        except config.ConfigError as exc:
            where = config_path if exc.field == "config" else f"{config_path}: {exc.field}"
            raise UsageError(where, exc.reason) from None
    values.update(given)
    try:
        return config.build(values)
    except config.ConfigError as exc:
        where = (
            f"-{exc.field}"
            if exc.field in given or config_path is None
            else (f"{config_path}: {exc.field}")
        )
        raise UsageError(where, exc.reason) from None


class _VersionRequested(Exception):
    """``-version`` was given: print it and stop, whatever else argv holds."""


class _HelpRequested(Exception):
    """``-help`` was given: print the usage and stop."""


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "demo":
        from handyproxy.lab import demo

        return demo.main(args[1:])
    verbs = [a.lstrip("-") for a in args if a.lstrip("-") in CLIENT_FLAGS and a.startswith("-")]
    if verbs:
        return control_client(
            CLIENT_FLAGS[verbs[0]], [a for a in args if a.lstrip("-") not in CLIENT_FLAGS]
        )
    try:
        cfg = parse_args(args)
    except _VersionRequested:
        print(f"handyproxy {__version__}")
        return 0
    except _HelpRequested:
        print(usage())
        return 0
    except UsageError as exc:
        print(f"handyproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from handyproxy import log
    from handyproxy.supervisor import master

    if os.environ.get(master.CHECK_ENV):  # an upgrade's trial run: config and code load
        print(f"handyproxy {__version__}: config and code load")
        return 0
    log.setup(cfg.log_format, cfg.log_level)
    return master.run(cfg, args)


def control_client(verb: str, args: list[str]) -> int:
    """``-reload``: the socket comes from ``-control-socket`` on the command line, or from the
    config when it parses (a broken config is the master's to report, so the flag is safer)."""
    from handyproxy.supervisor import control

    path = ""
    for i, arg in enumerate(args):
        name, eq, value = arg.lstrip("-").partition("=")
        if name == "control-socket":
            path = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    if not path:
        try:
            path = parse_args(args).control_socket
        except (UsageError, _VersionRequested, _HelpRequested):
            path = ""
    if not path:
        print(f"handyproxy: -{verb}: needs -control-socket PATH", file=sys.stderr)
        return EXIT_USAGE
    return control.main(path, verb)
