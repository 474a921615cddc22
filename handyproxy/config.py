"""Every setting of the forwarder, its default and its validation, in one place.

The command line and the TOML file both end up here, so the rules for a value are written once.
Building a Config has no side effects; ``validate()`` is what can fail.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from handyproxy.address import split_hostport
from handyproxy.relay import RELAYS
from handyproxy.rules import Rule, parse_rules
from handyproxy.upstream import spec as upstream_spec

DEFAULT_UPSTREAM_PORT = upstream_spec.DEFAULT_PORT
#: Kinds whose flag may be given several times; the values add up instead of replacing.
REPEATABLE_KINDS = ("upstreams", "rules")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_MAX_DURATION = 2**63 / 1e9  # Go's time.Duration is int64 nanoseconds.


class ConfigError(ValueError):
    """A setting has a value the forwarder cannot run with; names the setting and why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_duration(text: str) -> float:
    """Parse a Go duration (``500ms``, ``3m``, ``1m30s``, ``-1s``) into seconds.

    The original's flags are Go ``time.Duration`` values, so operators' unit files and scripts
    already hold strings in this syntax; accepting exactly it keeps them working unchanged.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            if s[pos:].isascii() and s[pos:].replace(".", "", 1).isdigit():
                raise ValueError(f"missing unit in duration {text!r} (use e.g. 30s, 3m, 500ms)")
            raise ValueError(f"invalid duration {text!r} (use e.g. 30s, 3m, 1m30s, 500ms)")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if total > _MAX_DURATION:
        raise ValueError(f"duration {text!r} is out of range")
    return sign * total


def format_duration(seconds: float) -> str:
    """Render seconds the way Go prints short durations, for logs and ``-help``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    out = ""
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return out + f"{secs:g}s"


