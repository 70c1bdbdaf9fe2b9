"""The fleet simulator past one process's old limit (paho's ``select()`` stops at descriptor
1024, about 300 connections): ``prunefleet simulate --devices 1500`` in one process, each
device on its own MQTT connection, against a mosquitto of the test's own with a raised
open-files limit; every device comes online at the server and has telemetry stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import MosquittoProcess, find_mosquitto
from fleet_helpers import wait_for
from rollout_helpers import Fleet
from sqlalchemy import distinct, func, select

from prunefleet.server.simulator import FD_RESERVE, SimOptions, device_ids
from prunefleet.server.store import Device, Telemetry
from prunefleet.shared.transport import raise_fd_limit

DEVICES = 1500


@pytest.mark.system
@pytest.mark.timeout(600)
def test_fifteen_hundred_devices_in_one_process_come_online_and_send_telemetry(tmp_path):
    need = DEVICES + FD_RESERVE + 1024  # the broker's sockets, the server's, the test's
    if raise_fd_limit(need) < need:
        pytest.skip(f"the open-files hard limit is below {need} (`ulimit -Hn`)")
    # mosquitto inherits the raised limit: one descriptor per connection.
    broker = MosquittoProcess(find_mosquitto(), tmp_path)
    broker.start()
    fleet = Fleet(tmp_path / "fleet", broker.url)
    p = None
    try:
        fleet.start_server()
        cmd = [sys.executable, "-m", "prunefleet.server.cli", "simulate",
               "--broker", broker.url, "--devices", str(DEVICES), "--prefix", fleet.prefix,
               "--keys", str(fleet.state_dir / "keys"), "--telemetry-interval", "5",
               "--status-interval", "5", "--no-download"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        store = fleet.svc.store

        def online() -> int:
            with store.session() as s:
                return int(s.scalar(select(func.count()).select_from(Device)
                                    .where(Device.online.is_(True))) or 0)

        def reporting() -> int:
            with store.session() as s:
                return int(s.scalar(select(func.count(distinct(Telemetry.device_id)))) or 0)

        wait_for(lambda: online() == DEVICES, 180, every_s=1.0, procs=[p],
                 what=f"{DEVICES} simulated devices online at the server")
        wait_for(lambda: reporting() == DEVICES, 120, every_s=1.0, procs=[p],
                 what=f"telemetry stored from all {DEVICES} devices")
        ids = set(device_ids(SimOptions(broker_url="mqtt://x", devices=DEVICES)))
        assert {d.device_id for d in store.devices()} >= ids
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        end = next(line for line in out.splitlines() if line.split()[:1] == ["end"])
        assert end.split()[1:3] == [str(DEVICES), str(DEVICES)]
        wait_for(lambda: online() == 0, 60, every_s=1.0,
                 what="every simulated device offline after SIGTERM")
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        fleet.close()
        broker.stop()
