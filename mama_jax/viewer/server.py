"""The viewer's HTTP server (standard library): one static page and a small JSON API, on
127.0.0.1 only.

  GET  /              the page (static/index.html; no external request of any kind)
  GET  /api/info      tasks, their heads, class names and report sentences
  POST /api/analyze   body = one file's bytes, header X-Filename: crop, probabilities
  POST /api/map       {"id", "sentence"}: sentence-to-patch similarity maps

Uploads over the size limit are refused (413) and never stored. Each upload is
written only inside the server's temporary folder, read, and removed; the folder is
deleted when the server stops. Requests whose Host is not this machine are refused
(a web page elsewhere cannot reach the server through DNS rebinding).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mama_jax.viewer.analysis import Analyzer

HOST = "127.0.0.1"
STATIC = os.path.join(os.path.dirname(__file__), "static", "index.html")
_ALLOWED_HOSTS = ("127.0.0.1", "localhost")
_MAX_JSON = 64 * 1024
_DRAIN_FACTOR = 4  # bodies up to 4x the limit are read and dropped before the 413


class _Handler(BaseHTTPRequestHandler):
    server: "ViewerServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # no request log: file names are the user's own
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        # The page may load nothing from elsewhere: scripts, styles and images are inline.
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                         "img-src data:; connect-src 'self'")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host in _ALLOWED_HOSTS:
            return True
        self._json(HTTPStatus.FORBIDDEN, {"error": "the viewer answers on localhost only"})
        return False

    def _body(self, limit: int) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return None
        if length > limit:
            # Drained and dropped (never stored), so the client reads the 413 instead of a
            # broken pipe; a body far over the limit is cut off instead.
            if length <= _DRAIN_FACTOR * limit:
                while length > 0:
                    chunk = self.rfile.read(min(length, 1 << 20))
                    if not chunk:
                        break
                    length -= len(chunk)
            self.close_connection = True
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"file of {self.headers['Content-Length']} bytes is over the "
                                 f"{limit}-byte upload limit"})
            return None
        return self.rfile.read(length)

    def do_GET(self):  # noqa: N802
        if not self._host_ok():
            return
        path = urllib.parse.urlsplit(self.path).path
        if path == "/":
            with open(STATIC, "rb") as f:
                self._send(HTTPStatus.OK, f.read(), "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, {**self.server.analyzer.info(),
                                       "max_upload_bytes": self.server.max_upload_bytes})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {path}"})

    def do_POST(self):  # noqa: N802
        if not self._host_ok():
            return
        path = urllib.parse.urlsplit(self.path).path
        if path == "/api/analyze":
            data = self._body(self.server.max_upload_bytes)
            if data is None:
                return
            name = urllib.parse.unquote(self.headers.get("X-Filename", "upload"))[:300]
            self._json(HTTPStatus.OK, self.server.analyzer.analyze(name, data))
        elif path == "/api/map":
            data = self._body(_MAX_JSON)
            if data is None:
                return
            try:
                req = json.loads(data)
                self._json(HTTPStatus.OK, self.server.analyzer.sentence_maps(str(req["id"]),
                                                                             str(req["sentence"])))
            except (ValueError, KeyError, TypeError) as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path}"})


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model, port: int = 8000, *, max_upload_mb: float = 128):
        self.upload_dir = tempfile.mkdtemp(prefix="mama_viewer_")
        self.analyzer = Analyzer(model, self.upload_dir)
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        super().__init__((HOST, port), _Handler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    def server_close(self) -> None:
        super().server_close()
        shutil.rmtree(self.upload_dir, ignore_errors=True)

    def start_background(self) -> threading.Thread:
        """Serve from a daemon thread (tests); stop with shutdown() then server_close()."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread
