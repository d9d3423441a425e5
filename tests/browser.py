"""A real headless browser for the tests: Debian's Chromium, driven over the Chrome DevTools
Protocol through ``--remote-debugging-pipe`` (JSON messages ended by NUL bytes on file
descriptors 3 and 4, as Puppeteer's ``pipe: true`` does). No driver binary, no port, no
pip package: the standard library and the system ``chromium``.

    with Browser(tmp_path) as b:
        b.open("file:///.../index.html")
        b.eval("document.title")
        png = b.screenshot()
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL_HINT = "install Debian's package: `apt-get update -qq && apt-get install -y -qq chromium` (`make test` does it)"
CJK_FONT_PACKAGE = "fonts-noto-cjk"  # Debian's Noto Sans CJK: what shows label_3396.txt's Chinese names


def require_cjk_font() -> None:
    """Noto Sans CJK on the system (fontconfig), or a test failure saying how to get it."""
    found = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, check=False).stdout
    if "Noto Sans CJK" not in found:
        pytest.fail(
            f"Noto Sans CJK not found (fc-list :lang=zh): install Debian's {CJK_FONT_PACKAGE} "
            f"(`apt-get install -y -qq {CJK_FONT_PACKAGE}`; `make test` does it)",
            pytrace=False,
        )


def chromium_path() -> str:
    """The system Chromium, or a test failure (never a skip: CI installs it) saying how to get it."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"Chromium not found on PATH ({', '.join(CHROMIUM_NAMES)}); {INSTALL_HINT}", pytrace=False)


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page (a tab), for ``open``, ``eval``, ``type`` and ``screenshot``."""

    def __init__(self, profile_dir: Path, width: int = 1280, height: int = 1600, timeout_s: float = 20.0):
        self.timeout_s = timeout_s
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        cmd = [
            chromium_path(),
            "--headless",
            "--no-sandbox",  # we run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--mute-audio",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--user-data-dir={profile_dir}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.log_path = Path(profile_dir).with_suffix(".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())

        def wire_fds() -> None:  # in the child: Chromium reads commands on fd 3 and writes replies on fd 4
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)  # dup2 makes them inheritable; every other pipe end is close-on-exec
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=wire_fds,
            close_fds=False,  # closing would happen after wire_fds and take 3 and 4 with it
            start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        try:
            target = self.send("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.send("Page.enable", session=True)
            self.send("Runtime.enable", session=True)
            self.send("Network.enable", session=True)
        except Exception:
            self.close()
            raise

    # -- the protocol -------------------------------------------------------------------------
    def send(self, method: str, session: bool = False, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read(deadline, f"{method}")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def _read(self, deadline: float, waiting_for: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(
                    f"no answer from Chromium to {waiting_for} within {self.timeout_s} s; {self._tail()}"
                )
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError(f"Chromium closed the pipe (exit {self.proc.poll()}); {self._tail()}")
                self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while True:
            for i, event in enumerate(self._events):
                if event["method"] == method:
                    return self._events.pop(i)
            self._events.append(self._read(deadline, method))

    def _tail(self) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")[-2000:]
        return f"Chromium's log ({self.log_path}) ends: {text!r}"

    # -- what the tests use -------------------------------------------------------------------
    def open(self, url: str) -> None:
        """Loads ``url`` and waits for its load event (scripts have run by then)."""
        self._events.clear()
        result = self.send("Page.navigate", session=True, url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        if "loaderId" not in result:
            raise BrowserError(f"{url} is the page already open, another fragment: no load to wait for")
        self.wait_event("Page.loadEventFired")

    def requested_urls(self) -> list[str]:
        """Every URL the page asked for since ``open`` (as far as the replies read so far tell)."""
        return [e["params"]["request"]["url"] for e in self._events if e["method"] == "Network.requestWillBeSent"]

    def wait_until(self, expression: str, timeout_s: float = 30.0):
        """Polls a JavaScript expression until it is truthy (e.g. lazy images that load after the
        load event); returns its last value, truthy or not, after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.eval(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.1)

    def eval(self, expression: str):
        """The JSON value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def type(self, selector: str, text: str) -> None:
        """Focuses ``selector``, clears it, and types ``text`` as keyboard input (real input events)."""
        found = self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false;"
            " e.focus(); e.select(); return true; })()"
        )
        if not found:
            raise BrowserError(f"no element matches {selector}")
        self.send(
            "Input.dispatchKeyEvent",
            session=True,
            type="keyDown",
            key="Backspace",
            code="Backspace",
            windowsVirtualKeyCode=8,
        )
        self.send(
            "Input.dispatchKeyEvent",
            session=True,
            type="keyUp",
            key="Backspace",
            code="Backspace",
            windowsVirtualKeyCode=8,
        )
        if text:
            self.send("Input.insertText", session=True, text=text)

    def fonts(self, selector: str) -> dict[str, int]:
        """{font family: glyphs drawn with it} for the text of the first element matching
        ``selector``, as Chromium laid it out (DevTools' "Rendered Fonts")."""
        self.send("DOM.enable", session=True)
        self.send("CSS.enable", session=True)
        root = self.send("DOM.getDocument", session=True, depth=0)["root"]["nodeId"]
        node = self.send("DOM.querySelector", session=True, nodeId=root, selector=selector)["nodeId"]
        if not node:
            raise BrowserError(f"no element matches {selector}")
        fonts = self.send("CSS.getPlatformFontsForNode", session=True, nodeId=node)["fonts"]
        return {f["familyName"]: f["glyphCount"] for f in fonts}

    def screenshot(self) -> bytes:
        """A PNG of the whole page."""
        data = self.send("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
