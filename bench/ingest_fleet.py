"""Ingest lag at fleet scale: a real ``prunefleet serve`` behind N device connections.

    python bench/ingest.py --fleet 10000 --rate 1000[,2000,...] [--seconds 60]
                           [--drain-s 30] [--db URL] [--json PATH]

Issue #9's "p99 lag < 1 s at 1,000 batches/s from 10,000 devices". The full simulator
(``prunefleet simulate``) runs the agent's whole loop for every device, which on a small
machine takes the CPU the server needs; this load generator does only what a device does
on the wire, as cheaply as possible, so that the server's figure is its own:

* ``--fleet`` real MQTT 3.1.1 connections to the test mosquitto (``start_mosquitto``,
  connection messages off), one client id each, clean session, keepalive 30 s like the
  agent's, each subscribed (QoS 1) to its desired state and its ``acked`` cursor, as the
  agent is: the server's retained cursor per device per commit travels to the device (and
  is acknowledged if it comes at QoS 1), which is part of the real load. A minimal client
  on one ``epoll`` (raw packets, no paho, no agent loop), in its own process.
* Each device publishes a ``TelemetryBatch`` (QoS 1) every ``fleet / rate`` seconds at its
  own random phase (what a fleet with a fixed telemetry interval does), so the fleet
  offers ``rate`` batches/s. The batches are made from a template that
  ``shared/messages.py`` built (2 variants, a switch; ~700 bytes) with the device's id,
  its incarnation, the next seq, ``unconfirmed_from`` (the lowest seq not yet covered by
  the device's cursor) and ``interval_end`` = the send time filled in; 200 of them are
  decoded with the server's own ``decode`` before the run and every 500th during it.
  Nothing is sent again (the agent would, after 30 s unconfirmed): every batch is sent
  once, so whatever does not reach the store is lost and counted.
* The server is a ``prunefleet serve`` subprocess (SQLite in its state directory, or
  ``--db`` in a fresh schema), ``--metrics-public``.

Figures (per rate): ``offered`` (sent), ``broker_acked`` (PUBACKs), ``stored`` (distinct
rows of this run), ``lost`` (per device, seqs sent minus seqs stored), ``duplicates``;
lag = commit minus ``interval_end`` (the store's ``received_at``, taken just before the
transaction, per batch: p50/p99/max over all batches, per 10 s of offering, and over the
steady part, i.e. batches cut ``STEADY_AFTER_S`` or two intervals after the start, whichever
is later: in the first interval every device's first batch makes the server read its
cursor from the store and add the device's row, a backlog that takes a while to clear),
the server's own histogram ``prunefleet_telemetry_ingest_lag_seconds``
over the run (p50/p99 interpolated in its buckets, and the share within 1 s), and the
device's view: send to the cursor that confirms it; with ``--warm`` every device has had
one batch stored before the measured offering (a server that already knows the fleet: no
first contact in the figures; ``lost`` and ``duplicates`` include the warm-up's batches).
CPU (psutil, over the offering
window, in cores): the server, the load generator, mosquitto, PostgreSQL's processes, and
the whole machine (the rest is other work); load averages at the start and end.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from array import array
from collections import deque
from pathlib import Path
from typing import Any

from distribution import _free_port, start_mosquitto  # isort: skip

CHUNK = 250  # connections opened at once (mosquitto's accept backlog)
KEEPALIVE_S = 30  # the agent's (TransportOptions.keepalive_s)
VALIDATE_EVERY = 500
STEADY_AFTER_S = 20.0  # the first contact's backlog is over (see the module's docstring)


# -- payloads ---------------------------------------------------------------------------
_SENTINELS = {
    "device": "DEVICESENTINEL", "inc": "INCSENTINEL", "seq": 2111111111,
    "unconf": 2000000000, "start": 1111111111.25, "end": 1222222222.5,
    "switch": 1333333333.75,
}


def payload_template() -> tuple[list[bytes], list[str]]:
    """A ``TelemetryBatch`` encoded by ``shared/messages.py`` with sentinel values, cut at
    them: the literal parts and, between them, which value goes where."""
    from prunefleet.shared.messages import SwitchEvent, TelemetryBatch, VariantStats

    s = _SENTINELS
    raw = TelemetryBatch(
        device_id=s["device"], seq=s["seq"], incarnation=s["inc"],
        unconfirmed_from=s["unconf"], interval_start=s["start"], interval_end=s["end"],
        variants={v: VariantStats(requests=12, labeled=12, correct=11, latency_ms_p50=1.2,
                                  latency_ms_p95=2.5, latency_ms_p99=3.1)
                  for v in ("dense", "struct50")},
        switches=[SwitchEvent(ts=s["switch"], from_variant="dense", to_variant="struct50",
                              reason="battery_low")],
        active_variant="struct50", battery_percent=55.0, charging=False, cpu_percent=20.0,
        mem_percent=40.0, temperature_c=45.0, energy_j=0.8,
    ).encode()
    found = []
    for name, value in s.items():
        text = (value if isinstance(value, str) else repr(value)).encode()
        if raw.count(text) != 1:
            raise SystemExit(f"payload template: {text!r} found {raw.count(text)} times")
        found.append((raw.index(text), len(text), name))
    parts, order, pos = [], [], 0
    for at, n, name in sorted(found):
        parts.append(raw[pos:at])
        order.append(name)
        pos = at + n
    parts.append(raw[pos:])
    return parts, order


def build_payload(parts: list[bytes], order: list[str], values: dict[str, bytes]) -> bytes:
    out = [parts[0]]
    for name, part in zip(order, parts[1:], strict=True):
        out.append(values[name])
        out.append(part)
    return b"".join(out)


# -- MQTT 3.1.1, the few packets a device needs ----------------------------------------
def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varlen(len(body)) + body


def connect_packet(client_id: str) -> bytes:
    return _packet(0x10, _str(b"MQTT") + bytes([4, 0x02]) + KEEPALIVE_S.to_bytes(2, "big")
                   + _str(client_id.encode()))


def subscribe_packet(pid: int, topics: list[str]) -> bytes:
    return _packet(0x82, pid.to_bytes(2, "big")
                   + b"".join(_str(t.encode()) + b"\x01" for t in topics))


def publish_qos1(topic: bytes, pid: int, payload: bytes) -> bytes:
    return _packet(0x32, _str(topic) + pid.to_bytes(2, "big") + payload)


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def _pct(sorted_values: list[float] | array, q: float) -> float | None:
    n = len(sorted_values)
    return None if n == 0 else float(sorted_values[min(n - 1, int(q * n))])


# -- the load generator (its own process) ------------------------------------------------
class Fleet:
    def __init__(self, url: str, prefix: str, n: int, rate: float, seed: int) -> None:
        from prunefleet.shared.topics import Topics

        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.addr = (host, int(port))
        self.n = n
        self.topics = Topics(prefix)
        self.ids = [f"fleet-{i:05d}" for i in range(n)]
        rnd = random.Random(seed)
        self.inc = [f"{rnd.getrandbits(64):016x}" for _ in range(n)]
        self.interval = n / rate
        self.phase = [rnd.uniform(0, self.interval) for _ in range(n)]
        self.order = sorted(range(n), key=self.phase.__getitem__)
        self.tel_topic = [self.topics.telemetry(d).encode() for d in self.ids]
        self.socks: list[socket.socket | None] = [None] * n
        self.fd: dict[int, int] = {}
        self.rbuf = [bytearray() for _ in range(n)]
        self.wpend: dict[int, bytearray] = {}
        self.seq = [0] * n  # next seq to send
        self.through = [-1] * n  # the device's cursor
        self.pid = [1] * n
        self.sent_at: list[deque[tuple[int, float]]] = [deque() for _ in range(n)]
        self.last_tx = [0.0] * n
        self.ep = select.epoll()
        self.connected = 0
        self.suback_fail = 0
        self.subacked = 0
        self.pubacks = 0
        self.cursors = 0
        self.cursors_other_inc = 0
        self.confirm_lat = array("d")
        self.lateness = array("d")
        self.closed = 0
        self.send_errors = 0
        self.not_sent = 0  # due on a closed connection
        self.invalid_built = 0
        self.validated = 0

    # connections
    def connect_all(self) -> float:
        t0 = time.monotonic()
        for lo in range(0, self.n, CHUNK):
            want = min(self.n, lo + CHUNK)
            for i in range(lo, want):
                s = socket.create_connection(self.addr, timeout=30)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(connect_packet(self.ids[i]) + subscribe_packet(
                    1, [self.topics.desired(self.ids[i]), self.topics.acked(self.ids[i])]))
                s.setblocking(False)
                self.socks[i] = s
                self.fd[s.fileno()] = i
                self.ep.register(s.fileno(), select.EPOLLIN)
                self.last_tx[i] = time.monotonic()
            deadline = time.monotonic() + 60
            while self.subacked + self.suback_fail < want and time.monotonic() < deadline:
                self.poll(0.05)
            if self.subacked + self.suback_fail < want:
                raise SystemExit(f"only {self.subacked} of {want} devices subscribed in 60 s")
        return time.monotonic() - t0

    def poll(self, timeout: float) -> None:
        for fd, ev in self.ep.poll(timeout):
            i = self.fd.get(fd)
            if i is None:
                continue
            if ev & select.EPOLLOUT:
                self._flush(i)
            if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                s = self.socks[i]
                if s is None:
                    continue
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._close(i)
                    continue
                self._receive(i, data)

    def _close(self, i: int) -> None:
        s = self.socks[i]
        if s is None:
            return
        self.fd.pop(s.fileno(), None)
        with contextlib.suppress(OSError):
            self.ep.unregister(s.fileno())
        s.close()
        self.socks[i] = None
        self.wpend.pop(i, None)
        self.closed += 1

    def send(self, i: int, data: bytes) -> bool:
        s = self.socks[i]
        if s is None:
            return False
        self.last_tx[i] = time.monotonic()
        pend = self.wpend.get(i)
        if pend is not None:
            pend += data
            return True
        try:
            k = s.send(data)
        except BlockingIOError:
            k = 0
        except OSError:
            self.send_errors += 1
            self._close(i)
            return False
        if k < len(data):
            self.wpend[i] = bytearray(data[k:])
            self.ep.modify(s.fileno(), select.EPOLLIN | select.EPOLLOUT)
        return True

    def _flush(self, i: int) -> None:
        s, pend = self.socks[i], self.wpend.get(i)
        if s is None or pend is None:
            return
        try:
            k = s.send(pend)
        except BlockingIOError:
            return
        except OSError:
            self.send_errors += 1
            self._close(i)
            return
        del pend[:k]
        if not pend:
            del self.wpend[i]
            self.ep.modify(s.fileno(), select.EPOLLIN)

    def _receive(self, i: int, data: bytes) -> None:
        buf = self.rbuf[i]
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 2:
            k, length, mult, whole = pos + 1, 0, 1, False
            while k < end:
                b = buf[k]
                k += 1
                length += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    whole = True
                    break
            if not whole or end - k < length:
                break
            self._packet(i, buf[pos], bytes(buf[k:k + length]))
            pos = k + length
        if pos:
            del buf[:pos]

    def _packet(self, i: int, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 3:  # PUBLISH from the broker: a cursor (or a desired state)
            qos = (first >> 1) & 3
            tl = int.from_bytes(body[:2], "big")
            topic, off = body[2:2 + tl], 2 + tl
            if qos:
                self.send(i, b"\x40\x02" + body[off:off + 2])
                off += 2
            if topic.endswith(b"/acked"):
                self._cursor(i, body[off:])
        elif kind == 4:
            self.pubacks += 1
        elif kind == 9:
            if any(c & 0x80 for c in body[2:]):
                self.suback_fail += 1
            else:
                self.subacked += 1
        elif kind == 2 and body[1] == 0:
            self.connected += 1

    def _cursor(self, i: int, payload: bytes) -> None:
        ack = json.loads(payload)
        self.cursors += 1
        if ack.get("incarnation") != self.inc[i]:
            self.cursors_other_inc += 1
            return
        through = int(ack["stored_through"])
        if through <= self.through[i]:
            return
        self.through[i] = through
        now = time.time()
        q = self.sent_at[i]
        while q and q[0][0] <= through:
            self.confirm_lat.append(now - q.popleft()[1])

    def keepalive(self) -> None:
        old = time.monotonic() - KEEPALIVE_S / 2
        for i in range(self.n):
            if self.last_tx[i] < old and self.socks[i] is not None:
                self.send(i, PINGREQ)

    # offering
    def offer(self, seconds: float, t0: float) -> float:
        from prunefleet.shared.messages import TelemetryBatch, decode

        parts, order = payload_template()
        inc_b = [x.encode() for x in self.inc]
        id_b = [x.encode() for x in self.ids]
        interval, n = self.interval, self.n
        total = 0
        while True:  # sends due before t0 + seconds
            i = self.order[total % n]
            if self.phase[i] + (total // n) * interval >= seconds:
                break
            total += 1

        def payload(i: int, seq: int, now: float) -> bytes:
            unconf = min(seq, self.through[i] + 1)
            return build_payload(parts, order, {
                "device": id_b[i], "inc": inc_b[i], "seq": str(seq).encode(),
                "unconf": str(unconf).encode(), "start": repr(now - interval).encode(),
                "end": repr(now).encode(), "switch": repr(now - interval / 2).encode()})

        for j in range(200):  # the template makes batches the server accepts
            b = decode(TelemetryBatch, payload(j % n, j, time.time()))
            assert b.device_id == self.ids[j % n] and b.seq == j
        last_ka = time.monotonic()
        k = 0
        while k < total:
            now = time.time()
            while k < total:
                i = self.order[k % n]
                due = t0 + self.phase[i] + (k // n) * interval
                if due > now:
                    break
                seq = self.seq[i]
                data = payload(i, seq, now)
                if k % VALIDATE_EVERY == 0:
                    self.validated += 1
                    try:
                        decode(TelemetryBatch, data)
                    except Exception:
                        self.invalid_built += 1
                pid = self.pid[i]
                self.pid[i] = pid % 65535 + 1
                if self.send(i, publish_qos1(self.tel_topic[i], pid, data)):
                    self.seq[i] = seq + 1
                    self.sent_at[i].append((seq, now))
                else:
                    self.not_sent += 1
                self.lateness.append(now - due)
                k += 1
            if k >= total:
                break
            if time.monotonic() - last_ka > 5:
                self.keepalive()
                last_ka = time.monotonic()
            i = self.order[k % n]
            wait = t0 + self.phase[i] + (k // n) * interval - time.time()
            self.poll(max(0.0, min(wait, 0.02)))
        return time.time()

    def drain(self, drain_s: float) -> float:
        deadline = time.monotonic() + drain_s
        last_ka = time.monotonic()
        while time.monotonic() < deadline:
            if all(t >= s - 1 for t, s in zip(self.through, self.seq, strict=True)):
                break
            self.poll(0.05)
            if time.monotonic() - last_ka > 5:
                self.keepalive()
                last_ka = time.monotonic()
        return time.time()

    def disconnect(self) -> None:
        for i in range(self.n):
            if self.socks[i] is not None:
                self.send(i, DISCONNECT)
                self._close(i)
                self.closed -= 1


def fleet_main(url: str, prefix: str, n: int, rate: float, seconds: float, drain_s: float,
               seed: int, warm: bool, conn: Any) -> None:
    cpu = os.times()
    fleet = Fleet(url, prefix, n, rate, seed)
    connect_s = fleet.connect_all()
    if warm:  # one batch per device, stored, before the measured offering
        fleet.offer(fleet.interval, time.time() + 0.5)
        fleet.drain(drain_s)
        fleet.confirm_lat, fleet.lateness, fleet.pubacks = array("d"), array("d"), 0
    conn.send(("connected", connect_s))
    if conn.recv() != "go":
        return
    t0 = time.time() + 0.5
    c0 = os.times()
    conn.send(("offering", t0))
    t1 = fleet.offer(seconds, t0)
    c1 = os.times()
    conn.send(("draining", t1))
    t2 = fleet.drain(drain_s)
    fleet.disconnect()
    lat = sorted(fleet.confirm_lat)
    late = sorted(fleet.lateness)
    conn.send(("done", {
        "t_offer": [t0, t1], "t_drained": t2, "connect_s": connect_s,
        "sent": fleet.seq, "incarnation": fleet.inc, "ids": fleet.ids,
        "through": fleet.through, "connected": fleet.connected,
        "subscribed": fleet.subacked, "suback_failed": fleet.suback_fail,
        "broker_acked": fleet.pubacks, "cursors": fleet.cursors,
        "cursors_other_incarnation": fleet.cursors_other_inc,
        "confirmed": len(lat), "confirm_p50_s": _pct(lat, 0.5),
        "confirm_p99_s": _pct(lat, 0.99), "confirm_max_s": lat[-1] if lat else None,
        "send_late_p50_s": _pct(late, 0.5), "send_late_p99_s": _pct(late, 0.99),
        "send_late_max_s": late[-1] if late else None,
        "closed": fleet.closed, "send_errors": fleet.send_errors,
        "not_sent": fleet.not_sent, "validated": fleet.validated,
        "invalid_built": fleet.invalid_built,
        "warm_batches": n if warm else 0,
        "cpu_offer_s": (c1.user + c1.system) - (c0.user + c0.system),
        "cpu_total_s": (c1.user + c1.system) - (cpu.user + cpu.system),
    }))


# -- the run ------------------------------------------------------------------------------
def _scrape(url: str) -> dict[str, Any]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    buckets: list[tuple[float, float]] = []
    out: dict[str, Any] = {"buckets": buckets}
    for line in text.splitlines():
        if line.startswith("prunefleet_telemetry_ingest_lag_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le),
                            float(line.rsplit(" ", 1)[1])))
        elif line.startswith("prunefleet_ingest_dropped_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out.setdefault("dropped", {})[reason] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("prunefleet_telemetry_duplicates_dropped_total "):
            out["dedupe_dropped"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("prunefleet_telemetry_ingest_transactions_total "):
            out["transactions"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("prunefleet_telemetry_acks_published_total "):
            out["acks_published"] = float(line.rsplit(" ", 1)[1])
    return out


def hist_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' ``histogram_quantile``: linear within the bucket (cumulative counts)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / max(n - prev_n, 1e-12))
        prev_le, prev_n = le, n
    return None


def _proc_cpu(procs: list[Any]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:
            pass
    return total


def _postgres_procs() -> list[Any]:
    import psutil

    out = []
    for p in psutil.process_iter(["name"]):
        if (p.info.get("name") or "").startswith("postgres"):
            out.append(p)
    return out


def _busy_cpu() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def run_fleet(n: int, rate: float, seconds: float, drain_s: float,
              db_url: str | None, work: Path, keep_logs: Path | None = None,
              warm: bool = False, ingest_processes: int = 0) -> dict:
    import psutil


    payload_template()  # fails here, not in the generator, if it cannot be made
    broker, url = start_mosquitto(work, connection_messages=False)
    prefix = f"fleet{uuid.uuid4().hex[:6]}"
    state = work / "server"
    port = _free_port()
    http = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).parent / "prunefleet"
    cmd = [str(exe), "serve", "--broker", url, "--state-dir", str(state),
           "--keys", str(state / "keys"), "--listen", f"127.0.0.1:{port}",
           "--prefix", prefix, "--metrics-public"]
    if db_url:
        cmd += ["--db", db_url]
    if ingest_processes:
        cmd += ["--ingest-processes", str(ingest_processes)]
    log = open(work / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    gen: Any = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _scrape(http)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start; see {work / 'server.log'}"
                                     ) from None
                time.sleep(0.3)
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        gen = ctx.Process(target=fleet_main, args=(url, prefix, n, rate, seconds, drain_s,
                                                   random.randrange(1 << 30), warm, child))
        gen.start()
        if not conn.poll(300):
            raise SystemExit("the load generator did not connect its devices")
        what, connect_s = conn.recv()
        print(f"  {n} devices connected and subscribed in {connect_s:.1f} s", flush=True)
        p_server, p_broker, p_gen = (psutil.Process(server.pid), psutil.Process(broker.pid),
                                     psutil.Process(gen.pid))
        servers = [p_server, *p_server.children(recursive=True)]  # its ingest workers
        pg = _postgres_procs() if db_url else []
        time.sleep(2.0)
        m0 = _scrape(http)
        load0 = os.getloadavg()
        conn.send("go")
        _, _t0 = conn.recv()
        cpu0 = {"server": _proc_cpu(servers), "broker": _proc_cpu([p_broker]),
                "generator": _proc_cpu([p_gen]), "postgres": _proc_cpu(pg),
                "machine": _busy_cpu()}
        w0 = time.time()
        timeline = []
        last = dict(cpu0)
        result: dict = {}
        t1 = None
        while True:
            if not conn.poll(5.0) and not gen.is_alive():
                raise SystemExit("the load generator died")
            if conn.poll(0):
                what, value = conn.recv()
                if what == "draining":
                    t1 = value
                    cpu1 = {"server": _proc_cpu(servers), "broker": _proc_cpu([p_broker]),
                            "generator": _proc_cpu([p_gen]), "postgres": _proc_cpu(pg),
                            "machine": _busy_cpu()}
                    w1 = time.time()
                    load1 = os.getloadavg()
                    print("  offering done; draining", flush=True)
                    continue
                if what == "done":
                    result = value
                    break
            if t1 is None:  # every 5 s while offering: cores per part
                now_c = {"server": _proc_cpu(servers), "broker": _proc_cpu([p_broker]),
                         "generator": _proc_cpu([p_gen]), "postgres": _proc_cpu(pg),
                         "machine": _busy_cpu()}
                timeline.append({"t_s": round(time.time() - w0, 1), **{
                    k: round((now_c[k] - last[k]) / 5.0, 2) for k in now_c},
                    "load1": os.getloadavg()[0]})
                last = now_c
        gen.join(60)
        m1 = _scrape(http)
    finally:
        if gen is not None and gen.is_alive():
            gen.kill()
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        broker.terminate()
        broker.wait(10)
    # mosquitto drops QoS 1 messages for a subscriber past max_queued_messages, and says
    # so (once per episode) in its log: what the server never received.
    if keep_logs is not None:
        for name in ("server.log", "mosquitto.log"):
            shutil.copy(work / name, f"{keep_logs}.{name}")
    broker_drops = [ln for ln in (work / "mosquitto.log").read_text(errors="replace")
                    .splitlines() if "dropped" in ln.lower()]

    from ingest import stored_rows  # isort: skip

    rows = stored_rows(db_url, state)
    inc = dict(zip(result["ids"], result["incarnation"], strict=True))
    sent = dict(zip(result["ids"], result["sent"], strict=True))
    every = [r for r in rows if inc.get(r[0]) == r[1]]
    t_start, t_end = result["t_offer"]
    # With --warm, the warm-up's batches count for lost and duplicates, not for the lag.
    ours = [r for r in every if r[3] >= t_start - 0.01]
    keys = {(d, s) for d, _, s, _, _ in every}
    stored_seqs: dict[str, set[int]] = {}
    for d, _, s, _, _ in every:
        stored_seqs.setdefault(d, set()).add(s)
    lost = sum(len(set(range(k)) - stored_seqs.get(d, set())) for d, k in sent.items())
    interval = n / rate
    lags = sorted(r - e for *_, e, r in ours)
    warm_s = max(STEADY_AFTER_S, 2 * interval)
    steady = sorted(r - e for *_, e, r in ours if e >= t_start + warm_s)
    per10: dict[int, list[float]] = {}
    for *_, e, r in ours:
        per10.setdefault(int((e - t_start) // 10), []).append(r - e)
    lag_timeline = [{"t_s": w * 10, "batches": len(v), "p50_s": round(_pct(sorted(v), .5)
                                                                      or 0, 3),
                     "p99_s": round(_pct(sorted(v), .99) or 0, 3)}
                    for w, v in sorted(per10.items()) for v in [sorted(v)]]
    hb = [(le, n1 - n0) for (le, n1), (_, n0) in zip(m1["buckets"], m0["buckets"],
                                                       strict=True)]
    within_1s = next((c for le, c in hb if le == 1.0), None)
    span = w1 - w0
    cores = {k: round((cpu1[k] - cpu0[k]) / span, 3) for k in cpu0}
    cores["other"] = round(cores["machine"] - cores["server"] - cores["broker"]
                           - cores["generator"] - cores["postgres"], 3)
    offered = sum(result["sent"]) - result["warm_batches"]
    stored_n = len({(d, s) for d, _, s, _, _ in ours})

    def r3(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    p99 = _pct(lags, 0.99)
    return {
        "devices": n, "rate": rate, "store": "postgresql" if db_url else "sqlite",
        "seconds": seconds, "offered": offered,
        "offered_rate": round(offered / max(1e-9, t_end - t_start), 1),
        "broker_acked": result["broker_acked"], "stored": stored_n, "lost": lost,
        "duplicates": len(every) - len(keys), "warm": warm, "ingest_processes": ingest_processes,
        "p50_lag_s": r3(_pct(lags, 0.5)), "p99_lag_s": r3(p99),
        "max_lag_s": r3(lags[-1] if lags else None),
        "steady_after_s": warm_s, "p50_lag_steady_s": r3(_pct(steady, 0.5)),
        "p99_lag_steady_s": r3(_pct(steady, 0.99)),
        "p99_lt_1s": p99 is not None and p99 < 1.0 and lost == 0,
        "histogram": {
            "count": hb[-1][1] if hb else 0, "p50_s": r3(hist_quantile(hb, 0.5)),
            "p99_s": r3(hist_quantile(hb, 0.99)),
            "share_within_1s": round(within_1s / hb[-1][1], 5)
            if within_1s is not None and hb and hb[-1][1] else None},
        "lag_timeline": lag_timeline,
        "device_view": {k: r3(result[k]) for k in (
            "confirm_p50_s", "confirm_p99_s", "confirm_max_s")}
        | {"confirmed": result["confirmed"], "cursors_received": result["cursors"],
           "unconfirmed_at_end": sum(max(0, s - 1 - t) for s, t in zip(
               result["sent"], result["through"], strict=True))},
        "generator": {
            "connect_s": round(result["connect_s"], 1), "connected": result["connected"],
            "subscribed": result["subscribed"], "suback_failed": result["suback_failed"],
            "closed": result["closed"], "send_errors": result["send_errors"],
            "not_sent": result["not_sent"], "validated": result["validated"],
            "invalid_built": result["invalid_built"],
            "send_late_p50_s": r3(result["send_late_p50_s"]),
            "send_late_p99_s": r3(result["send_late_p99_s"]),
            "send_late_max_s": r3(result["send_late_max_s"]),
            "cpu_s": round(result["cpu_offer_s"], 2)},
        "server": {"transactions": m1.get("transactions", 0) - m0.get("transactions", 0),
                   "batches_per_transaction": round(
                       stored_n / max(1.0, m1.get("transactions", 0)
                                      - m0.get("transactions", 0)), 1),
                   "acks_published": m1.get("acks_published", 0)
                   - m0.get("acks_published", 0),
                   "dedupe_dropped": m1.get("dedupe_dropped", 0),
                   "dropped": {k: v for k, v in m1.get("dropped", {}).items() if v},
                   "cpu_us_per_batch": round(1e6 * (cpu1["server"] - cpu0["server"])
                                             / max(1, offered), 1)},
        "drain_s": round(result["t_drained"] - t_end, 1),
        "broker_log_drops": broker_drops[:5],
        "cores": cores, "cpu_timeline": timeline,
        "load": [round(x, 2) for x in (load0[0], load1[0])],
    }


def _code_version() -> dict[str, str]:
    """The commit, and a digest of uncommitted changes to the server's code: the server
    under test is the working tree's."""
    import hashlib

    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> bytes:
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True,
                                  timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return b""

    diff = git("diff", "HEAD", "--", "server", "shared")
    return {"head": git("rev-parse", "HEAD").decode().strip(),
            "uncommitted_server_shared_sha1": hashlib.sha1(diff).hexdigest() if diff else ""}


