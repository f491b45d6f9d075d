"""A small local stand-in for the Hugging Face Hub, speaking the part of its HTTP API that `huggingface_hub`
uses to create a model repo, commit files (regular uploads, no LFS) and download them.

Test-only: in-memory, one content per repo (branches and pull requests are accepted and recorded in `requests`, not
kept apart), thread per request, bound to 127.0.0.1. `fail_commits` makes every
commit answer 507 (Insufficient Storage), to test what a failed push does: a server error that huggingface_hub does
not retry (it retries 500, 502, 503 and 504 for ~25 s, its behaviour, not ours to test).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.fail_commits = False
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def commit(self, repo: str, files: dict[str, bytes], deleted: list[str]) -> str:
        with self.lock:
            content = self.repos.setdefault(repo, {})
            content.update(files)
            for path in deleted:
                content.pop(path, None)
            digest = hashlib.sha1(self.commits.get(repo, "").encode())
            for path in sorted(content):
                digest.update(path.encode() + hashlib.sha1(content[path]).digest())
            self.commits[repo] = digest.hexdigest()
            return self.commits[repo]


def _split_repo_path(parts: list[str]) -> tuple[str, list[str]]:
    """`namespace/name/rest...` or `name/rest...` (no namespace): the repo id and the rest."""
    markers = {"resolve", "preupload", "commit", "revision", "tree", "branch"}
    if len(parts) > 1 and parts[1] in markers:
        return parts[0], parts[1:]
    return "/".join(parts[:2]), parts[2:]


class HubHandler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload: object) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def _get(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.state.requests.append(f"{self.command} {path}")
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "models"]:
            repo, rest = _split_repo_path(parts[2:])
            if repo not in self.state.repos:
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)
            files = self.state.repos[repo]
            if rest[:1] == ["tree"]:
                return self._json(200, [{"type": "file", "path": p, "size": len(b)} for p, b in sorted(files.items())])
            info = {"id": repo, "modelId": repo, "sha": self.state.commits[repo], "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(files)]}  # fmt: skip
            return self._json(200, info)
        repo, rest = _split_repo_path(parts)
        if rest[:1] == ["resolve"] and len(rest) >= 3:
            file_path = "/".join(rest[2:])
            files = self.state.repos.get(repo)
            if files is None:
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)
            if file_path not in files:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            data = files[file_path]
            headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": self.state.commits[repo],
                       "Content-Type": "application/octet-stream"}  # fmt: skip
            return self._send(200, data, headers, head)
        self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)

    def do_POST(self) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        self.state.requests.append(f"POST {path}" + (f"?{url.query}" if url.query else ""))
        body = self._body()
        parts = [p for p in path.split("/") if p]
        if parts == ["api", "repos", "create"]:
            request = json.loads(body or b"{}")
            repo = "/".join(filter(None, [request.get("organization"), request["name"]]))
            if repo not in self.state.repos:
                self.state.commit(repo, {}, [])
            return self._json(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo})
        if parts == ["api", "validate-yaml"]:
            return self._json(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"]:
            repo, rest = _split_repo_path(parts[2:])
            if repo not in self.state.repos:
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"})
            if rest[:1] == ["branch"]:  # one content per repo: a branch is only recorded in `requests`
                return self._json(200, {})
            if rest[:1] == ["preupload"]:
                files = json.loads(body)["files"]
                answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._json(200, {"files": answer, "commitOid": self.state.commits[repo]})
            if rest[:1] == ["commit"]:
                if self.state.fail_commits:
                    return self._json(507, {"error": "Insufficient Storage (test: fail_commits)"})
                files, deleted = {}, []
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] in ("deletedFile", "deletedFolder"):
                        deleted.append(item["value"]["path"])
                oid = self.state.commit(repo, files, deleted)
                host = self.headers["Host"]
                return self._json(200, {"commitUrl": f"http://{host}/{repo}/commit/{oid}", "commitOid": oid,
                                        "pullRequestUrl": None})  # fmt: skip
        self._send(404, b"", {"X-Error-Code": "EntryNotFound"})


def start_hub_server() -> tuple[ThreadingHTTPServer, HubState, str]:
    """Serve on a free port of 127.0.0.1 in a daemon thread: (server, state, endpoint URL)."""
    state = HubState()
    handler = type("Handler", (HubHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"
