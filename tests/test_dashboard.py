"""The dashboard page of a real ``serve``, rendered by headless Chromium: it lists the
devices, variants and online count, shows device-provided strings as text, asks for a
token when it has none or a wrong one, and needs nothing from the internet."""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import urllib.request
from importlib import resources
from pathlib import Path

import pytest
from fleet_helpers import wait_for
from rollout_helpers import Fleet
from test_metrics import FakeDevices

from prunefleet.shared.messages import ReportedState

AGENTS = ["dash-agent-0", "dash-agent-1"]
XSS = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'
OFFLINE = "dash-offline-1"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed: `make deps` installs it (Debian packages "
                "chromium chromium-driver)",
                pytrace=False)


def render(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The DOM after the page ran for 8 s of virtual time."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update",
           "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
           "--virtual-time-budget=8000", "--window-size=1400,900"]
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    r = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HOME": str(profile)})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def served(tmp_path_factory, mosquitto):
    tmp = tmp_path_factory.mktemp("dashboard")
    f = Fleet(tmp, mosquitto.url)
    f.start_server()
    fake = FakeDevices(mosquitto.url, f.prefix)
    try:
        f.serve_two_variants(AGENTS, requests=5)
        fake.report("dash-evil", active_variant="small", last_error=XSS)
        fake.publish(fake.topics.reported(OFFLINE),
                     ReportedState(device_id=OFFLINE, online=False).encode(), retain=True)
        wait_for(lambda: {d.device_id for d in f.svc.store.devices()}
                 >= {*AGENTS, "dash-evil", OFFLINE}, 10, what="every device known")
        wait_for(lambda: f.svc.store.telemetry_summary()["variants"].get("small", {})
                 .get("requests", 0) + f.svc.store.telemetry_summary()["variants"]
                 .get("big", {}).get("requests", 0) >= 10, 15, what="requests stored")
        yield f, tmp
    finally:
        fake.close()
        f.close()


def test_page_lists_devices_variants_and_online_count(served):
    f, tmp = served
    dom = render(f"{f.svc.url}/dashboard#token={f.svc.token}", tmp / "profile-1")
    for d in (*AGENTS, "dash-evil", OFFLINE):
        assert f'data-device="{d}"' in dom, d
    online = sum(d.online for d in f.svc.store.devices())
    assert online == 3
    assert f"4 devices: {online} online, 1 offline" in dom
    for v in ("small", "big"):
        assert f'<tr data-variant="{v}"><td>{v}</td>' in dom, v
    requests = f.svc.store.telemetry_summary()["variants"]["small"]["requests"]
    assert f'<td>small</td><td class="num">{8 * 64 + 80:,}</td>' in dom
    assert f'<td class="num">{requests}</td>' in dom
    assert "completed" in dom  # the rollout
    assert "cannot reach the server" not in dom
    assert 'id="token-form" hidden' in dom
    assert f.svc.token not in dom


def test_device_strings_are_rendered_as_text(served):
    f, tmp = served
    dom = render(f"{f.svc.url}/dashboard#token={f.svc.token}", tmp / "profile-2")
    # The serialised DOM escapes text: the payload is there, as characters, not elements.
    assert html.escape(XSS, quote=False) in dom
    assert "<img" not in dom and "pwned</script>" not in dom
    assert "<title>prunefleet</title>" in dom


def test_page_without_or_with_a_wrong_token_asks_for_one(served):
    f, tmp = served
    dom = render(f"{f.svc.url}/dashboard", tmp / "profile-3")
    assert 'id="token-form"' in dom and 'id="token-form" hidden' not in dom
    assert 'id="content" hidden' in dom and "dash-agent-0" not in dom
    dom = render(f"{f.svc.url}/dashboard#token=wrong-token-of-some-length", tmp / "profile-4")
    assert "The server refused that token." in dom and "dash-agent-0" not in dom


def test_page_is_self_contained_and_shipped_in_the_package(served):
    f, tmp = served
    with urllib.request.urlopen(f"{f.svc.url}/dashboard", timeout=10) as r:
        page = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "http:" not in page and "https:" not in page
    static = resources.files("prunefleet.server") / "static"
    for name in ("dashboard.html", "dashboard.css", "dashboard.js"):
        text = (static / name).read_text()
        assert "https://" not in text and "http://" not in text, name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text, name
    # Only the page's own files are served.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{f.svc.url}/dashboard/static/..%2Fapi.py", timeout=10)
    assert e.value.code == 404

    shot = tmp / "dashboard.png"
    render(f"{f.svc.url}/dashboard#token={f.svc.token}", tmp / "profile-5", screenshot=shot)
    assert shot.stat().st_size > 10_000
    if os.environ.get("PRUNEFLEET_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["PRUNEFLEET_KEEP_SCREENSHOT"])
