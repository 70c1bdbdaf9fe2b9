"""A small W3C WebDriver client for headless Chromium through chromedriver.

Enough for the dashboard tests: open a page, run a script in it, click, type, wait for a
condition in the page, take a screenshot. Plain JSON over HTTP to a chromedriver this
helper starts on a free loopback port, so no client library is needed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


def _which(names: tuple[str, ...], what: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{what} is needed: `make deps` installs it (Debian packages chromium "
                "chromium-driver)", pytrace=False)


def chromium() -> str:
    return _which(("chromium", "chromium-browser", "google-chrome"), "headless Chromium")


def chromedriver() -> str:
    return _which(("chromedriver",), "chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WebDriverError(AssertionError):
    pass


class Browser:
    """One headless Chromium session; ``close()`` ends it and its chromedriver."""

    def __init__(self, profile: Path, width: int = 1440, height: int = 1000):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [chromedriver(), f"--port={self.port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.session: str | None = None
        try:
            self._wait_ready()
            args = ["--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--no-first-run", "--disable-sync", "--hide-scrollbars",
                    f"--user-data-dir={profile}", f"--window-size={width},{height}"]
            value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium(), "args": args},
                "goog:loggingPrefs": {"browser": "ALL"},
            }}})
            self.session = value["sessionId"]
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise WebDriverError(f"chromedriver exited with {self.proc.returncode}")
            with contextlib.suppress(OSError, WebDriverError):
                if self._call("GET", "/status").get("ready"):
                    return
            time.sleep(0.05)
        raise WebDriverError("chromedriver did not become ready")

    def _call(self, method: str, path: str, body: Any = None, timeout_s: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            try:
                v = json.loads(e.read())["value"]
                msg = f"{v.get('error')}: {v.get('message', '')[:500]}"
            except (ValueError, KeyError):
                msg = str(e)
            raise WebDriverError(f"{method} {path}: {msg}") from None

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    # -- what a test does ---------------------------------------------------------------
    def open(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments`` holds ``args``) in the page."""
        return self._call("POST", self._s("/execute/sync"), {"script": script,
                                                             "args": list(args)})

    def wait(self, script: str, *args: Any, timeout_s: float = 20, what: str = "") -> Any:
        """Poll ``script`` in the page until it returns something truthy; that value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.run(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise WebDriverError(f"timed out waiting for {what or script}")
            time.sleep(0.05)

    def element(self, css: str) -> str:
        value = self._call("POST", self._s("/element"), {"using": "css selector", "value": css})
        return str(value[ELEMENT])

    def click(self, css: str) -> None:
        self._call("POST", self._s(f"/element/{self.element(css)}/click"), {})

    def type(self, css: str, text: str) -> None:
        eid = self.element(css)
        self._call("POST", self._s(f"/element/{eid}/clear"), {})
        self._call("POST", self._s(f"/element/{eid}/value"), {"text": text})

    def console_errors(self) -> list[str]:
        """Errors the page logged (uncaught exceptions, failed loads) since the last call."""
        entries = self._call("POST", self._s("/se/log"), {"type": "browser"})
        return [e["message"] for e in entries if e.get("level") == "SEVERE"]

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """A PNG of the viewport, or of the whole page with ``full_page``."""
        if full_page:
            w, h = self.run("return [document.documentElement.scrollWidth,"
                            " document.documentElement.scrollHeight]")
            shot = self._call("POST", self._s("/goog/cdp/execute"), {
                "cmd": "Page.captureScreenshot",
                "params": {"captureBeyondViewport": True,
                           "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}},
            })["data"]
        else:
            shot = self._call("GET", self._s("/screenshot"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot))
        return path

    def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(OSError, WebDriverError):
                self._call("DELETE", self._s(""), timeout_s=20)
            self.session = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
