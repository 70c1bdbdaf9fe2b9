"""Prometheus exposition of the fleet, computed from the store when scraped.

A custom collector is pulled on every scrape; nothing is kept between scrapes but the
ingest counters the :class:`FleetServer` already keeps. Label values come only from
bounded sets — registered variant names, the ``Reason`` enum, rollout ``Status`` and
``RolloutPhase`` — so a fleet of any size yields the same number of series. A device id
is never a label: a name a device reports that is not a registered variant is counted
under ``variant="other"``.

Two kinds of per-variant figures:

* ``*_total`` counters (requests, errors, labelled and correct answers, switches, energy,
  batches dropped) are sums over all telemetry stored, kept in memory
  (:class:`StoredTotals`): built from the store at the first scrape, then each scrape adds
  only the rows stored since the last one (by their ids), whichever server replica wrote
  them. A scrape costs the rows new since the last scrape, not the whole store; pruning
  old telemetry does not lower them (a restart rebuilds them from what the store still
  holds, a counter reset that ``rate()``/``increase()`` handle as usual).
* Latency and served accuracy are gauges over the last ``window_s`` seconds of telemetry
  (by ``interval_end``, in buckets of ``BUCKET_S`` kept in memory the same way). Devices
  report p50/p95/p99 per interval, and percentiles do not add up: the fleet figure is the
  request-weighted mean of the batch percentiles, an approximation that is exact when
  every batch has the same distribution and otherwise lies between the smallest and
  largest batch percentile.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Integer, case, cast, func, select

from prunefleet.shared.messages import Reason, RolloutPhase

from .errors import StoreError
from .fleet import IngestCounters
from .rollout import Status
from .store import (
    Device,
    DeviceRolloutReport,
    RolloutRow,
    Store,
    Switch,
    Telemetry,
    VariantRow,
    VariantUsage,
)

__all__ = ["CONTENT_TYPE", "DEVICE_COUNTERS", "FleetCollector", "MetricsOptions",
           "StoredTotals", "make_registry", "render"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"  # a variant name a device reported that is not registered
QUANTILES = (("0.5", VariantUsage.latency_ms_p50), ("0.95", VariantUsage.latency_ms_p95),
             ("0.99", VariantUsage.latency_ms_p99))
# The keys of ReportedState.counters the agent sends; any other key a device sends is
# ignored here (it is still shown per device by the API and the dashboard).
DEVICE_COUNTERS = ("invalid_messages", "rejected_manifests", "install_failures",
                   "rejected_chunks", "inbound_dropped", "telemetry_dropped",
                   # subscriptions the broker refused (the agent asks again, backing off)
                   "subscribe_refused",
                   # installed variants whose session could not be made again (retried
                   # at most once a minute; requests get the nearest loaded one)
                   "load_failures",
                   # the agent's telemetry queue: batches held (not yet confirmed stored),
                   # sent and awaiting the server's cursor, sent again after the timeout
                   "telemetry_queued", "telemetry_unconfirmed", "telemetry_resent")


@dataclass(frozen=True)
class MetricsOptions:
    window_s: float = 300.0  # latency and accuracy gauges cover this much telemetry


# The latency and accuracy gauges sum the last window_s of telemetry from buckets this long
# (by interval_end), kept in memory: the window's edge is exact to a bucket.
BUCKET_S = 10.0
# Distinct variant names kept apart in the totals; names past this many (devices may report
# any name) are summed under OTHER, so the totals stay bounded whatever devices send.
MAX_TOTAL_NAMES = 1000


@dataclass
class StoredTotals:
    """Sums over every telemetry row stored, brought up to date by :meth:`refresh`.

    Each table's rows are read once: a refresh sums the rows whose id is above the highest
    id it summed before (ids only grow). A row whose transaction commits after a refresh
    that saw a higher id (concurrent writers on PostgreSQL) is not counted until the next
    rebuild.
    """

    telemetry_id: int = 0
    usage_id: int = 0
    switch_id: int = 0
    # variant name -> [requests, errors, labeled, correct]
    usage: dict[str, list[int]] = field(default_factory=dict)
    switches: dict[str, int] = field(default_factory=dict)  # reason -> switches
    energy_j: float = 0.0
    batches_dropped: int = 0
    switches_dropped: int = 0
    batches: int = 0
    # bucket of interval_end -> variant -> [labeled, correct, latency x requests per
    # quantile…, requests with that quantile…] (the rows with requests only)
    recent: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def window(self) -> list[tuple[str, list[float]]]:
        """Per variant, the sums over the buckets kept (see :meth:`refresh`)."""
        out: dict[str, list[float]] = {}
        with self._lock:
            for per_variant in self.recent.values():
                for name, vals in per_variant.items():
                    acc = out.setdefault(name, [0.0] * len(vals))
                    for i, x in enumerate(vals):
                        acc[i] += x
        return sorted(out.items())

    def refresh(self, store: Store, since: float, until: float | None = None) -> None:
        """Add the rows stored since the last refresh; keep the window from ``since``.

        A variant name that is not registered is summed under ``other`` (a device may send
        any name: a thousand made-up ones would otherwise fill the names kept and push a
        later-registered variant's figures under ``other``). Rows whose interval ends
        after ``until`` (dated ahead by a device's clock, or by a device) never enter the
        window: each would keep a bucket in memory that no window reaches again."""
        bucket = cast(Telemetry.interval_end / BUCKET_S, Integer)
        until = math.inf if until is None else until
        weighted = [func.sum(col * VariantUsage.requests) for _, col in QUANTILES]
        weights = [func.sum(case((col.is_not(None), VariantUsage.requests), else_=0))
                   for _, col in QUANTILES]
        with self._lock, store.session() as s:
            registered = set(s.scalars(select(VariantRow.name)))
            t = s.execute(
                select(func.max(Telemetry.id), func.sum(Telemetry.energy_j),
                       func.sum(Telemetry.batches_dropped),
                       func.sum(Telemetry.switches_dropped), func.count(Telemetry.id))
                .where(Telemetry.id > self.telemetry_id)).one()
            u_max = s.scalar(select(func.max(VariantUsage.id))
                             .where(VariantUsage.id > self.usage_id))
            usage = [] if u_max is None else s.execute(
                select(VariantUsage.variant, func.sum(VariantUsage.requests),
                       func.sum(VariantUsage.errors), func.sum(VariantUsage.labeled),
                       func.sum(VariantUsage.correct))
                .where(VariantUsage.id > self.usage_id, VariantUsage.id <= u_max)
                .group_by(VariantUsage.variant)).all()
            recent = [] if u_max is None else s.execute(
                select(VariantUsage.variant, bucket, func.sum(VariantUsage.labeled),
                       func.sum(VariantUsage.correct), *weighted, *weights)
                .join(Telemetry, Telemetry.id == VariantUsage.telemetry_id)
                .where(VariantUsage.id > self.usage_id, VariantUsage.id <= u_max,
                       Telemetry.interval_end >= since, VariantUsage.requests > 0,
                       Telemetry.interval_end < until)
                .group_by(VariantUsage.variant, bucket)).all()
            sw_max = s.scalar(select(func.max(Switch.id)).where(Switch.id > self.switch_id))
            switches = [] if sw_max is None else s.execute(
                select(Switch.reason, func.count(Switch.id))
                .where(Switch.id > self.switch_id, Switch.id <= sw_max)
                .group_by(Switch.reason)).all()
        t_max, energy, b_dropped, s_dropped, n = t
        if t_max is not None:
            self.telemetry_id = int(t_max)
            self.energy_j += float(energy or 0)
            self.batches_dropped += int(b_dropped or 0)
            self.switches_dropped += int(s_dropped or 0)
            self.batches += int(n or 0)
        if u_max is not None:
            self.usage_id = int(u_max)
            for name, *vals in usage:
                key = name if name in registered and (
                    name in self.usage or len(self.usage) < MAX_TOTAL_NAMES) else OTHER
                acc = self.usage.setdefault(key, [0, 0, 0, 0])
                for i, x in enumerate(vals):
                    acc[i] += int(x or 0)
            for name, b, *figures in recent:
                per_variant = self.recent.setdefault(int(b), {})
                key = name if name in registered and (
                    name in per_variant or len(per_variant) < MAX_TOTAL_NAMES) else OTHER
                window = per_variant.setdefault(key, [0.0] * len(figures))
                for i, y in enumerate(figures):
                    window[i] += float(y or 0)
        first = int(since // BUCKET_S)
        for b in [b for b in self.recent if b < first]:
            del self.recent[b]
        if sw_max is not None:
            self.switch_id = int(sw_max)
            for reason, k in switches:
                self.switches[reason] = self.switches.get(reason, 0) + int(k)


class FleetCollector(Collector):
    """Fleet and variant aggregates from ``store``, read on each ``collect()``."""

    def __init__(self, store: Store, counters: Callable[[], IngestCounters],
                 broker_connected: Callable[[], bool] | None = None,
                 options: MetricsOptions | None = None,
                 clock: Callable[[], float] = time.time, prime: bool = False,
                 http_refused: Callable[[], dict[int, int]] | None = None,
                 controller: Callable[[], tuple[bool, int, int]] | None = None):
        """``controller``: whether this replica holds the rollout controller lease, how
        many of its steps the lease's fence refused, and how many desired states it
        published again because a device reported an older one. ``prime``: read the stored telemetry
        into the totals now, on a thread of its own, so that the first scrape after a
        server start does not pay for the whole store."""
        self.store = store
        self.counters = counters
        self.broker_connected = broker_connected
        self.options = options or MetricsOptions()
        self.clock = clock
        self.http_refused = http_refused
        self.controller = controller
        self.totals = StoredTotals()
        if prime:
            threading.Thread(target=self._prime, name="metrics-prime", daemon=True).start()

    def _prime(self) -> None:
        try:
            now = self.clock()
            self.totals.refresh(self.store, now - self.options.window_s, now + BUCKET_S)
        except StoreError as e:
            log.warning("metrics: totals not read at start (the first scrape will): %s", e)

    def describe(self) -> list[Metric]:
        return []  # collected on scrape only; describing would query the store at register

    def collect(self) -> Iterator[Metric]:
        yield from self._ingest()
        if self.broker_connected is not None:
            g = GaugeMetricFamily("prunefleet_broker_connected",
                                  "1 while this server is connected to the MQTT broker")
            g.add_metric([], 1.0 if self.broker_connected() else 0.0)
            yield g
        if self.http_refused is not None:
            r = CounterMetricFamily(
                "prunefleet_http_requests_refused",
                "HTTP requests the API refused before routing them (401 no token, 400 bad "
                "length, 413 body over the route's cap), by status", labels=["status"])
            refused = {400: 0, 401: 0, 413: 0, **self.http_refused()}  # zeros included
            for status, n in sorted(refused.items()):
                r.add_metric([str(status)], float(n))
            yield r
        if self.controller is not None:
            held, fenced, republished = self.controller()
            g = GaugeMetricFamily("prunefleet_rollout_controller_lease_held",
                                  "1 when this replica holds the rollout controller lease")
            g.add_metric([], 1.0 if held else 0.0)
            yield g
            f = CounterMetricFamily(
                "prunefleet_rollout_steps_fenced",
                "rollout steps the store refused because this replica had lost the lease "
                "while it ran one (it stalled past the lease's expiry): nothing was written")
            f.add_metric([], float(fenced))
            yield f
            r = CounterMetricFamily(
                "prunefleet_desired_states_republished",
                "desired states published again, as stored, because an online device "
                "reported an older version than the newest (a stale retained state: a "
                "replica that stalled between saving and publishing, or died there)")
            r.add_metric([], float(republished))
            yield r
        g = GaugeMetricFamily(
            "prunefleet_version_claims_ignored",
            "devices claiming a manifest version above the one this server drew last, whose "
            "claims did not count (no valid version certificate, and past the fleet's median "
            "claim or version_claims = certified): lying devices, agents of an earlier "
            "release, or certificates of a retired key")
        g.add_metric([], float(self.store.version_claims_ignored))
        yield g
        up = GaugeMetricFamily("prunefleet_store_up",
                               "1 when the store answered this scrape's queries")
        try:
            families = list(self._from_store())
        except StoreError as e:
            log.error("metrics: store unavailable: %s", e)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    # -- families -------------------------------------------------------------------------
    def _ingest(self) -> Iterator[Metric]:
        c = self.counters()
        for name, value, doc in (
            ("prunefleet_telemetry_batches_ingested", c.telemetry,
             "telemetry batches stored by this server process"),
            ("prunefleet_telemetry_duplicates_dropped", c.duplicates,
             "telemetry batches dropped as already stored (same device and seq)"),
            ("prunefleet_messages_invalid_dropped", c.invalid,
             "device messages dropped because they did not validate"),
            ("prunefleet_reported_states_ingested", c.reported,
             "reported states stored by this server process"),
            ("prunefleet_events_ingested", c.events,
             "device events stored by this server process"),
            ("prunefleet_events_duplicates_dropped", c.event_duplicates,
             "device events dropped as already stored (another delivery of the same event)"),
            ("prunefleet_rollout_reports_unoffered_dropped", c.unoffered_reports,
             "rollout reports about a manifest never issued to the reporting device"),
            ("prunefleet_telemetry_ingest_transactions", c.transactions,
             "telemetry write transactions (one per group of messages)"),
            ("prunefleet_telemetry_acks_published", c.acks_published,
             "'stored through' cursors published to devices after commit"),
            ("prunefleet_ingest_inbound_waits", c.inbound_waits,
             "times reading from the broker paused for room in the inbound queue "
             "(back-pressure; nothing dropped)"),
        ):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], float(value))
            yield m
        m = CounterMetricFamily("prunefleet_ingest_dropped",
                                "device messages this server dropped, by reason",
                                labels=["reason"])
        for reason, n in c.dropped.items():
            m.add_metric([reason], float(n))
        yield m
        g = GaugeMetricFamily("prunefleet_ingest_unwritten",
                              "reported states and events the store refused, held by this "
                              "server to be written again (past 10,000 the oldest is "
                              "dropped as store_error)")
        g.add_metric([], float(c.unwritten))
        yield g
        g = GaugeMetricFamily("prunefleet_ingest_queue_depth",
                              "messages received and not yet stored and acknowledged")
        g.add_metric([], float(c.queue_depth))
        yield g
        h = HistogramMetricFamily(
            "prunefleet_telemetry_ingest_lag_seconds",
            "seconds from the end of a batch's interval (device clock) to its commit")
        h.add_metric([], [(le, float(n)) for le, n in c.lag.cumulative()], c.lag.sum)
        yield h

    def _from_store(self) -> Iterator[Metric]:
        now = self.clock()
        since = now - self.options.window_s
        totals = self.totals
        totals.refresh(self.store, since, now + BUCKET_S)
        with self.store.session() as s:
            known = sorted(set(s.scalars(select(VariantRow.name))))
            names = set(known)

            def v(name: str | None) -> str:
                return name if name in names else OTHER

            devices = s.execute(
                select(Device.online, Device.active_variant, func.count())
                .group_by(Device.online, Device.active_variant)
            ).all()
            rollouts = s.execute(
                select(RolloutRow.status, func.count(RolloutRow.id)).group_by(RolloutRow.status)
            ).all()
            phases = s.execute(
                select(DeviceRolloutReport.phase, func.count())
                .group_by(DeviceRolloutReport.phase)
            ).all()
            reported = list(s.scalars(select(Device.counters)))

        # Devices.
        total = sum(n for _, _, n in devices)
        online = sum(n for up, _, n in devices if up)
        g = GaugeMetricFamily("prunefleet_devices", "devices the server knows")
        g.add_metric([], float(total))
        yield g
        g = GaugeMetricFamily("prunefleet_devices_online", "devices currently online")
        g.add_metric([], float(online))
        yield g
        per_variant = dict.fromkeys(known, 0)
        for _, active, n in devices:
            if active is not None:
                per_variant[v(active)] = per_variant.get(v(active), 0) + n
        g = GaugeMetricFamily("prunefleet_devices_active_variant",
                              "devices by the variant they last reported serving",
                              labels=["variant"])
        for name, n in sorted(per_variant.items()):
            g.add_metric([name], float(n))
        yield g
        g = GaugeMetricFamily("prunefleet_variants_registered", "variant names registered")
        g.add_metric([], float(len(known)))
        yield g

        # Requests, errors, accuracy counters per variant (all stored telemetry).
        sums: dict[str, list[int]] = {name: [0, 0, 0, 0] for name in known}
        for name, vals in totals.usage.items():
            acc = sums.setdefault(v(name), [0, 0, 0, 0])
            for i, x in enumerate(vals):
                acc[i] += int(x or 0)
        for i, (metric, doc) in enumerate((
            ("prunefleet_variant_requests", "requests served, from stored telemetry"),
            ("prunefleet_variant_errors", "requests that failed, from stored telemetry"),
            ("prunefleet_variant_labeled_requests",
             "requests whose true label was known, from stored telemetry"),
            ("prunefleet_variant_correct_requests",
             "labelled requests answered correctly, from stored telemetry"),
        )):
            c = CounterMetricFamily(metric, doc, labels=["variant"])
            for name in sorted(sums):
                c.add_metric([name], float(sums[name][i]))
            yield c

        # Recent accuracy and latency (the last window_s seconds).
        acc_g = GaugeMetricFamily(
            "prunefleet_variant_accuracy_ratio",
            f"served accuracy over the last {self.options.window_s:g} s of labelled requests",
            labels=["variant"])
        lat_g = GaugeMetricFamily(
            "prunefleet_variant_latency_seconds",
            f"request-weighted mean of the devices' batch latency percentiles over the last "
            f"{self.options.window_s:g} s (an approximation of the fleet percentile)",
            labels=["variant", "quantile"])
        merged: dict[str, list[float]] = {}
        nq = len(QUANTILES)
        for name, (lab, cor, *rest) in totals.window():
            m = merged.setdefault(v(name), [0.0] * (2 + 2 * nq))
            m[0] += lab
            m[1] += cor
            for i, w in enumerate(rest):
                m[2 + i] += w
        for name in sorted(merged):
            m = merged[name]
            if m[0] > 0:
                acc_g.add_metric([name], m[1] / m[0])
            for i, (q, _) in enumerate(QUANTILES):
                weight = m[2 + nq + i]
                if weight > 0:
                    lat_g.add_metric([name, q], m[2 + i] / weight / 1000.0)
        yield acc_g
        yield lat_g

        # Switches per reason: every reason code, zero included, for stable series.
        per_reason = dict.fromkeys((r.value for r in Reason), 0)
        for reason, n in totals.switches.items():
            key = reason if reason in per_reason else OTHER
            per_reason[key] = per_reason.get(key, 0) + int(n)
        c = CounterMetricFamily("prunefleet_switches", "variant switches on devices, by reason",
                                labels=["reason"])
        for reason, n in per_reason.items():
            c.add_metric([reason], float(n))
        yield c

        for name, value, doc in (
            ("prunefleet_energy_joules", totals.energy_j, "estimated energy devices spent serving"),
            ("prunefleet_device_telemetry_batches_dropped", totals.batches_dropped,
             "telemetry batches devices dropped from their full queue (reported later)"),
            ("prunefleet_device_switches_dropped", totals.switches_dropped,
             "switch records devices dropped from a full batch"),
            ("prunefleet_telemetry_batches_stored", totals.batches,
             "telemetry batches stored"),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(value or 0))
            yield c

        # Rollouts and where devices stand with them.
        per_status = dict.fromkeys((st.value for st in Status), 0)
        for status, n in rollouts:
            per_status[status if status in per_status else OTHER] = int(n)
        g = GaugeMetricFamily("prunefleet_rollouts", "rollouts by status", labels=["status"])
        for status, n in per_status.items():
            g.add_metric([status], float(n))
        yield g
        per_phase = dict.fromkeys((p.value for p in RolloutPhase), 0)
        for phase, n in phases:
            per_phase[phase if phase in per_phase else OTHER] = int(n)
        g = GaugeMetricFamily("prunefleet_devices_rollout_phase",
                              "devices by the phase of the manifest they were last offered",
                              labels=["phase"])
        for phase, n in per_phase.items():
            g.add_metric([phase], float(n))
        yield g

        # What devices dropped or refused since they started (their last reported state).
        per_counter = dict.fromkeys(DEVICE_COUNTERS, 0)
        for counters in reported:
            for key, n in (counters or {}).items():
                if key in per_counter and isinstance(n, int):
                    per_counter[key] += n
        g = GaugeMetricFamily(
            "prunefleet_device_reported_counters",
            "sum over devices of the counters in their last reported state (reset when an "
            "agent restarts)", labels=["counter"])
        for key, n in per_counter.items():
            g.add_metric([key], float(n))
        yield g


def make_registry(collector: FleetCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format (0.0.4) of everything in ``registry``."""
    return generate_latest(registry)