def main(fleet: int, rates: list[float], seconds: float, drain_s: float,
         db: str | None, json_path: Path | None, warm: bool = False,
         ingest_processes: int = 0) -> int:
    import platform

    from ingest import bench_schema

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = fleet + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need:
        raise SystemExit(f"open files limit {hard} is under the {need} this needs "
                         "(mosquitto inherits it too): raise `ulimit -n`")
    code = _code_version()
    runs = []
    for rate in rates:
        work = Path(tempfile.mkdtemp(prefix="pf-bench-fleet-"))
        print(f"{'PostgreSQL' if db else 'SQLite'}: {fleet} devices, {rate:g} batches/s "
              f"(one per device every {fleet / rate:g} s), {seconds:g} s, load "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        try:
            with bench_schema(db) as db_url:
                r = run_fleet(fleet, rate, seconds, drain_s, db_url, work,
                              json_path.with_suffix(f".{rate:g}") if json_path else None,
                              warm, ingest_processes)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs.append(r)
        c = r["cores"]
        print(f"  offered {r['offered']} ({r['offered_rate']}/s), stored {r['stored']}, "
              f"lost {r['lost']}, duplicates {r['duplicates']}\n"
              f"  lag p50 {r['p50_lag_s']} s, p99 {r['p99_lag_s']} s (steady "
              f"{r['p99_lag_steady_s']} s), max {r['max_lag_s']} s; histogram p99 "
              f"{r['histogram']['p99_s']} s, within 1 s {r['histogram']['share_within_1s']}"
              f"\n  p99 < 1 s: {'HOLDS' if r['p99_lt_1s'] else 'MISSED'}\n"
              f"  cores: server {c['server']}, generator {c['generator']}, mosquitto "
              f"{c['broker']}, postgres {c['postgres']}, other {c['other']} (machine "
              f"{c['machine']}); load {r['load'][0]}-{r['load'][1]}", flush=True)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                      f"Python {platform.python_version()}", "code": code, "runs": runs}
    if json_path:
        json_path.write_text(json.dumps(out, indent=2) + "\n")
    return 0
