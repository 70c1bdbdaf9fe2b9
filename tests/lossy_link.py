"""A lossy, slow network link between the host and a network namespace of its own, for
tests that run agents as remote devices (tests/test_lossy_network.py).

``LossyLink(tag, index)`` makes the namespace ``pf<tag>d<index>`` with the address
``10.213.0.<10+index>``, reaching the host at ``10.213.0.1``; it loses ``loss`` of the
packets and delays each by ``delay_s``, in both directions, and :meth:`partition` cuts it.

Two ways, the same link:

- **netem** where the kernel has it: a veth pair, the host end on a bridge that holds
  10.213.0.1, and ``tc qdisc … netem loss 10% delay 300ms`` on both ends; a partition is
  ``netem loss 100%``.
- **a user-space link** where it has not (some VM kernels ship without sch_netem): a TUN
  device in the namespace and one on the host, joined by a small forwarder process (this
  file run as a script) that drops and delays IP packets as netem would; a partition drops
  every packet. TCP above it sees real loss, reordering and delay either way.

Only namespaces, devices and addresses this module creates are touched; :meth:`close`
removes them (call it in a ``finally``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time

HOST_IP = "10.213.0.1"
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def _tc(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*(["ip", "netns", "exec", ns] if ns else []), "tc", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def netem_available() -> bool:
    """Whether this kernel can add a netem qdisc (tried on a throw-away namespace's lo)."""
    probe = f"pfnetem{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
        return _tc("qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                   ns=probe, check=False).returncode == 0
    finally:
        _ip("netns", "del", probe, check=False)


class LossyLink:
    def __init__(self, tag: str, index: int, *, loss: float = 0.10, delay_s: float = 0.3,
                 use_netem: bool | None = None):
        self.ns = f"pf{tag}d{index}"
        self.ip = f"10.213.0.{10 + index}"
        self.loss, self.delay_s = loss, delay_s
        self.host_dev = f"pf{tag}h{index}"
        self.bridge = f"pf{tag}br"
        self.use_netem = netem_available() if use_netem is None else use_netem
        self._forwarder: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> LossyLink:
        _ip("netns", "add", self.ns)
        _ip("link", "set", "lo", "up", ns=self.ns)
        if self.use_netem:
            self._start_netem()
        else:
            self._start_forwarder()
        return self

    def close(self) -> None:
        if self._forwarder is not None:
            self._forwarder.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._forwarder.wait(5)
            if self._forwarder.poll() is None:
                self._forwarder.kill()
                self._forwarder.wait()
            self._forwarder = None
        _ip("link", "del", self.host_dev, check=False)
        _ip("netns", "del", self.ns, check=False)
        if self.use_netem and _ip("link", "show", self.bridge, check=False).returncode == 0:
            # the last link of the bridge removes it
            ports = _ip("link", "show", "master", self.bridge, check=False).stdout.strip()
            if not ports:
                _ip("link", "del", self.bridge, check=False)

    def partition(self, cut: bool) -> None:
        """Cut the link (every packet lost, both ways) or restore it."""
        if self.use_netem:
            loss = "100%" if cut else f"{100 * self.loss:g}%"
            for dev, ns in ((self.host_dev, None), ("eth0", self.ns)):
                _tc("qdisc", "change", "dev", dev, "root", "netem", "loss", loss, "delay",
                    f"{self.delay_s * 1000:g}ms", ns=ns)
        else:
            assert self._forwarder is not None
            self._forwarder.send_signal(signal.SIGUSR1 if cut else signal.SIGUSR2)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the link's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    # -- netem -----------------------------------------------------------------------------
    def _start_netem(self) -> None:
        if _ip("link", "show", self.bridge, check=False).returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{HOST_IP}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        peer = f"{self.host_dev}p"
        _ip("link", "add", self.host_dev, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", self.ns)
        _ip("link", "set", peer, "name", "eth0", ns=self.ns)
        _ip("addr", "add", f"{self.ip}/24", "dev", "eth0", ns=self.ns)
        _ip("link", "set", "eth0", "up", ns=self.ns)
        _ip("link", "set", self.host_dev, "master", self.bridge)
        _ip("link", "set", self.host_dev, "up")
        for dev, ns in ((self.host_dev, None), ("eth0", self.ns)):
            _tc("qdisc", "add", "dev", dev, "root", "netem", "loss", f"{100 * self.loss:g}%",
                "delay", f"{self.delay_s * 1000:g}ms", ns=ns)

    # -- user-space link -------------------------------------------------------------------
    def _start_forwarder(self) -> None:
        self._forwarder = subprocess.Popen(
            [sys.executable, __file__, self.host_dev, self.ns, "pft0", str(self.loss),
             str(self.delay_s)], stdout=subprocess.PIPE)
        assert self._forwarder.stdout is not None
        line = self._forwarder.stdout.readline()
        if line.strip() != b"ready":
            self._forwarder.kill()
            raise RuntimeError(f"link forwarder for {self.ns} did not start: {line!r}")
        _ip("addr", "add", HOST_IP, "peer", f"{self.ip}/32", "dev", self.host_dev)
        _ip("link", "set", self.host_dev, "up")
        _ip("addr", "add", self.ip, "peer", f"{HOST_IP}/32", "dev", "pft0", ns=self.ns)
        _ip("link", "set", "pft0", "up", ns=self.ns)


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _forward(host_dev: str, ns: str, ns_dev: str, loss: float, delay_s: float) -> None:
    """Create the host TUN, enter ``ns`` and create its TUN, then move packets between
    them: each one lost with probability ``loss`` (all while partitioned, SIGUSR1 until
    SIGUSR2), the others delivered ``delay_s`` later in their order."""
    host = _open_tun(host_dev)
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{ns}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
    dev = _open_tun(ns_dev)
    cut = [False]
    signal.signal(signal.SIGUSR1, lambda *_: cut.__setitem__(0, True))
    signal.signal(signal.SIGUSR2, lambda *_: cut.__setitem__(0, False))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    rng = random.Random(0)
    peer = {host: dev, dev: host}
    due: list[tuple[float, int, int, bytes]] = []
    n = 0
    while True:
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out, packet = heapq.heappop(due)
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(out, packet)
        timeout = max(0.0, due[0][0] - now) if due else 1.0
        try:
            ready, _, _ = select.select([host, dev], [], [], timeout)
        except InterruptedError:
            continue
        for fd in ready:
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if cut[0] or rng.random() < loss:
                    continue
                n += 1
                heapq.heappush(due, (time.monotonic() + delay_s, n, peer[fd], packet))


if __name__ == "__main__":
    _forward(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
