"""A loopback server that speaks enough of the Hugging Face Hub's HTTP API for the real `huggingface_hub` client.

Downloads (model and dataset repositories): revision info, the recursive tree, `resolve` (HEAD and GET, with `X-Repo-Commit`, `ETag` and
`X-Error-Code` headers), and the Hub's answers for missing, private (401 without a token) and gated (403)
repositories, revisions and files. Uploads: `create_repo`, card metadata validation, `preupload` (every file
"regular", so its bytes come inline) and `commit` (NDJSON lines with base64 contents).

Every request is recorded in `HubServer.log` as (method, repo, path), so tests assert on the files actually
transferred. Written with the standard library: no Hub emulator is packaged for tests (huggingface_hub's own
tests talk to a staging Hub).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

TOKEN = "hf_loopback_token"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    private: bool = False
    gated: bool = False


class HubServer:
    """The repositories, what was served and received, and the HTTP server thread (see `start`)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str]] = []  # (method, repo id, path or API route)
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None

    # ------------------------------------------------------------------ set-up from tests

    def reset(self) -> None:
        with self._lock:
            self.repos.clear()
            self.log.clear()

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", replace: bool = False,
               private: bool = False, gated: bool = False) -> str:
        """Add a commit on `branch` holding `files` on top of the branch's files (or only them with `replace`)."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private, gated=gated))
            parent = repo.commits.get(repo.refs.get(branch, ""), {})
            tree = dict(files) if replace else {**parent, **files}
            sha = hashlib.sha1(f"{repo_id}:{len(repo.commits)}:{sorted(tree)}".encode()).hexdigest()
            repo.commits[sha] = tree
            repo.refs[branch] = sha
            return sha

    def commit_folder(self, repo_id: str, folder: Path, prefix: str = "", **kwargs) -> str:
        files = {f"{prefix}{p.relative_to(folder).as_posix()}": p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.commit(repo_id, files, **kwargs)

    def downloaded(self, repo_id: str) -> list[str]:
        """Paths of `repo_id` whose contents were sent (GET on resolve)."""
        return sorted({path for method, repo, path in self.log if method == "GET" and repo == repo_id and not path.startswith("api:")})

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision, revision)]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"


class _HubError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


# Dataset repositories are kept under "datasets/<owner>/<name>" (`HubServer.commit("datasets/owner/name", ...)`).
_RESOLVE = re.compile(r"^/(?:models/)?(?P<type>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/(?:models/|(?P<type>datasets/))(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree|preupload|commit)/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$")


def _repo_key(match: re.Match) -> str:
    return (match["type"] or "") + match["repo"]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the hub records requests itself
        pass

    # ------------------------------------------------------------------ answers

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict[str, str]] = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, value, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _error(self, error: _HubError, head: bool = False) -> None:
        body = json.dumps({"error": str(error)}).encode()
        self._send(error.status, body, {"X-Error-Code": error.code, "X-Error-Message": str(error),
                                        "Content-Type": "application/json"}, head=head)

    # ------------------------------------------------------------------ lookups

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        if repo is None:
            raise _HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo.private and not authorized:
            raise _HubError(401, "RepoNotFound", "Invalid credentials in Authorization header")
        if repo.gated:
            raise _HubError(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the authorized list.")
        return repo

    def _commit(self, repo: Repo, revision: str) -> tuple[str, dict[str, bytes]]:
        revision = unquote(revision)
        sha = repo.refs.get(revision, revision)
        if sha not in repo.commits:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, repo.commits[sha]

    # ------------------------------------------------------------------ verbs

    def do_HEAD(self) -> None:
        self._download(head=True)

    def do_GET(self) -> None:
        path = urlparse(self.path).path
        if path.startswith("/api/"):
            return self._api_get(path)
        self._download(head=False)

    def _download(self, head: bool) -> None:
        match = _RESOLVE.match(urlparse(self.path).path)
        if not match:
            return self._error(_HubError(404, "EntryNotFound", f"No route {self.path}"), head)
        repo_id, path = _repo_key(match), unquote(match["path"])
        self.hub.log.append(("HEAD" if head else "GET", repo_id, path))
        try:
            sha, files = self._commit(self._repo(repo_id), match["rev"])
            if path not in files:
                raise _HubError(404, "EntryNotFound", f"Entry {path} not found")
        except _HubError as error:
            return self._error(error, head)
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Content-Type": "application/octet-stream"}
        self._send(200, data, headers, head=head)

    def _api_get(self, path: str) -> None:
        match = _API.match(path)
        if not match:
            return self._error(_HubError(404, "EntryNotFound", f"No route {path}"))
        repo_id = _repo_key(match)
        self.hub.log.append(("GET", repo_id, f"api:{match['kind'] or 'info'}"))
        try:
            sha, files = self._commit(self._repo(repo_id), match["rev"] or "main")
        except _HubError as error:
            return self._error(error)
        if match["kind"] == "tree":
            prefix = (match["path"] or "").strip("/")
            entries = [
                {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha(data)}
                for name, data in sorted(files.items())
                if not prefix or name.startswith(prefix + "/")
            ]
            return self._json(entries)
        self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": self.hub.repos[repo_id].private,
                    "siblings": [{"rfilename": name} for name in sorted(files)]})

    def do_POST(self) -> None:
        path = urlparse(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(_HubError(401, "Unauthorized", "Invalid credentials in Authorization header"))
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            self.hub.log.append(("POST", repo_id, "api:create"))
            if repo_id not in self.hub.repos:  # like the Hub, a new repository starts with one commit
                self.hub.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                                private=bool(request.get("private")))
            return self._json({"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        match = _API.match(path)
        if not match or match["kind"] not in ("preupload", "commit"):
            return self._error(_HubError(404, "EntryNotFound", f"No route {path}"))
        repo_id, revision = match["repo"], unquote(match["rev"])
        self.hub.log.append(("POST", repo_id, f"api:{match['kind']}"))
        if match["kind"] == "preupload":
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        added, deleted = {}, []
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(item["value"]["path"])
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(_HubError(404, "RepoNotFound", f"Repository {repo_id} not found"))
        parent = repo.commits.get(repo.refs.get(revision, ""), {})
        tree = {p: d for p, d in parent.items() if p not in deleted}
        tree.update(added)
        sha = self.hub.commit(repo_id, tree, branch=revision, replace=True)
        self._json({"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": None})