def parse_sniff_timeout(value: str | int | float) -> float:
    """The original's ``-sniff-timeout`` also takes a bare number of seconds (``-1`` = off)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif not isinstance(value, str):
        raise ValueError(f"expected a duration, got {value!r}")
    elif re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        seconds = float(value.strip())
    else:
        return parse_duration(value)
    if not math.isfinite(seconds) or abs(seconds) > _MAX_DURATION:
        raise ValueError(f"duration {value!r} is out of range")
    return seconds


def option(default: Any, kind: str, help: str) -> Any:
    """A Config field: ``kind`` says how a flag or TOML value is converted, ``help`` is its
    line in ``-help``. Kept beside the field so the two cannot drift apart."""
    return field(default=default, metadata={"kind": kind, "help": help})


@dataclass(frozen=True)
class Config:
    """The forwarder's settings; field names are the flag names with underscores."""

    local_port: int = option(8443, "int", "port to listen on (0: the kernel picks)")
    listen_address: str = option("", "str", "IP address to listen on (default: all, IPv4 and IPv6)")
    upstream_proxy: str | tuple[upstream_spec.UpstreamSpec, ...] = option(
        f"localhost:{DEFAULT_UPSTREAM_PORT}",
        "upstreams",
        "upstream HTTP proxies, host[:port] or [v6]:port (port 3128 if missing); "
        "comma-separated, repeatable",
    )
    dial_timeout: float = option(
        180.0, "duration", "bound on reaching an upstream and reading its CONNECT reply"
    )
    sniff_timeout: float = option(
        -1.0, "sniff_timeout", "hostname sniffing: -1 off, 0 means 1s, else a duration"
    )
    sniff_max_bytes: int = option(
        8192, "int", "bytes to read while sniffing for TLS SNI or HTTP Host"
    )
    sniff_ports: tuple[int, ...] = option(
        (), "ports", "comma-separated original ports to sniff (default: all)"
    )
    upstream_policy: str = option(
        "failover",
        "str",
        "failover (the first healthy one in order), round-robin or least-connections",
    )
    upstream_credentials_file: str = option(
        "",
        "str",
        "file with one user:password line for Proxy-Authorization: Basic; a relative name "
        "is looked up under $CREDENTIALS_DIRECTORY (systemd LoadCredential=)",
    )
    upstream_connect_timeout: float = option(
        3.0, "duration", "bound on connecting to one upstream while another could take over"
    )
    upstream_max_fails: int = option(
        1, "int", "consecutive failures (connect, timeout, no reply) that mark an upstream down"
    )
    upstream_probe_interval: float = option(
        5.0, "duration", "longest wait between probes of a down upstream (0.5s first, doubling)"
    )
    upstream_probe_target: str = option(
        "", "str", "probe a down upstream with CONNECT host:port (default: a TCP connect)"
    )
    allow_upstream_ports: bool = option(
        False,
        "bool",
        "tunnel destinations on an upstream's port (refused by default: another address of "
        "the proxy's host would reach the proxy itself)",
    )
    rule: tuple[Rule, ...] = option(
        (),
        "rules",
        "per-destination rule 'dst=CIDR,.. port=P,.. name=N,.. ACTION', ACTION proxy[:GROUP], "
        "direct or reject; repeatable, the first match wins",
    )
    idle_timeout: float = option(
        0.0, "duration", "end tunnels idle this long in both directions (0: never)"
    )
    half_close_timeout: float = option(
        60.0,
        "duration",
        "end tunnels quiet this long after one direction ended and delivered its bytes (0: never)",
    )
    max_connections: int = option(0, "int", "tunnels open at once (0: no cap)")
    max_client_connections: int = option(
        0, "int", "tunnels open at once per client address (0: no cap)"
    )
    drain_timeout: float = option(
        30.0, "duration", "on SIGTERM, time open tunnels get before they are reset"
    )
    workers: int = option(1, "int", "processes sharing the port (SO_REUSEPORT)")
    control_socket: str = option(
        "",
        "str",
        "AF_UNIX socket where the master takes reload/upgrade requests (handyproxy -reload)",
    )
    metrics_address: str = option(
        "",
        "str",
        "serve Prometheus metrics at http://HOST:PORT/metrics (default: off; port 0: any)",
    )
    relay: str = option(
        "splice", "str", "splice (zero-copy, the default) or copy (through user space)"
    )
    log_format: str = option("text", "str", "text or json")
    log_level: str = option("info", "str", "debug, info, warning or error")

    @property
    def sniffing(self) -> bool:
        return self.sniff_timeout >= 0

    @property
    def effective_sniff_timeout(self) -> float:
        """The original treats 0 as "the default of one second", not "no wait"."""
        return 1.0 if self.sniff_timeout == 0 else self.sniff_timeout

    @cached_property
    def upstreams(self) -> tuple[upstream_spec.UpstreamSpec, ...]:
        """The upstream list parsed and its credentials read, once; validate() checks it."""
        if not isinstance(self.upstream_credentials_file, str):
            raise ConfigError("upstream-credentials-file", "expected a file name")
        try:
            specs = upstream_spec.parse_upstreams(self.upstream_proxy)
            return upstream_spec.load(specs, self.upstream_credentials_file)
        except upstream_spec.SpecError as exc:
            raise ConfigError(exc.field, str(exc)) from None

    @cached_property
    def rules(self) -> tuple[Rule, ...]:
        try:
            return parse_rules(self.rule)
        except ValueError as exc:
            raise ConfigError("rule", str(exc)) from None

    def validate(self) -> Config:
        """Raise ConfigError for the first setting that cannot work; return self otherwise."""
        _check_int("local-port", self.local_port, 0, 65535)
        if self.listen_address:
            try:
                ipaddress.ip_address(self.listen_address)
            except ValueError:
                raise ConfigError(
                    "listen-address", f"{self.listen_address!r} is not an IP address"
                ) from None
        _check_seconds("dial-timeout", self.dial_timeout, positive=True)
        self._validate_upstreams()
        _check_seconds("sniff-timeout", self.sniff_timeout, allow_negative=True)
        _check_int("sniff-max-bytes", self.sniff_max_bytes, 1, 1 << 20)
        for port in self.sniff_ports:
            _check_int("sniff-ports", port, 1, 65535)
        _check_seconds("idle-timeout", self.idle_timeout)
        _check_seconds("half-close-timeout", self.half_close_timeout)
        _check_int("max-connections", self.max_connections, 0, 10_000_000)
        _check_int("max-client-connections", self.max_client_connections, 0, 10_000_000)
        _check_seconds("drain-timeout", self.drain_timeout)
        _check_int("workers", self.workers, 1, 256)
        if not isinstance(self.control_socket, str) or len(self.control_socket.encode()) > 107:
            raise ConfigError("control-socket", "expected a path of at most 107 bytes")
        self._validate_metrics_address()
        if self.relay not in RELAYS:
            raise ConfigError("relay", f"must be one of {', '.join(RELAYS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError("log-format", f"must be one of {', '.join(LOG_FORMATS)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log-level", f"must be one of {', '.join(LOG_LEVELS)}")
        self._validate_rules()
        return self

    def _validate_upstreams(self) -> None:
        specs = self.upstreams
        if not any(s.group == upstream_spec.DEFAULT_GROUP for s in specs):
            raise ConfigError(
                "upstream-proxy",
                f"no upstream is in group {upstream_spec.DEFAULT_GROUP!r}: connections that no "
                "rule sends elsewhere would have nowhere to go",
            )
        if self.upstream_policy not in upstream_spec.POLICIES:
            raise ConfigError(
                "upstream-policy", f"must be one of {', '.join(upstream_spec.POLICIES)}"
            )
        _check_seconds("upstream-connect-timeout", self.upstream_connect_timeout, positive=True)
        _check_int("upstream-max-fails", self.upstream_max_fails, 1, 1000)
        _check_seconds("upstream-probe-interval", self.upstream_probe_interval, positive=True)
        if not isinstance(self.upstream_probe_target, str):
            raise ConfigError("upstream-probe-target", "expected host:port")
        if self.upstream_probe_target:
            try:
                split_hostport(self.upstream_probe_target)
            except ValueError as exc:
                raise ConfigError("upstream-probe-target", str(exc)) from None
        if not isinstance(self.allow_upstream_ports, bool):
            raise ConfigError("allow-upstream-ports", "expected true or false")

    def _validate_metrics_address(self) -> None:
        if not isinstance(self.metrics_address, str):
            raise ConfigError("metrics-address", "expected HOST:PORT")
        if self.metrics_address:
            try:
                split_hostport(self.metrics_address, kernel_port=True)
            except ValueError as exc:
                raise ConfigError("metrics-address", str(exc)) from None

    def _validate_rules(self) -> None:
        groups = {s.group for s in self.upstreams}
        for number, rule in enumerate(self.rules, 1):
            if rule.action == "proxy" and rule.group not in groups:
                raise ConfigError("rule", f"rule {number}: no upstream is in group {rule.group!r}")
            if rule.names and not self.sniffing:
                raise ConfigError(
                    "rule", f"rule {number}: name= needs sniffing on (-sniff-timeout 0 or more)"
                )


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(name, f"expected a whole number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(name, f"{value} is out of range {low}-{high}")


def _check_seconds(
    name: str, value: object, *, positive: bool = False, allow_negative: bool = False
) -> None:
    if not isinstance(value, float | int) or isinstance(value, bool) or math.isnan(value):
        raise ConfigError(name, f"expected a duration, got {value!r}")
    if abs(value) > _MAX_DURATION:
        raise ConfigError(name, f"{value!r} is out of range")
    if positive and value <= 0:
        raise ConfigError(name, "must be greater than zero")
    if not allow_negative and value < 0:
        raise ConfigError(name, "must not be negative")


def option_names() -> list[str]:
    """Flag / TOML key names, derived from the dataclass so the two can never drift."""
    return [f.name.replace("_", "-") for f in fields(Config)]


def convert(name: str, value: Any) -> Any:
    """Turn a flag or TOML value into the field's type; ValueError says why it cannot be."""
    return _CONVERTERS[kind(name)](value)


def _to_duration(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    if not isinstance(value, str):
        raise ValueError(f'expected a duration string such as "30s", got {value!r}')
    return parse_duration(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        return int(value)
    raise ValueError(f"expected a whole number, got {value!r}")


def _to_ports(value: Any) -> tuple[int, ...]:
    items = value
    if isinstance(value, str):
        items = [p for p in (x.strip() for x in value.split(",")) if p]
    if not isinstance(items, list | tuple):
        raise ValueError(f"expected a list of ports, got {value!r}")
    ports = []
    for item in items:
        if isinstance(item, bool) or not (
            isinstance(item, int) or (isinstance(item, str) and item.isascii() and item.isdigit())
        ):
            raise ValueError(f"{item!r} is not a port number")
        ports.append(int(item))
    return tuple(ports)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _to_bool(value: Any) -> bool:
    """Go's strconv.ParseBool spellings, and TOML booleans."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in ("1", "t", "T", "true", "TRUE", "True"):
            return True
        if value in ("0", "f", "F", "false", "FALSE", "False"):
            return False
    raise ValueError(f"expected true or false, got {value!r}")


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "duration": _to_duration,
    "sniff_timeout": parse_sniff_timeout,
    "int": _to_int,
    "ports": _to_ports,
    "str": _to_str,
    "bool": _to_bool,
    "upstreams": upstream_spec.parse_upstreams,
    "rules": parse_rules,
}


def kind(name: str) -> str:
    """How a flag or key's value is converted (``int``, ``bool``, ``rules``...)."""
    return {f.name: f for f in fields(Config)}[name.replace("-", "_")].metadata["kind"]


def display(name: str, value: Any) -> str:
    """A value as the user would write it on the command line (for ``-help`` and logs)."""
    how = kind(name)
    if how == "duration":
        return format_duration(value)
    if how == "sniff_timeout":
        return f"{value:g}"
    if how == "bool":
        return "true" if value else "false"
    if how == "upstreams":
        return ",".join(s.name for s in upstream_spec.parse_upstreams(value))
    if how == "rules":
        return "; ".join(str(r) for r in parse_rules(value)) or "none"
    if how == "ports":
        return ",".join(str(p) for p in value) or "all"
    return str(value)


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML config; keys may use dashes or underscores. Raises ConfigError(KEY, why)."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("config", f"cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"not valid TOML: {exc}") from None
    known = set(option_names())
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("_", "-")
        if name not in known:
            raise ConfigError(key, "unknown setting")
        try:
            values[name] = convert(name, value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    return values


def build(values: dict[str, Any]) -> Config:
    """Make and validate a Config from already converted ``{flag-name: value}`` pairs."""
    return Config(**{k.replace("-", "_"): v for k, v in values.items()}).validate()
