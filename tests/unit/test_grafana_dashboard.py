"""docs/grafana-dashboard.json: every PromQL expression in it (panels and template variables)
parses, and every metric it names is one the forwarder really exports, taken from a scrape of
the exporter with a recorder attached."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.scrape import fetch, parse

from handyproxy import config, metrics
from handyproxy.tunnel import Hub
from handyproxy.upstream import UpstreamSet

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
#: Grafana's variables, replaced by what Grafana would put there.
VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$host": ".*", "$instance": ".*"}
SCOPE = ("job", "host", "instance")  # every selector is narrowed by the dashboard's variables

AGGREGATIONS = {"sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "group"}
FUNCTIONS = {"rate", "irate", "increase", "histogram_quantile", "label_values", "clamp_min"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
BINARY = {"+", "-", "*", "/", "%", "^", "==", "!=", ">", "<", ">=", "<=", "and", "or", "unless"}
TOKEN = re.compile(
    r"\s*(?:(?P<duration>\d+(?:ms|[smhdwy]))(?![\w.])|(?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
    r'|(?P<string>"(?:[^"\\]|\\.)*")|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r"|(?P<op>=~|!~|==|!=|>=|<=|[-+*/%^(){}\[\],=<>:]))"
)


class PromQLError(ValueError):
    pass


def tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise PromQLError(f"cannot read {text[pos:]!r}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class Parser:
    """A recursive-descent reader of the PromQL the dashboard uses; ``names`` collects the
    metric names of its selectors. Anything outside that grammar is an error."""

    def __init__(self, text: str) -> None:
        self.toks = tokens(text)
        self.i = 0
        self.names: set[str] = set()
        self.selectors: list[set[str]] = []  # the label names each selector matches on

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        got_kind, got = self.peek()
        if (value is not None and got != value) or (kind is not None and got_kind != kind):
            raise PromQLError(f"expected {value or kind}, got {got!r} at token {self.i}")
        self.i += 1
        return got

    def parse(self) -> set[str]:
        self.expr()
        if self.peek()[0] != "end":
            raise PromQLError(f"unexpected {self.peek()[1]!r}")
        return self.names

    def expr(self) -> None:
        self.unary()
        while self.peek()[1] in BINARY:
            self.take()
            if self.peek()[1] == "bool":
                self.take()
            if self.peek()[1] in ("on", "ignoring"):
                self.take()
                self.labels()
            if self.peek()[1] in ("group_left", "group_right"):
                self.take()
                if self.peek()[1] == "(":
                    self.labels()
            self.unary()

    def unary(self) -> None:
        if self.peek()[1] in ("-", "+"):
            self.take()
        self.primary()

    def primary(self) -> None:
        kind, value = self.peek()
        if kind in ("number", "string"):
            self.take()
        elif value == "(":
            self.take("(")
            self.expr()
            self.take(")")
            self.range()
        elif value == "{":
            self.selector(None)
        elif kind == "ident" and value in AGGREGATIONS:
            self.take()
            self.grouping()
            self.args()
            self.grouping()
        elif kind == "ident" and self.toks[self.i + 1 : self.i + 2] == [("op", "(")]:
            if value not in FUNCTIONS:
                raise PromQLError(f"unknown function {value!r}")
            self.take()
            if value == "label_values":  # Grafana's: a selector, then a label name
                self.take("(")
                self.expr()
                self.take(",")
                self.take(kind="ident")
                self.take(")")
            else:
                self.args()
        elif kind == "ident" and value not in KEYWORDS | BINARY:
            self.selector(self.take())
        else:
            raise PromQLError(f"unexpected {value!r}")

    def grouping(self) -> None:
        if self.peek()[1] in ("by", "without"):
            self.take()
            self.labels()

    def labels(self) -> None:
        self.take("(")
        while self.peek()[1] != ")":
            self.take(kind="ident")
            if self.peek()[1] == ",":
                self.take(",")
        self.take(")")

    def args(self) -> None:
        self.take("(")
        self.expr()
        while self.peek()[1] == ",":
            self.take(",")
            self.expr()
        self.take(")")

    def selector(self, name: str | None) -> None:
        matched: set[str] = set()
        if name is not None:
            self.names.add(name)
        if self.peek()[1] == "{":
            self.take("{")
            while self.peek()[1] != "}":
                matched.add(self.take(kind="ident"))
                if self.take() not in ("=", "!=", "=~", "!~"):
                    raise PromQLError("expected a label matcher")
                self.take(kind="string")
                if self.peek()[1] == ",":
                    self.take(",")
            self.take("}")
        if name is None and "__name__" not in matched:
            raise PromQLError("a selector without a metric name")
        self.selectors.append(matched)
        self.range()

    def range(self) -> None:
        if self.peek()[1] == "[":
            self.take("[")
            self.take(kind="duration")
            if self.peek()[1] == ":":
                self.take(":")
                if self.peek()[0] == "duration":
                    self.take()
            self.take("]")
        if self.peek()[1] == "offset":
            self.take()
            self.take(kind="duration")


def expressions(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, expression) for every query of every panel and template variable."""

    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            yield f"variable {var['name']}", query


def substituted(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name a scrape of the real exporter shows, hooks attached."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RUNTIME_DIRECTORY", str(tmp_path_factory.mktemp("runtime")))
    mp.delenv(metrics.ENV, raising=False)
    cfg = config.build({"metrics-address": "127.0.0.1:0", "upstream-proxy": "127.0.0.1:3128"})
    try:
        metrics.prepare(cfg)
        host, port = metrics.start_exporter(cfg)
        cfg_hub = Hub(config=cfg, listen_ports=set(), upstreams=UpstreamSet.from_config(cfg))
        metrics.attach(cfg_hub)
        return parse(fetch(f"http://{host}:{port}/metrics")).names()
    finally:
        metrics.shutdown()
        mp.undo()


def test_the_parser_rejects_what_is_not_promql() -> None:
    for bad in ["sum(rate(x[5m])", "rate(x[5])", 'x{a="b"', "x +", "sum by (a (x)", "nosuch(x)"]:
        with pytest.raises(PromQLError):
            Parser(bad).parse()
    names = Parser('sum by (le) (rate(a_bucket{job=~"x"}[1m])) / on (i) group_left b').parse()
    assert names == {"a_bucket", "b"}


def test_every_expression_parses_and_names_only_exported_metrics(
    dashboard: dict, exported: set[str]
) -> None:
    seen: set[str] = set()
    for where, expr in expressions(dashboard):
        parser = Parser(substituted(expr))
        try:
            names = parser.parse()
        except PromQLError as exc:
            pytest.fail(f"{where}: {exc}: {expr}")
        assert names, f"{where} names no metric: {expr}"
        unknown = names - exported
        assert not unknown, f"{where} names metrics the forwarder does not export: {unknown}"
        if where.startswith("panel"):
            for matched in parser.selectors:
                assert set(SCOPE) <= matched, f"{where}: a selector not narrowed by {SCOPE}"
        seen |= names
    wanted = {
        "handyproxy_tunnels_open",
        "handyproxy_tunnels_total",
        "handyproxy_bytes_total",
        "handyproxy_connect_duration_seconds_bucket",
        "handyproxy_upstream_up",
        "handyproxy_upstream_failures_total",
        "handyproxy_refused_total",
    }
    assert wanted <= seen, f"the dashboard leaves out {wanted - seen}"


def test_the_dashboard_imports_with_a_data_source_and_per_host_and_instance_variables(
    dashboard: dict,
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "host", "instance"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    assert dashboard["uid"] and dashboard["title"] == "HandyProxy"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
