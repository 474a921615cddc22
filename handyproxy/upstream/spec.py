"""What the configuration says about upstreams: their addresses, groups and credentials.

Parsing is pure and runs once, when the Config is built; reading a credentials file is the only
I/O, and it happens in ``Config.validate()`` so a bad file stops the start (or a reload) before
anything changes. Error messages name the setting and the file, never the secret.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from handyproxy.address import authority, split_hostport, valid_hostname
from handyproxy.connect import basic_authorization

DEFAULT_PORT = 3128
DEFAULT_GROUP = "default"
POLICIES = ("failover", "round-robin", "least-connections")
#: Keys of one ``[[upstream-proxy]]`` table in TOML (dashes or underscores).
TABLE_KEYS = ("address", "group", "credentials-file")
#: A credentials file holds one short line; anything longer is not one.
MAX_CREDENTIALS_BYTES = 4096


class SpecError(ValueError):
    """An upstream entry is unusable; the message says which entry and why, never a secret.

    ``field`` is the setting at fault: ``upstream-proxy`` unless the global credentials file is.
    """

    def __init__(self, reason: str, field: str = "upstream-proxy") -> None:
        super().__init__(reason)
        self.field = field


class Credentials:
    """A user and password for ``Proxy-Authorization: Basic``.

    Only the ready header value is kept, and ``repr`` hides it, so a Config or an Upstream can be
    printed or logged without the secret.
    """

    __slots__ = ("authorization", "source", "user")

    def __init__(self, user: str, password: str, source: str) -> None:
        self.user = user
        self.source = source
        self.authorization = basic_authorization(user, password)

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, source={self.source!r}, password=<hidden>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credentials) and other.authorization == self.authorization

    def __hash__(self) -> int:
        return hash(self.authorization)


@dataclass(frozen=True)
class UpstreamSpec:
    """One upstream proxy as configured.

    ``credentials_file`` is None when the entry does not say (the global
    ``-upstream-credentials-file`` applies) and ``""`` when it asks for none.
    ``credentials`` is filled in by ``load``.
    """

    host: str
    port: int
    group: str = DEFAULT_GROUP
    credentials_file: str | None = None
    credentials: Credentials | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """``host:port`` as written in logs, the access record and metrics labels."""
        return authority(self.host, self.port)


def parse_address(text: str) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` of an upstream; a missing port means 3128."""
    if "@" in text:
        raise SpecError(
            f"{text!r}: credentials do not belong in the address (every user can read a "
            "command line); use -upstream-credentials-file"
        )
    try:
        return split_hostport(text, DEFAULT_PORT)
    except ValueError as exc:
        raise SpecError(str(exc)) from None


def parse_upstreams(value: Any) -> tuple[UpstreamSpec, ...]:
    """Every accepted spelling of ``upstream-proxy`` as a tuple of specs.

    A string is a comma-separated list (the flag, or a TOML string); a list holds strings
    (each again a comma list) and, from TOML, tables with the keys in TABLE_KEYS. Specs already
    parsed pass through, so parsing twice is harmless.
    """
    items: list[Any]
    if isinstance(value, str | Mapping | UpstreamSpec):
        items = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise SpecError(f"expected host:port, a list of them or tables, got {value!r}")
    specs: list[UpstreamSpec] = []
    for item in items:
        if isinstance(item, UpstreamSpec):
            specs.append(item)
        elif isinstance(item, str):
            parts = [p.strip() for p in item.split(",")]
            if not any(parts):
                raise SpecError("empty address")
            for part in parts:
                if not part:
                    raise SpecError(f"empty entry in {item!r}")
                specs.append(UpstreamSpec(*parse_address(part)))
        elif isinstance(item, Mapping):
            specs.append(_parse_table(item, len(specs) + 1))
        else:
            raise SpecError(f"expected host:port or a table, got {item!r}")
    if not specs:
        raise SpecError("at least one upstream proxy is needed")
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise SpecError(f"{spec.name} is listed twice")
        seen.add(spec.name)
    return tuple(specs)


