"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for tests.

It serves the endpoints huggingface_hub 2.x calls to create a repo, upload a folder and download
files, so our code and huggingface_hub run unchanged against it (``HF_ENDPOINT=server.url``):

    POST /api/repos/create                          create a model repo (409 if it exists)
    POST /api/validate-yaml                         README metadata check (parses the YAML)
    POST /api/models/{repo}/preupload/{rev}         upload mode per file: always "regular"
    POST /api/models/{repo}/commit/{rev}            NDJSON commit, base64 file contents
    GET  /api/models/{repo}[/revision/{rev}]        repo info (sha, siblings)
    GET  /api/agent-harnesses                       the user-agent registry (empty)
    HEAD/GET /{repo}/resolve/{rev}/{path}           file download with X-Repo-Commit, ETag

Files are kept in memory per repo with their commit history. ``fail_next`` injects HTTP errors,
``stop()``/``start()`` take the server down and up on the same port (the store survives), and
``requests``/``auth`` record what the client sent. Requests to anything else get a 404 and are
listed in ``unhandled``, so a test can assert that the client needed nothing more.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file's content, what the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    # ---------------------------------------------------------------- plumbing
    def _reply(
        self, status: int, body: bytes | dict | None = None, headers: dict | None = None, head: bool = False
    ) -> None:
        if isinstance(body, dict) or isinstance(body, list):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        body = body or b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._reply(status, {"error": message}, headers, head=head)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _record(self) -> tuple[str, str] | None:
        """Log the request; answer an injected failure. Returns (method, path) or None if answered."""
        hub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        with hub.lock:
            hub.requests.append((self.command, path))
            if self.headers.get("Authorization"):
                hub.auth.append(self.headers["Authorization"])
            failure = next((f for f in hub.fail if re.search(f[0], f"{self.command} {path}")), None)
            if failure is not None:
                failure[2] -= 1
                if failure[2] <= 0:
                    hub.fail.remove(failure)
        if failure is not None:
            self._body()
            self._error(failure[1], "injected failure", head=self.command == "HEAD")
            return None
        if hub.require_token and self.headers.get("Authorization") != f"Bearer {hub.require_token}":
            self._body()
            self._error(401, "Invalid credentials in Authorization header", head=self.command == "HEAD")
            return None
        return self.command, path

    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def _dispatch(self) -> None:
        req = self._record()
        if req is None:
            return
        method, path = req
        hub = self.server.hub
        routes = [
            ("GET", r"/api/agent-harnesses", self._agent_harnesses),
            ("POST", r"/api/repos/create", self._create),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self._info),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for m, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                fn(**match.groupdict())
                return
        with hub.lock:
            hub.unhandled.append((method, path))
        self._body()
        self._error(404, f"stand-in Hub has no route for {method} {path}", head=method == "HEAD")

    def _repo(self, repo: str, head: bool = False) -> Repo | None:
        r = self.server.hub.repos.get(repo)
        if r is None:
            self._body()
            self._error(404, "Repository not found", "RepoNotFound", head=head)
        return r

    # ---------------------------------------------------------------- endpoints
    def _agent_harnesses(self) -> None:
        # huggingface_hub >= 2 fetches this registry for its user agent; an empty one detects nothing
        self._reply(200, {"standardEnvVars": [], "harnesses": {}})

    def _create(self) -> None:
        hub = self.server.hub
        payload = json.loads(self._body())
        repo_id = (
            f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        )
        url = f"{hub.url}/{repo_id}"
        with hub.lock:
            if repo_id in hub.repos:
                self._reply(409, {"error": "You already created this model repo", "url": url})
                return
            repo = Repo(
                repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private"))
            )
            repo.commits.append(
                hub.new_commit("initial commit", {".gitattributes": b"*.safetensors filter=lfs\n"})
            )
            hub.repos[repo_id] = repo
        self._reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        try:
            data = yaml.safe_load(m.group(1)) if m else {}
            if not isinstance(data, dict):
                raise ValueError("metadata must be a mapping")
        except (yaml.YAMLError, ValueError) as e:
            self._reply(400, {"errors": [{"message": str(e)}], "warnings": []})
            return
        self._reply(200, {"errors": [], "warnings": []})

    def _preupload(self, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        files = json.loads(self._body())["files"]
        head = r.at(rev) or r.head
        out = []
        for f in files:
            existing = head.files.get(f["path"])
            out.append(
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        self._reply(200, {"files": out, "commitOid": head.oid})

    def _commit(self, repo: str, rev: str) -> None:
        hub = self.server.hub
        r = self._repo(repo)
        if r is None:
            return
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        with hub.lock:
            files = dict(r.head.files)
            for item in lines:
                if item["key"] == "file":
                    v = item["value"]
                    assert v["encoding"] == "base64", v
                    files[v["path"]] = base64.b64decode(v["content"])
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
                elif item["key"] != "header":
                    self._error(400, f"stand-in Hub does not support {item['key']!r} commit items")
                    return
            commit = hub.new_commit(header["summary"], files)
            r.commits.append(commit)
        self._reply(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{hub.url}/{repo}/commit/{commit.oid}",
                "pullRequestUrl": None,
            },
        )

    def _info(self, repo: str, rev: str | None = None) -> None:
        r = self._repo(repo)
        if r is None:
            return
        c = r.at(rev or "main")
        if c is None:
            self._error(404, "Invalid rev id", "RevisionNotFound")
            return
        self._reply(
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": c.oid,
                "private": r.private,
                "siblings": [{"rfilename": p} for p in sorted(c.files)],
            },
        )

    def _resolve(self, repo: str, rev: str, file: str) -> None:
        head = self.command == "HEAD"
        r = self._repo(repo, head=head)
        if r is None:
            return
        c = r.at(rev)
        if c is None:
            self._error(404, "Invalid rev id", "RevisionNotFound", head=head)
            return
        data = c.files.get(file)
        if data is None:
            self._error(404, "Entry not found", "EntryNotFound", head=head)
            return
        headers = {
            "X-Repo-Commit": c.oid,
            "ETag": f'"{git_blob_oid(data)}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        self._reply(200, data, headers, head=head)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: StandInHub

    def __init__(self, *args, **kwargs):
        self.connections: set[socket.socket] = set()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Close kept-alive client connections too, or a stopped server would still answer on them."""
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class StandInHub:
    """In-memory Hub: ``with StandInHub() as hub: ... HF_ENDPOINT=hub.url ...``."""

    def __init__(self, port: int = 0):
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.auth: list[str] = []
        self.fail: list[list] = []  # [regex on "METHOD /path", status, times left]; see fail_next
        self.require_token: str | None = None
        self._port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._n = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def fail_next(self, pattern: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``pattern`` ("POST /api/...") with ``status``."""
        with self.lock:
            self.fail.append([pattern, status, times])

    def new_commit(self, message: str, files: dict[str, bytes]) -> Commit:
        self._n += 1
        oid = hashlib.sha1(f"{self._n}:{message}".encode() + repr(sorted(files)).encode()).hexdigest()
        return Commit(oid, message, files)

    def start(self) -> StandInHub:
        self._httpd = _Server(("127.0.0.1", self._port), _Handler)
        self._httpd.hub = self
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.drop_connections()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> StandInHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
