"""A loopback stand-in for the parts of the Hugging Face Hub API that huggingface_hub calls for our donors.

The Hub is unreachable from our machines, so the tests point the real `huggingface_hub` client at this server
(HF_ENDPOINT) instead. It is a named stand-in for the remote service, not a mock of our code: collections,
`repo_info` (revision → commit), the recursive tree listing and `resolve/` file downloads, as the client asks for
them. It counts the downloads in flight per repo, so a test can check the bound on concurrent fetches.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class StandInHub:
    def __init__(self, file_delay_s: float = 0.0):
        self.repos: dict[str, dict] = {}  # repo -> {"refs": {ref: sha}, "commits": {sha: {file: bytes}}}
        self.collections: dict[str, list[dict]] = {}
        self.file_delay_s = file_delay_s
        self.requests: list[str] = []
        self.active: dict[str, int] = {}
        self.max_repos_in_flight = 0
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def publish(self, repo: str, folder: str | Path, ref: str = "main") -> str:
        """Add a commit holding `folder`'s files and point `ref` at it; returns the commit hash."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        state = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
        sha = hashlib.sha1(f"{repo}:{len(state['commits'])}".encode() + b"".join(files.values())).hexdigest()
        state["commits"][sha] = files
        state["refs"][ref] = sha
        return sha

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> "StandInHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 - http.server's naming
                hub._serve(self, body=False)

            def do_GET(self):  # noqa: N802
                hub._serve(self, body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()

    def _commit(self, repo: str, rev: str) -> str | None:
        state = self.repos.get(repo)
        if state is None:
            return None
        return rev if rev in state["commits"] else state["refs"].get(rev)

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        with self.lock:
            self.requests.append(f"{h.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "collections"]:
            items = self.collections.get("/".join(parts[2:4]))
            if items is None:
                return _send(h, 404, {"error": "Collection not found"}, body)
            return _send(h, 200, {
                "slug": "/".join(parts[2:4]), "title": parts[3], "owner": {"name": parts[2]}, "items": items,
                "lastUpdated": "2026-11-01T00:00:00.000Z", "position": 0, "private": False, "theme": "blue",
                "upvotes": 0,
            }, body)
        if parts[:2] == ["api", "models"] and len(parts) == 4:
            parts += ["revision", "main"]  # repo_info without a revision: the default branch
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, sha = "/".join(parts[2:4]), self._commit("/".join(parts[2:4]), parts[5])
            if sha is None:
                return _send(h, 404, {"error": "Repository or revision not found"}, body,
                             {"X-Error-Code": "RepoNotFound" if repo not in self.repos else "RevisionNotFound"})
            files = self.repos[repo]["commits"][sha]
            if parts[4] == "revision":
                return _send(h, 200, {"id": repo, "sha": sha, "private": False,
                                      "siblings": [{"rfilename": f} for f in files]}, body)
            return _send(h, 200, [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                  for f, b in files.items()], body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = "/".join(parts[:2])
            sha = self._commit(repo, parts[3])
            data = self.repos[repo]["commits"][sha].get("/".join(parts[4:])) if sha else None
            if data is None:
                return _send(h, 404, {"error": "Entry not found"}, body, {"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            if body:
                self._track(repo, +1)
                time.sleep(self.file_delay_s)
                self._track(repo, -1)
            return _send(h, 200, data, body, headers)
        return _send(h, 404, {"error": f"the stand-in does not serve {path}"}, body)

    def _track(self, repo: str, delta: int) -> None:
        with self.lock:
            self.active[repo] = self.active.get(repo, 0) + delta
            self.max_repos_in_flight = max(self.max_repos_in_flight, sum(1 for n in self.active.values() if n > 0))


def _send(h: BaseHTTPRequestHandler, status: int, payload, body: bool, headers: dict | None = None) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json")
    h.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        h.send_header(key, value)
    h.end_headers()
    if body:
        h.wfile.write(data)