def _parse_table(table: Mapping[str, Any], number: int) -> UpstreamSpec:
    where = f"entry {number}"
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = str(key).replace("_", "-")
        if name not in TABLE_KEYS:
            raise SpecError(f"{where}: unknown key {key!r} (known: {', '.join(TABLE_KEYS)})")
        if not isinstance(value, str):
            raise SpecError(f"{where}: {key} must be a string, got {value!r}")
        values[name] = value
    if "address" not in values:
        raise SpecError(f"{where}: address is missing")
    host, port = parse_address(values["address"])
    group = values.get("group", DEFAULT_GROUP)
    if not valid_group(group):
        raise SpecError(f"{where}: group {group!r} is not a name (letters, digits, - and _)")
    return UpstreamSpec(host, port, group, values.get("credentials-file"))


def valid_group(name: str) -> bool:
    """Group names share the host label syntax (they end up in logs and metrics labels)."""
    return bool(name) and "." not in name and valid_hostname(name)


def credentials_path(name: str) -> str:
    """Where a credentials file is: a relative name lies under ``$CREDENTIALS_DIRECTORY``.

    systemd's ``LoadCredential=NAME:/root-only/file`` hands the service a private copy as
    ``$CREDENTIALS_DIRECTORY/NAME``, so a unit can say ``-upstream-credentials-file NAME``
    and no secret needs to be readable on disk by the service user.
    """
    base = os.environ.get("CREDENTIALS_DIRECTORY")
    if base and not os.path.isabs(name):
        return os.path.join(base, name)
    return name


def load_credentials(name: str) -> Credentials:
    """Read one ``user:password`` line; SpecError names the file and the problem, not the line."""
    path = credentials_path(name)
    try:
        # O_NONBLOCK: a FIFO or device given by mistake must fail, not hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.ENOENT and not os.path.isabs(name):
            hint = " (a relative name is looked up under $CREDENTIALS_DIRECTORY when set)"
        shown = path if path.isprintable() else repr(path)  # one line, whatever the name holds
        raise SpecError(f"{shown}: cannot read: {exc.strerror}{hint}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError(f"{path}: not a regular file")
        raw = os.read(fd, MAX_CREDENTIALS_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CREDENTIALS_BYTES:
        raise SpecError(f"{path}: larger than {MAX_CREDENTIALS_BYTES} bytes; expected one line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        found = "no line" if not lines else f"{len(lines)} lines"
        raise SpecError(f"{path}: expected one line user:password, found {found}")
    user, colon, password = lines[0].partition(":")
    if not colon:
        raise SpecError(f"{path}: expected user:password, the line has no ':'")
    if not user:
        raise SpecError(f"{path}: the user name before ':' is empty")
    if not password:
        raise SpecError(f"{path}: the password after ':' is empty")
    for what, part in (("user name", user), ("password", password)):
        if not part.isprintable():
            raise SpecError(f"{path}: the {what} holds a control character")
    return Credentials(user, password, path)


def load(specs: tuple[UpstreamSpec, ...], default_file: str) -> tuple[UpstreamSpec, ...]:
    """The specs with their credentials read (each file once, however many entries share it)."""
    cache: dict[str, Credentials] = {}
    loaded = []
    for spec in specs:
        name = default_file if spec.credentials_file is None else spec.credentials_file
        if not name:
            loaded.append(replace(spec, credentials=None))
            continue
        if name not in cache:
            try:
                cache[name] = load_credentials(name)
            except SpecError as exc:
                if spec.credentials_file is None:
                    raise SpecError(str(exc), "upstream-credentials-file") from None
                raise SpecError(f"{spec.name}: credentials-file: {exc}") from None
        loaded.append(replace(spec, credentials=cache[name]))
    return tuple(loaded)
