"""Prometheus metrics, kept current by the sessions' own events rather than by polling.

Every series changes where its fact changes: a session tells ``KeeperMetrics`` about each event
it logs (``Session.watch``), and each event updates a few numbers in memory. A scrape only
renders them. The per-account series (state, COD, counters, silence) are plain numbers rendered
by one collector at scrape time, not prometheus_client's labelled children: those cost about
half a KiB each, and an account had twenty, a sixth of what a whole session costs. How long each
link has been silent is computed at scrape time, as it grows without any event to report it.

Each ``KeeperMetrics`` owns its ``CollectorRegistry``, so several keepers (or tests) in one
process never see each other's series, and nothing lands in prometheus_client's global registry.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__, events
from .cod_guard import guarded_scopes
from .gateway import Gateway
from .session import Session, SessionState

# One JSON-RPC round trip: about a millisecond to a nearby exchange, hundreds across an ocean,
# and request_timeout (5 s by default) ends the slowest. Buckets cover ~1 ms to 10 s.
REQUEST_BUCKETS_S: Final = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0),
)
# Setup is connect + TLS + WebSocket handshake, then five to seven requests (hello, auth, COD
# enable and confirm, once more for scope account, heartbeat): it starts ten times higher.
SETUP_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

SILENCE_NAME: Final = "deribit_keeper_inbound_silence_seconds"
SILENCE_HELP: Final = (
    "Seconds since the last frame arrived on the account's link, measured at scrape time; "
    "absent while there is no link"
)
UNKNOWN_REASON: Final = "unknown"
LINKS_NAME: Final = "deribit_keeper_gateway_links"
LINKS_HELP: Final = "Local links (engine WebSockets) open on the account's gateway now"
# A method name comes from a local client: only Deribit-shaped names become label values, so a
# misbehaving client cannot grow the series without bound (the gateway labels -32601 "other").
_METHOD_LABEL: Final = re.compile(r"(public|private)/[a-z_]{1,64}")
OTHER_METHOD: Final = "other"


class _LinksCollector(Collector):
    """How many local links each gateway has, read when Prometheus scrapes."""

    def __init__(self, gateways: Mapping[str, Gateway]) -> None:
        self._gateways = gateways

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(LINKS_NAME, LINKS_HELP, labels=["account"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(LINKS_NAME, LINKS_HELP, labels=["account"])
        for name, gateway in self._gateways.items():
            family.add_metric([name], len(gateway.links))
        yield family


class _Tally:
    """One account's counters, bumped by its session's events and rendered at scrape time."""

    __slots__ = ("cod_drift", "lost_reason", "reconnects", "refreshes", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.reconnects: dict[str, int] = {}  # by the reason the link was lost
        self.lost_reason = UNKNOWN_REASON  # from session.lost until its session.retry
        self.refreshes = 0
        # counters show 0 before their first event
        self.cod_drift = dict.fromkeys(guarded_scopes(session.account.cancel_on_disconnect), 0)


def _account_families() -> tuple[GaugeMetricFamily | CounterMetricFamily, ...]:
    """The per-account families, empty, in the order they are shown."""
    return (
        GaugeMetricFamily(
            "deribit_keeper_session_ready",
            "1 while the account is ready: authenticated, COD confirmed, heartbeat set",
            labels=["account"],
        ),
        GaugeMetricFamily(
            "deribit_keeper_session_state",
            "1 for the state the account's session is in, 0 for the others",
            labels=["account", "state"],
        ),
        GaugeMetricFamily(
            "deribit_keeper_cod_enabled",
            "1 while Cancel-On-Disconnect is confirmed on the account's live link",
            labels=["account", "scope"],
        ),
        CounterMetricFamily(
            "deribit_keeper_reconnects",
            "Links lost and retried, by the reason the link was lost",
            labels=["account", "reason"],
        ),
        CounterMetricFamily(
            "deribit_keeper_test_requests_answered",
            "Heartbeat test_requests answered with public/test",
            labels=["account"],
        ),
        CounterMetricFamily(
            "deribit_keeper_cod_drift",
            "Times COD was found off behind the keeper's back (session.cod_drift), by scope",
            labels=["account", "scope"],
        ),
        CounterMetricFamily(
            "deribit_keeper_token_refreshes",
            "Access tokens renewed on a live link (refresh_token, or a fresh auth if refused)",
            labels=["account"],
        ),
        CounterMetricFamily(
            "deribit_keeper_token_refresh_failures",
            "Token refreshes on a live link that did not renew with refresh_token: refused "
            "(a fresh auth follows), or failed and ended the link",
            labels=["account"],
        ),
        GaugeMetricFamily(
            "deribit_keeper_heartbeat_interval_seconds",
            "The account's configured heartbeat_interval: Deribit's test_request period, and "
            "the scale of the dead-link rule",
            labels=["account"],
        ),
        GaugeMetricFamily(SILENCE_NAME, SILENCE_HELP, labels=["account"]),
    )


class _AccountsCollector(Collector):
    """Every per-account series, read from the tallies and the sessions when Prometheus
    scrapes."""

    def __init__(self, tallies: Mapping[str, _Tally]) -> None:
        self._tallies = tallies

    def describe(self) -> Iterator[Metric]:
        # Naming the families up front lets the registry refuse a duplicate at registration,
        # without calling collect() (which needs a running Trio loop).
        yield from _account_families()

    def collect(self) -> Iterator[Metric]:
        families = _account_families()
        ready, state, cod, reconnects, tests, drift, refreshes, failures, interval, silence = (
            families
        )
        # Only a live link needs the clock (and a Trio loop: a scrape may come from outside).
        now = trio.current_time() if any(t.session.rpc for t in self._tallies.values()) else 0.0
        for name, tally in self._tallies.items():
            session = tally.session
            is_ready = 1 if session.state is SessionState.READY else 0
            ready.add_metric([name], is_ready)
            for each in SessionState:
                state.add_metric([name, each.value], 1 if each is session.state else 0)
            cod.add_metric([name, session.account.cancel_on_disconnect], is_ready)
            for reason, count in tally.reconnects.items():
                reconnects.add_metric([name, reason], count)
            tests.add_metric([name], session.test_requests_answered)
            for scope, count in tally.cod_drift.items():
                drift.add_metric([name, scope], count)
            refreshes.add_metric([name], tally.refreshes)
            failures.add_metric([name], session.token_refresh_failures)
            interval.add_metric([name], session.account.heartbeat_interval)
            if session.rpc is not None:
                silence.add_metric([name], max(0.0, now - session.rpc.last_inbound))
        yield from families


class _WithoutCreated(Collector):
    """The registry minus prometheus_client's ``*_created`` series.

    In the Prometheus text format each counter and histogram would carry a second gauge family
    holding its creation time: twice the series for nothing an alert or a rate() needs.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():  # fresh Metric objects on every call
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class KeeperMetrics:
    """The keeper's Prometheus series, fed by session events and by every answered request.

    Args:
        registry: where the series live; a fresh ``CollectorRegistry`` by default. Sharing one
            between two ``KeeperMetrics`` fails with prometheus_client's duplicate-name error.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._tallies: dict[str, _Tally] = {}
        r = self.registry
        r.register(_AccountsCollector(self._tallies))
        self._requests = Histogram(
            "deribit_keeper_request_duration_seconds",
            "Time from sending a JSON-RPC request to its answer, by method",
            ["method"],
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        # Each method's series, as ``labels()`` gives it only after a lock and a validation:
        # on_request runs for every test_request answered. The keeper's own methods: a few.
        self._request_series: dict[str, Histogram] = {}
        self._setup = Histogram(
            "deribit_keeper_session_setup_duration_seconds",
            "Time from starting to connect to ready (COD confirmed, heartbeat set)",
            buckets=SETUP_BUCKETS_S,
            registry=r,
        )
        Info("deribit_keeper_build", "The running keeper's version", registry=r).info(
            {"version": __version__}
        )
        self._gateways: dict[str, Gateway] = {}
        self._relayed_labels: dict[str, set[tuple[str, str]]] = {}  # for forget_gateway()
        self._relayed = Counter(
            "deribit_keeper_gateway_requests",
            "Requests of local clients relayed to Deribit, by method and outcome "
            "(result, error: Deribit's answer; unavailable: 13028, not sent)",
            ["account", "method", "outcome"],
            registry=r,
        )
        self._relay_latency = Histogram(
            "deribit_keeper_gateway_relay_duration_seconds",
            "Time from relaying a local client's request upstream to Deribit's answer",
            ["account"],
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        self._unavailable = Counter(
            "deribit_keeper_gateway_unavailable",
            "Local requests answered 13028 temporarily_unavailable: the upstream was not ready",
            ["account"],
            registry=r,
        )
        self._cod_fired = Counter(
            "deribit_keeper_gateway_cod_fired",
            "Local links that died with local COD on and open orders",
            ["account"],
            registry=r,
        )
        self._cod_cancelled = Counter(
            "deribit_keeper_gateway_cod_cancelled_orders",
            "Orders cancelled by local COD when the local link that created them died",
            ["account"],
            registry=r,
        )
        r.register(_LinksCollector(self._gateways))
        # process_* (CPU, memory, open fds): what an operator expects of any exporter. Read from
        # /proc at scrape time, about the process only; nothing about the sessions.
        ProcessCollector(registry=r)
        self._exposed = _WithoutCreated(r)

    def track(self, session: Session) -> None:
        """Show ``session``'s series from now on, and keep them current from its events.

        A session tracked again is ignored. A new Session under a tracked name (an account a
        reload changed) replaces the old one, whose series start again as after a restart.
        """
        name = session.account.name
        tally = self._tallies.get(name)
        if tally is not None and tally.session is session:
            return
        self._tallies[name] = _Tally(session)
        session.watch(self._observe)

    def forget(self, account: str) -> None:
        """Remove every series labelled with ``account``, as when a reload removes the account.

        Events its session still emits while it ends are ignored from now on.
        """
        self._tallies.pop(account, None)

    def track_gateway(self, gateway: Gateway) -> None:
        """Show ``gateway``'s series from now on (a new one under a name replaces the old)."""
        name = gateway.account
        self.forget_gateway(name)
        self._gateways[name] = gateway
        self._relayed_labels[name] = set()
        for counter in (self._unavailable, self._cod_fired, self._cod_cancelled):
            counter.labels(name)
        gateway.watch(self._observe_gateway)

    def forget_gateway(self, account: str) -> None:
        """Remove the series of ``account``'s gateway (its gateway block was removed)."""
        if self._gateways.pop(account, None) is None:
            return
        for counter in (self._unavailable, self._cod_fired, self._cod_cancelled):
            counter.remove(account)
        self._relay_latency.remove(account)
        for method, outcome in self._relayed_labels.pop(account, set()):
            self._relayed.remove(account, method, outcome)

    def on_relayed(self, account: str, method: str, outcome: str, seconds: float | None) -> None:
        """Record one local request relayed (``seconds`` to its answer) or refused (None)."""
        if account not in self._gateways:
            return
        label = method if _METHOD_LABEL.fullmatch(method) else OTHER_METHOD
        self._relayed_labels[account].add((label, outcome))
        self._relayed.labels(account, label, outcome).inc()
        if seconds is None:
            self._unavailable.labels(account).inc()
        else:
            self._relay_latency.labels(account).observe(seconds)

    def _observe_gateway(self, gateway: Gateway, event: str, fields: Mapping[str, Any]) -> None:
        if self._gateways.get(gateway.account) is not gateway or event != events.GATEWAY_COD_FIRED:
            return
        self._cod_fired.labels(gateway.account).inc()
        self._cod_cancelled.labels(gateway.account).inc(int(fields.get("cancelled", 0)))

    def on_request(self, method: str, seconds: float) -> None:
        """Record one answered request; the hook the Keeper passes to every Session."""
        series = self._request_series.get(method)
        if series is None:
            series = self._request_series[method] = self._requests.labels(method)
        series.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type. Call it from the Trio loop."""
        return generate_latest(self._exposed), CONTENT_TYPE_LATEST

    def _observe(self, session: Session, event: str, fields: Mapping[str, Any]) -> None:
        tally = self._tallies.get(session.account.name)
        if tally is None or tally.session is not session:
            return  # forgotten or replaced: its last events must not bring its series back
        if event == events.SESSION_LOST:
            tally.lost_reason = str(fields.get("reason", UNKNOWN_REASON))
        elif event == events.SESSION_RETRY:
            # Counted at the retry, not the loss: a link lost while stopping is not reconnected,
            # and so the counter's sum matches the session's own ``reconnects``.
            reason, tally.lost_reason = tally.lost_reason, UNKNOWN_REASON
            tally.reconnects[reason] = tally.reconnects.get(reason, 0) + 1
        elif event == events.SESSION_READY and "setup_ms" in fields:
            # Ready again after a COD repair carries no setup_ms: that link was set up before.
            self._setup.observe(float(fields["setup_ms"]) / 1000)
        elif event == events.SESSION_COD_DRIFT:
            scope = str(fields.get("scope", UNKNOWN_REASON))
            tally.cod_drift[scope] = tally.cod_drift.get(scope, 0) + 1
        elif event == events.SESSION_TOKEN_REFRESHED:
            tally.refreshes += 1
