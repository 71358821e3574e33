"""A fault-injecting HTTP proxy for the loopback S3 server: 500/503 answers, slow answers, dropped
connections and truncated bodies, on exactly the requests a test names.

Rules are matched in order by method and a substring of the path; each matching request takes the
rule's next action ("pass" forwards it untouched), and once a rule's actions are used up requests pass.
So ["503", "pass"] fails one attempt and lets botocore's retry through.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

ERROR_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}


@dataclass
class Rule:
    method: str
    path_contains: str
    actions: list[str]
    seen: list[str] = field(default_factory=list)  # "<action> <path>" per matching request

    def take(self, method: str, path: str) -> str | None:
        if method != self.method or self.path_contains not in path:
            return None
        action = self.actions[len(self.seen)] if len(self.seen) < len(self.actions) else "pass"
        self.seen.append(f"{action} {path}")
        return action

    @property
    def faults_injected(self) -> int:
        return sum(not s.startswith("pass ") for s in self.seen)


class FaultyProxy:
    """Forward every request to `upstream` (http://host:port) unless a rule says otherwise."""

    def __init__(self, upstream: str, slow_s: float = 2.0) -> None:
        self.upstream = urllib.parse.urlparse(upstream)
        self.rules: list[Rule] = []
        self.slow_s = slow_s
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                """The request body as sent (chunked framing kept, so it is forwarded byte for byte)."""
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:  # trailers, then the blank line
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    action = next((a for rule in proxy.rules if (a := rule.take(self.command, self.path))), "pass")
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if action.isdigit():
                    status = int(action)
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{ERROR_CODES.get(status, 'Error')}</Code>"
                           f"<Message>injected</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if action == "slow":
                    time.sleep(proxy.slow_s)
                status, headers, payload = proxy.forward(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                length = int(dict((k.lower(), v) for k, v in headers).get("content-length", len(payload)))
                self.send_header("Content-Length", str(length if self.command == "HEAD" else len(payload)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if action == "truncate":  # the full length announced, half the bytes sent, then the line goes dead
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def add(self, method: str, path_contains: str, actions: list[str]) -> Rule:
        rule = Rule(method, path_contains, actions)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
