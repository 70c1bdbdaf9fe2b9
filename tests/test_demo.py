"""`prunefleet demo` end to end on the embedded broker: the main job a user runs first."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from prunefleet.server.cli import main


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_runs_the_whole_loop_on_the_embedded_broker(tmp_path, capsys):
    work = tmp_path / "demo"
    # --json: the report a user reads goes to stderr, the summary alone to stdout.
    rc = main(["demo", "--agents", "2", "--work-dir", str(work), "--timeout", "90", "--json"])
    captured = capsys.readouterr()
    out = captured.err
    assert rc == 0, out
    summary = json.loads(captured.out)
    assert summary["ok"] is True
    assert [a["device_id"] for a in summary["agents"]] == ["demo-1", "demo-2"]
    for a in summary["agents"]:
        assert a["battery_switch"] and a["complexity_switch"]
        assert sorted(a["installed"]) == ["dense", "struct50", "struct75"]
        assert {sw["reason"] for sw in a["switches"]} & {"battery_low", "battery_critical"}
    assert "embedded MQTT broker (amqtt" in out
    for dev in ("demo-1", "demo-2"):
        section = out.split(f"== {dev}")[1].split("==")[0]
        assert "installed: dense, struct50, struct75" in section
        assert re.search(r"battery_(low|critical)", section), section
        assert re.search(r"complexity_(high|low)", section), section
        assert "battery-driven switch: yes; input-complexity-driven switch: yes" in section
    db = sqlite3.connect(work / "fleet.db")
    per_device = dict(db.execute("select device_id, count(*) from telemetry group by 1"))
    assert set(per_device) == {"demo-1", "demo-2"} and min(per_device.values()) >= 2
    served = dict(db.execute("select device_id, sum(requests) from telemetry_variants "
                             "group by 1"))
    assert min(served.values()) > 100
