"""A fault-injecting S3 proxy for tests: S3 as it behaves at scale, in front of a real S3 server.

    python tests/faulty_s3.py --upstream http://127.0.0.1:PORT --log FILE [--seed 22] [--slowdown 0.1]
        [--reset 0.02] [--latency_ms 20,200] [--internal 0] [--short 0] [--match TEXT] [--limit N]

It listens on loopback only (a port of its own, printed as ``listening on http://127.0.0.1:PORT``
once it accepts connections) and forwards every request to ``--upstream`` (moto's server), except:

- a ``--slowdown`` fraction of requests is answered ``503 SlowDown`` with S3's XML error body, without
  reaching the upstream (S3 did not do the work);
- a ``--reset`` fraction is forwarded (the upstream did the work), then the answer is cut short: the
  status line, the headers and half of the body (or half of the headers when there is no body) go out,
  then the connection is reset (TCP RST);
- every request waits a random ``--latency_ms`` (uniform in [lo, hi]) before anything else;
- off by default: an ``--internal`` fraction is answered ``500 InternalError`` (not forwarded), and a
  ``--short`` fraction of ranged GETs gets only the first half of its bytes, with a Content-Length
  that matches them (a server that answers less than was asked, which no checksum of the
  transfer itself catches).

The draws come from one ``random.Random(seed)``, in the order the requests arrive. With ``--match``,
faults (not latency) touch only requests whose method and path contain that text (``PUT /bucket/out/``);
with ``--limit N``, only the first N such faults happen.

Every request is one JSON line in ``--log``: ``{"n", "method", "path", "range", "fault", "status", "latency_ms"}``
(``fault`` null, "slowdown" or "reset"; ``status`` the upstream's). ``GET /__faults__`` returns the
settings and counts; ``POST /__faults__`` with a JSON object changes any of ``slowdown``, ``reset``,
``latency_ms``, ``internal``, ``short``, ``match``, ``limit`` and ``seed`` while it runs. Standard library only, so that it runs with the
tests' Python; ``FaultyS3`` starts one as a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import random
import re
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

CONTROL_PATH = "/__faults__"  # bucket names cannot contain "_": no S3 request ever looks like this
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect", "proxy-connection"}
ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>{rid}</RequestId><HostId>{host}</HostId></Error>"
)
ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class Faults:
    """The proxy's settings and what it did; every draw happens under the lock, in arrival order."""

    seed: int = 22
    slowdown: float = 0.1
    reset: float = 0.02
    latency_ms: tuple[float, float] = (20.0, 200.0)
    internal: float = 0.0
    short: float = 0.0
    match: str | None = None
    limit: int | None = None  # faults left to do (None: no limit)
    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.counts = {"requests": 0, "slowdown": 0, "reset": 0, "internal": 0, "short": 0}

    def draw(self, request_line: str, ranged_get: bool) -> tuple[int, str | None, float]:
        """(request number, fault or None, latency in seconds) for the next request."""
        with self.lock:
            n = self.counts["requests"]
            self.counts["requests"] += 1
            u, latency = self.rng.random(), self.rng.uniform(*self.latency_ms) / 1000.0
            fault = None
            if (self.match is None or self.match in request_line) and self.limit != 0:
                edge = 0.0
                for name in ("slowdown", "reset", "internal", "short"):
                    edge += getattr(self, name)
                    if u < edge:
                        fault = name
                        break
                if fault == "short" and not ranged_get:
                    fault = None
            if fault:
                self.counts[fault] += 1
                if self.limit is not None:
                    self.limit -= 1
            return n, fault, latency

    def update(self, changes: dict) -> None:
        with self.lock:
            for key in ("slowdown", "reset", "internal", "short", "match", "limit"):
                if key in changes:
                    setattr(self, key, changes[key])
            if "latency_ms" in changes:
                self.latency_ms = tuple(float(x) for x in changes["latency_ms"])
            if "seed" in changes:
                self.seed = int(changes["seed"])
                self.rng = random.Random(self.seed)

    def describe(self) -> dict:
        with self.lock:
            keys = ("seed", "slowdown", "reset", "latency_ms", "internal", "short", "match", "limit")
            return {**{k: getattr(self, k) for k in keys}, "counts": dict(self.counts)}


class ProxyServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, upstream: str, faults: Faults, log_path: Path):
        super().__init__(address, ProxyHandler)
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.faults = faults
        self.log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (open for the server's life)
        self.log_lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (a job killed mid-request) is no error of the proxy's."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def log(self, entry: dict) -> None:
        with self.log_lock:
            self.log_file.write(json.dumps(entry) + "\n")
            self.log_file.flush()


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: ProxyServer

    def setup(self) -> None:
        super().setup()
        self.upstream_conn: http.client.HTTPConnection | None = None
        self.reset_now = False

    def log_message(self, format: str, *args) -> None:  # the JSON log says it all
        pass

    def do_GET(self) -> None:
        self.proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def proxy(self) -> None:
        body = self.read_body()
        if self.path.split("?", 1)[0] == CONTROL_PATH:
            self.control(body)
            return
        ranged_get = self.command == "GET" and "Range" in self.headers
        n, fault, latency = self.server.faults.draw(f"{self.command} {self.path}", ranged_get)
        time.sleep(latency)
        entry = {"n": n, "method": self.command, "path": self.path, "range": self.headers.get("Range")}
        entry |= {"fault": fault, "status": None, "latency_ms": round(latency * 1000, 1)}
        if fault in ERRORS:
            entry["status"] = ERRORS[fault][0]
            self.server.log(entry)  # before the answer: a client that has it finds it in the log
            self.error(*ERRORS[fault])
            return
        status, headers, data = self.forward(body)
        entry["status"] = status
        self.server.log(entry)
        if fault == "reset":
            self.cut_short(status, headers, data)
        elif fault == "short" and status == 206:
            shown = [(k, v) for k, v in headers if k.lower() != "content-range"]
            self.answer(status, shown, data[: len(data) // 2])
        else:
            self.answer(status, headers, data)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have been closed meanwhile
            if self.upstream_conn is None:
                self.upstream_conn = http.client.HTTPConnection(*self.server.upstream, timeout=120)
            try:
                self.upstream_conn.request(self.command, self.path, body=body, headers=headers)
                resp = self.upstream_conn.getresponse()
                data = resp.read()
                return resp.status, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                self.upstream_conn.close()
                self.upstream_conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def head_lines(self, status: int, headers: list[tuple[str, str]], length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'Unknown')}"]
        for key, value in headers:
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                lines.append(f"{key}: {value}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def content_length(self, headers: list[tuple[str, str]], data: bytes) -> int:
        if self.command == "HEAD":  # no body, but the length of the one a GET would get
            return int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        return len(data)

    def answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        payload = b"" if self.command == "HEAD" else data
        self.wfile.write(self.head_lines(status, headers, self.content_length(headers, data)) + payload)
        self.wfile.flush()

    def cut_short(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        """Half of the answer, then a TCP reset: the client has the headers and part of the body."""
        head = self.head_lines(status, headers, self.content_length(headers, data))
        payload = b"" if self.command == "HEAD" else data
        sent = head + payload[: len(payload) // 2] if payload else head[: len(head) // 2]
        self.wfile.write(sent)
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.reset_now = True
        self.close_connection = True

    def error(self, status: int, code: str, message: str) -> None:
        """S3's XML error answer; the request never reaches the upstream."""
        rid = uuid.uuid4().hex[:16].upper()
        body = ERROR_BODY.format(code=code, message=message, rid=rid, host=uuid.uuid4().hex).encode()
        self.answer(status, [("Content-Type", "application/xml"), ("x-amz-request-id", rid)], body)

    def control(self, body: bytes) -> None:
        if self.command in ("POST", "PUT") and body:
            self.server.faults.update(json.loads(body))
        data = json.dumps(self.server.faults.describe()).encode()
        self.answer(200, [("Content-Type", "application/json")], data)

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the client may be gone
            super().finish()
        if self.reset_now:  # the last reference to the socket: closing it with linger 0 sends RST
            self.connection.close()
        if self.upstream_conn is not None:
            self.upstream_conn.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="the real S3 server, http://HOST:PORT")
    p.add_argument("--log", required=True, help="JSON lines, one per request")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--seed", type=int, default=22)
    p.add_argument("--slowdown", type=float, default=0.1)
    p.add_argument("--reset", type=float, default=0.02)
    p.add_argument("--latency_ms", default="20,200", help="LO,HI")
    p.add_argument("--internal", type=float, default=0.0, help="fraction answered 500 InternalError")
    p.add_argument("--short", type=float, default=0.0, help="fraction of ranged GETs answered with half their bytes")
    p.add_argument("--match", default=None, help="fault only requests whose 'METHOD /path?query' contains this")
    p.add_argument("--limit", type=int, default=None, help="at most this many faults")
    args = p.parse_args(argv)
    lo, hi = (float(x) for x in args.latency_ms.split(","))
    faults = Faults(args.seed, args.slowdown, args.reset, (lo, hi), args.internal, args.short, args.match, args.limit)
    server = ProxyServer(("127.0.0.1", args.port), args.upstream, faults, Path(args.log))
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


# --- for tests: the proxy as a subprocess ---------------------------------------------------------


class FaultyS3:
    """A running proxy (``start``): its ``endpoint``, its log, and its settings, changeable live."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, log_path: Path):
        self.proc, self.endpoint, self.log_path = proc, endpoint, log_path

    @classmethod
    def start(cls, upstream: str, log_path: Path, *, seed: int = 22, slowdown: float = 0.1, reset: float = 0.02,
              latency_ms: tuple[float, float] = (20, 200), internal: float = 0.0, short: float = 0.0,
              match: str | None = None, limit: int | None = None) -> FaultyS3:  # fmt: skip
        cmd = [sys.executable, __file__, "--upstream", upstream, "--log", str(log_path), "--seed", str(seed)]
        cmd += ["--slowdown", str(slowdown), "--reset", str(reset), "--latency_ms", f"{latency_ms[0]},{latency_ms[1]}"]
        cmd += ["--internal", str(internal), "--short", str(short)]
        if match is not None:
            cmd += ["--match", match]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        found = re.search(r"listening on (http://\S+)", line)
        if not found:
            proc.kill()
            raise RuntimeError(f"the faulty S3 proxy did not start: {line!r}")
        return cls(proc, found.group(1), log_path)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def control(self, changes: dict | None = None) -> dict:
        import urllib.request

        data = json.dumps(changes).encode() if changes else None
        req = urllib.request.Request(self.endpoint + CONTROL_PATH, data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def mark(self) -> int:
        """The number of requests so far: ``entries(since=mark)`` are those made after it."""
        return self.control()["counts"]["requests"]

    def entries(self, since: int = 0) -> list[dict]:
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [e for e in (json.loads(line) for line in lines if line) if e["n"] >= since]


if __name__ == "__main__":
    main()
