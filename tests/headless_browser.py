"""Drive headless Chromium over the DevTools protocol on a pipe (`--remote-debugging-pipe`: the browser reads
NUL-terminated JSON commands on fd 3 and writes replies and events on fd 4), so a test can load a page and read
its DOM once the page's scripts have finished, without a websocket library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

# Debian's /usr/bin/chromium is a shell wrapper; its binary comes first
BROWSERS = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


class Browser:
    def __init__(self, binary: str | None = None):
        binary = binary or find_browser()
        if binary is None:
            raise FileNotFoundError(f"no headless browser found (tried {', '.join(BROWSERS)})")
        self.profile = tempfile.mkdtemp(prefix="omni_jax_chromium_")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds():  # the browser expects its command pipe on fd 3 and its reply pipe on fd 4
            import fcntl

            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]  # avoid 3 / 4
            for target, fd in zip((3, 4), high):
                os.dup2(fd, target)  # dup2 onto another number: inheritable
                os.close(fd)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={self.profile}", "--autoplay-policy=no-user-gesture-required", "about:blank"],
            # close_fds=False keeps the dup2'd fds 3 and 4 (other fds of ours are non-inheritable, PEP 446)
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            while b"\0" not in self._buf:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError("the browser closed its DevTools pipe")
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise TimeoutError(method)

    def open(self, url: str) -> str:
        """Open url in a new tab; returns the DevTools session id of the tab."""
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        return self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, session: str, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                        session)
        return res["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout: float = 120.0, poll: float = 0.25):
        """Evaluate `expression` until it is truthy; returns its value."""
        deadline = time.time() + timeout
        while True:
            value = self.evaluate(session, expression)
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError(f"{expression!r} still false after {timeout} s")
            time.sleep(poll)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)
