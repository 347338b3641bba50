"""`kvhead dashboards push` against a small local stand-in for Grafana's HTTP API (no Grafana
server can be installed here): the endpoints push uses, with Grafana's status codes and bodies
for a refused token, a missing folder and a version conflict."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from dashboards.catalog import DASHBOARDS
from dashboards.push import FOLDER_UID, PushError, push
from kvhead.cli import app

TOKEN = "glsa_test_token"


class FakeGrafana(ThreadingHTTPServer):
    """Grafana's save semantics: an existing uid is replaced only with overwrite or with the
    version Grafana holds; otherwise 412 version-mismatch."""

    def __init__(self, editor: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.editor = editor
        self.folders: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class Handler(BaseHTTPRequestHandler):
    server: FakeGrafana

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._reply(401, {"message": "invalid API key"})
            return False
        return True

    def do_GET(self) -> None:
        if self.path == "/api/health":
            return self._reply(200, {"database": "ok", "version": "11.6.0"})
        if not self._authorised():
            return None
        if self.path == "/api/org":
            return self._reply(200, {"id": 1, "name": "Main Org."})
        if self.path.startswith("/api/folders/"):
            uid = self.path.rsplit("/", 1)[1]
            if uid in self.server.folders:
                return self._reply(200, self.server.folders[uid])
            return self._reply(404, {"message": "folder not found"})
        return self._reply(404, {"message": "Not found"})

    def do_POST(self) -> None:
        if not self._authorised():
            return None
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.server.editor:
            return self._reply(403, {"message": "Access denied"})
        if self.path == "/api/folders":
            self.server.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"]}
            return self._reply(200, self.server.folders[body["uid"]])
        if self.path == "/api/dashboards/db":
            return self._save(body)
        return self._reply(404, {"message": "Not found"})

    def _save(self, body: dict) -> None:
        dashboard = body["dashboard"]
        if body.get("folderUid") not in self.server.folders:
            return self._reply(400, {"message": "folder not found"})
        held = self.server.dashboards.get(dashboard["uid"])
        if held and not body.get("overwrite") and dashboard.get("version") != held["version"]:
            return self._reply(
                412,
                {
                    "message": "The dashboard has been changed by someone else",
                    "status": "version-mismatch",
                },
            )
        version = held["version"] + 1 if held else 1
        self.server.dashboards[dashboard["uid"]] = dashboard | {"version": version}
        url = f"/d/{dashboard['uid']}/x"
        return self._reply(200, {"uid": dashboard["uid"], "url": url, "version": version})


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    with serving(FakeGrafana()) as server:
        yield server


def test_push_creates_folder_and_every_dashboard(grafana: FakeGrafana) -> None:
    pushed = push(grafana.url, TOKEN)
    assert FOLDER_UID in grafana.folders
    assert sorted(grafana.dashboards) == sorted(d.uid for d in DASHBOARDS)
    assert [p.version for p in pushed] == [1, 1, 1]
    assert pushed[0].url == f"{grafana.url}/d/{pushed[0].uid}/x"
    held = grafana.dashboards["kvhead-serving"]
    assert held["title"] == "kvhead / Serving" and held["panels"]


def test_second_push_is_a_version_conflict_unless_overwrite(grafana: FakeGrafana) -> None:
    push(grafana.url, TOKEN)
    with pytest.raises(PushError, match="version conflict.*--overwrite"):
        push(grafana.url, TOKEN)
    pushed = push(grafana.url, TOKEN, overwrite=True)
    assert [p.version for p in pushed] == [2, 2, 2]


def test_refused_token(grafana: FakeGrafana) -> None:
    with pytest.raises(PushError, match=r"refused the token \(401\)"):
        push(grafana.url, "wrong")
    assert not grafana.dashboards


def test_token_without_editor_role() -> None:
    with serving(FakeGrafana(editor=False)) as server:
        with pytest.raises(PushError, match=r"403.*Editor role"):
            push(server.url, TOKEN)


def test_bad_urls() -> None:
    with pytest.raises(PushError, match="not an http"):
        push("grafana:3000", TOKEN)
    with pytest.raises(PushError, match="cannot reach Grafana"):
        push(closed_port_url(), TOKEN)


def test_a_server_that_is_not_grafana() -> None:
    class NotFound(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>nothing here</html>")

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), NotFound)) as server:
        with pytest.raises(PushError, match="Grafana's base URL"):
            push(f"http://127.0.0.1:{server.server_port}", TOKEN)


def test_cli_reports_one_line_and_exit_2(grafana: FakeGrafana) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["dashboards", "push", "--url", grafana.url, "--token", TOKEN])
    assert ok.exit_code == 0, ok.output
    assert "kvhead / Serving" in ok.output
    again = runner.invoke(app, ["dashboards", "push", "--url", grafana.url, "--token", TOKEN])
    assert again.exit_code == 2
    assert "version conflict" in again.output and "Traceback" not in again.output


def closed_port_url() -> str:
    """A URL on 127.0.0.1 whose port nothing listens on."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.server_close()
    return f"http://127.0.0.1:{server.server_port}"
