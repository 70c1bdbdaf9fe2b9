"""Shared fixtures: real MQTT brokers on free loopback ports.

``mosquitto``      the real mosquitto binary with ``deploy/mosquitto/test.conf`` (session)
``embedded_broker`` prunefleet's in-process amqtt broker (session)
``any_broker``     parametrized over both, for behaviour every broker must share

Each broker object has ``.host``, ``.port``, ``.url`` (``mqtt://127.0.0.1:PORT``),
``.start()``, ``.stop()`` and ``.restart()`` (same port; simulates an outage). A broker
restart loses retained messages and sessions (no persistence in tests). A test that stops a
broker need not restart it: the broker is started again before the next test that uses it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prunefleet.server.broker import EmbeddedBroker

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO_TEST_CONF = REPO / "deploy" / "mosquitto" / "test.conf"
LOOPBACK = "127.0.0.1"

_LISTENER_LINE = re.compile(r"^listener[ \t]+\d+([ \t]+\S+)?[ \t]*$", re.MULTILINE)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now (the OS may hand it out again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    """True once ``host:port`` accepts a TCP connection, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.02)
    return False


# -- mosquitto ------------------------------------------------------------------------------

_install_attempted = False


def find_mosquitto() -> str:
    """Path of the mosquitto binary; installs it with apt-get once if missing.

    Fails the test (never skips): the broker is part of what the suite must test.
    """
    global _install_attempted
    candidates = [shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    if not _install_attempted:
        _install_attempted = True
        _apt_install("mosquitto")
        return find_mosquitto()
    pytest.fail(
        "mosquitto is not installed and `apt-get install -y mosquitto` did not install it; "
        "install it (Debian/Ubuntu: `sudo apt-get install -y mosquitto`) and rerun",
        pytrace=False,
    )


def _apt_install(package: str) -> None:
    apt = shutil.which("apt-get")
    if apt is None:
        return
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            return
        prefix = [sudo, "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, apt, "install", "-y", "--no-install-recommends", package]
    for command in (install, [*prefix, apt, "update"], install):
        try:
            done = subprocess.run(command, env=env, capture_output=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return
        if done.returncode == 0 and command is install:
            return


def mosquitto_config(template: str, port: int, host: str = LOOPBACK) -> str:
    """``template`` (a mosquitto config with one ``listener PORT [HOST]`` line) for ``port``."""
    config, count = _LISTENER_LINE.subn(f"listener {port} {host}", template)
    if count != 1:
        raise ValueError(f"expected exactly one `listener` line in the template, found {count}")
    return config


class MosquittoProcess:
    """A mosquitto subprocess on a fixed loopback port, startable and stoppable at will.

    Its stdout and stderr (where test.conf sends the log) are appended to ``log_path``.
    """

    def __init__(
        self,
        binary: str,
        workdir: Path,
        *,
        template: Path = MOSQUITTO_TEST_CONF,
        host: str = LOOPBACK,
        port: int | None = None,
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.template = template
        self.host = host
        self.port = port or free_port(host)
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and return once its port accepts connections."""
        if self.running:
            return
        self.config_path.write_text(
            mosquitto_config(self.template.read_text(), self.port, self.host)
        )
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if wait_for_port(self.host, self.port, timeout=0.2):
                return
        code = self._proc.poll()
        self.stop()
        tail = "\n".join(self.log_text().splitlines()[-20:])
        state = f"exited with code {code}" if code is not None else f"not ready in {timeout:g} s"
        raise RuntimeError(f"mosquitto on {self.url} {state}; log:\n{tail}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop mosquitto (SIGTERM, then SIGKILL); its clients see the connection drop."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self) -> None:
        """Stop and start again on the same port (retained messages are lost)."""
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload mosquitto` sends: it re-reads the password file and
        the ACL and drops connected clients whose entry is gone."""
        assert self._proc is not None and self._proc.poll() is None, "mosquitto is not running"
        self._proc.send_signal(signal.SIGHUP)

    def __repr__(self) -> str:
        return f"<MosquittoProcess {self.url} {'running' if self.running else 'stopped'}>"


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """A mosquitto broker for the whole session (config: deploy/mosquitto/test.conf)."""
    binary = find_mosquitto()
    workdir = tmp_path_factory.mktemp("mosquitto")
    broker = MosquittoProcess(binary, workdir)
    for attempt in range(3):
        try:
            broker.start()
            break
        except RuntimeError:
            # The free port may have been taken between free_port() and bind(): retry.
            if attempt == 2 or "Address already in use" not in broker.log_text():
                raise
            broker.port = free_port()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """prunefleet's in-process amqtt broker for the whole session."""
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(params=["mosquitto", "amqtt"])
def any_broker(request: pytest.FixtureRequest) -> MosquittoProcess | EmbeddedBroker:
    """Each test runs once against mosquitto and once against the embedded broker."""
    name = "mosquitto" if request.param == "mosquitto" else "embedded_broker"
    broker: MosquittoProcess | EmbeddedBroker = request.getfixturevalue(name)
    if not broker.running:
        broker.start()
    return broker


@pytest.fixture(autouse=True)
def _brokers_running(request: pytest.FixtureRequest) -> None:
    """Start a session broker again if an earlier test stopped it (and failed to restart)."""
    for name in ("mosquitto", "embedded_broker"):
        if name in request.fixturenames:
            broker = request.getfixturevalue(name)
            if not broker.running:
                broker.start()


# -- a server and an in-process agent on the session mosquitto -------------------------------


@pytest.fixture
def fleet(tmp_path, mosquitto):
    """``(server, agent)``: a FleetServer and an in-process Agent running its loop."""
    from fleet_helpers import make_server, run_agent

    srv = make_server(tmp_path, mosquitto.url)
    with run_agent(tmp_path, mosquitto.url) as agent:
        yield srv, agent
    srv.stop()


@pytest.fixture
def durable_mosquitto(tmp_path):
    """A mosquitto of its own that keeps sessions and queued messages across restarts,
    as the production config does (``persistence true``)."""
    workdir = tmp_path / "durable-mosquitto"
    workdir.mkdir()
    template = workdir / "template.conf"
    text = MOSQUITTO_TEST_CONF.read_text()
    assert "persistence false" in text
    # As root mosquitto drops to user `mosquitto`, which cannot write a test's 0700 dir.
    template.write_text(text.replace(
        "persistence false",
        f"persistence true\npersistence_location {workdir}/\nuser root",
    ))
    broker = MosquittoProcess(find_mosquitto(), workdir, template=template)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def torch_one_thread():
    """One PyTorch thread, as the pipeline uses: two spin against each other when busy."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
