"""The playground page (``GET /``) in a real headless Chromium, driven over the DevTools protocol.

The page is opened with its query parameters (model, prompt, ``run=1``), so it lists the models,
sends the request and renders the streamed answer by itself; the test waits for the page to say
it is done, then reads the answer, the stats line and takes a screenshot. The answer must be the
server's greedy answer to the same request, and must have arrived in several pieces (streamed).

Chromium speaks DevTools over a websocket; the few lines of client below (handshake, masked text
frames out, text frames in) avoid a websocket dependency. Skipped when no Chromium is installed.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from tests.serving_fixtures import KEY, serving  # noqa: F401 (the shared server fixture)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((path for name in BROWSERS if (path := shutil.which(name))), None)
if BROWSER is None and os.path.exists("/usr/bin/chromium"):
    BROWSER = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason=f"no headless browser installed (looked for {', '.join(BROWSERS)}); "
                            "install Chromium (apt-get install chromium) to run the playground test")


class DevTools:
    """A blocking DevTools-protocol client over one websocket (RFC 6455, text frames only)."""

    def __init__(self, ws_url: str, timeout: float = 30.0) -> None:
        url = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {url.path} HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(4096)
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        assert head.split(b"\r\n")[0].split()[1] == b"101", head
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        """Send one command and return its ``result`` (events arriving meanwhile are dropped)."""
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}).encode())
        while True:
            message = json.loads(self._receive())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def _send(self, payload: bytes) -> None:
        n = len(payload)
        length = bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 1 << 16
                                                     else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        mask = os.urandom(4)  # client frames are masked
        self.sock.sendall(bytes([0x81]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _receive(self) -> str:
        parts = []
        while True:
            b0, b1 = self._exactly(2)
            n = b1 & 0x7F
            if n >= 126:
                n = int.from_bytes(self._exactly(2 if n == 126 else 8), "big")
            payload = self._exactly(n)  # server frames are not masked
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the websocket")
            if opcode in (0x0, 0x1):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1000,720",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    port = None
    while port is None and time.monotonic() < deadline:  # "DevTools listening on ws://127.0.0.1:PORT/..."
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"{BROWSER} exited with {proc.returncode} before DevTools started")
        match = re.search(r"ws://127\.0\.0\.1:(\d+)/", line)
        port = int(match.group(1)) if match else None
    assert port, "Chromium never said where DevTools listens"
    pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
    tab = DevTools(pages[0]["webSocketDebuggerUrl"])
    yield tab
    tab.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_in_page(tab: DevTools, url: str, timeout: float = 60.0) -> str:
    tab.call("Page.enable")
    tab.call("Page.navigate", url=url)
    deadline = time.monotonic() + timeout
    while (state := tab.evaluate("document.body && document.body.dataset.state")) not in ("done", "error"):
        assert time.monotonic() < deadline, f"the page is still {state!r} after {timeout} s"
        time.sleep(0.05)
    return state


def test_playground_streams_an_answer_in_a_real_browser(serving, browser):  # noqa: F811
    url = serving["url"]
    prompt = "w5 w9 w17 w33"
    query = urllib.parse.urlencode({"model": "b", "mode": "completion", "prompt": prompt, "max_tokens": 24,
                                    "temperature": 0, "key": KEY, "run": 1})
    state = run_in_page(browser, f"{url}/?{query}")
    assert state == "done", browser.evaluate("document.getElementById('error').textContent")

    options = browser.evaluate("[...document.querySelectorAll('#model option')].map(o => o.textContent)")
    assert any(o.startswith("b ") and "adapter on" in o for o in options) and any("(base)" in o for o in options)
    answer = browser.evaluate("document.getElementById('answer').textContent")
    pieces = int(browser.evaluate("document.getElementById('answer').dataset.pieces || '0'"))
    stats = browser.evaluate("document.getElementById('stats').textContent")

    expected = httpx.post(f"{url}/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "b", "prompt": prompt, "max_tokens": 24, "temperature": 0}).json()
    text = expected["choices"][0]["text"]
    assert answer == text and text.strip()
    assert pieces > 1, "the answer arrived in one piece: the page did not stream"
    tokens = expected["usage"]["completion_tokens"]
    shown = rf"{tokens} tokens? in \d+\.\d\d s · \d+\.\d tokens/s · first token after \d+ ms"
    assert re.fullmatch(shown, stats), stats

    shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
    target = Path(os.environ.get("DELTATUNE_PLAYGROUND_SCREENSHOT") or Path(tempfile.gettempdir()) / "playground.png")
    target.write_bytes(shot)
