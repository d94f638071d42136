"""A small local server speaking the Hugging Face Hub protocol, for tests and offline demos.

It is driven by the real ``huggingface_hub`` client through ``HF_ENDPOINT`` and implements the
subset that ``create_repo``, ``create_branch``, ``upload_folder``/``create_commit`` (regular files
and basic LFS transfers), ``model_info``, ``list_repo_tree``/``list_repo_files``,
``list_repo_refs``, ``list_repo_commits``, ``hf_hub_download`` and ``snapshot_download`` use.

Clients must run with ``HF_HUB_DISABLE_XET=1``: the server never advertises Xet storage.

State lives in a directory: ``blobs/<sha256>`` (content addressed) and ``state.json`` (repos,
branches, and every commit's full tree), so a restarted server serves the same repos and old
commit ids stay downloadable.

Usage::

    with HubServer(storage_dir) as server:
        os.environ["HF_ENDPOINT"] = server.url
        ...

    python -m qalora_hf.testing.hub_server --port 8765 --storage DIR [--verbose]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

USER_NAME = "local-user"
LFS_EXTENSIONS = (".safetensors", ".bin", ".png", ".jpg", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".npz")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_INITIAL_GITATTRIBUTES = (b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                          b"*.bin filter=lfs diff=lfs merge=lfs -text\n")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob with content ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An HTTP error answered to the client, with the Hub's ``X-Error-Code`` convention."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class _Store:
    """Repos, branches, commits and blobs, persisted under ``root``. All methods hold ``lock``."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.state_path = root / "state.json"
        self.lock = threading.RLock()
        self.repos: dict = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    # -- persistence -------------------------------------------------------------------------
    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.repos))
        os.replace(tmp, self.state_path)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def put_blob(self, data: bytes) -> str:
        return self.put_blob_stream([data])

    def put_blob_stream(self, chunks, expected_sha256: str | None = None) -> str:
        """Store a blob from an iterable of byte chunks, hashing on the fly; returns its sha256."""
        digest = hashlib.sha256()
        tmp = self.blobs / f".upload.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
            sha = digest.hexdigest()
            if expected_sha256 is not None and sha != expected_sha256:
                raise HubError(400, f"sha256 of uploaded content is {sha}, expected {expected_sha256}")
            os.replace(tmp, self.blob_path(sha))
            return sha
        finally:
            tmp.unlink(missing_ok=True)

    # -- lookups -----------------------------------------------------------------------------
    def repo(self, repo_id: str) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def resolve(self, repo_id: str, revision: str) -> str:
        """Commit id for a branch name or a full commit sha."""
        repo = self.repo(repo_id)
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def tree(self, repo_id: str, revision: str) -> tuple[str, dict]:
        commit = self.resolve(repo_id, revision)
        return commit, self.repos[repo_id]["commits"][commit]["tree"]

    # -- mutations ---------------------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool) -> None:
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo")
            self.repos[repo_id] = {"private": private, "created": _now(), "branches": {}, "commits": {}}
            sha = self.put_blob(_INITIAL_GITATTRIBUTES)
            entry = {"sha256": sha, "size": len(_INITIAL_GITATTRIBUTES), "lfs": False,
                     "oid": git_blob_sha1(_INITIAL_GITATTRIBUTES)}
            self._add_commit(repo_id, "main", None, {".gitattributes": entry}, "initial commit", "")
            self._save()

    def create_branch(self, repo_id: str, branch: str, starting_point: str | None) -> None:
        with self.lock:
            repo = self.repo(repo_id)
            if branch in repo["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo["branches"][branch] = self.resolve(repo_id, starting_point or "main")
            self._save()

    def commit(self, repo_id: str, branch: str, ops: list[dict]) -> str:
        with self.lock:
            repo = self.repo(repo_id)
            header = next((op["value"] for op in ops if op.get("key") == "header"), {})
            if _COMMIT_SHA.fullmatch(branch) and branch in repo["commits"]:
                raise HubError(400, "Cannot commit to a commit id: revision must be a branch", "RevisionNotFound")
            if branch not in repo["branches"]:
                repo["branches"][branch] = repo["branches"]["main"]
            parent = repo["branches"][branch]
            expected = header.get("parentCommit")
            if expected and expected != parent:
                raise HubError(412, f"Parent commit {expected} is not the head of {branch} ({parent})")
            tree = dict(repo["commits"][parent]["tree"])
            for op in ops:
                key, value = op.get("key"), op.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    tree[path] = {"sha256": self.put_blob(data), "size": len(data), "lfs": False,
                                  "oid": git_blob_sha1(data)}
                elif key == "lfsFile":
                    sha = value["oid"]
                    if not self.has_blob(sha):
                        raise HubError(422, f"LFS object {sha} for {path} was never uploaded")
                    size = self.blob_path(sha).stat().st_size
                    tree[path] = {"sha256": sha, "size": size, "lfs": True,
                                  "oid": git_blob_sha1(_lfs_pointer(sha, size))}
                elif key == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    tree = {p: e for p, e in tree.items() if not p.startswith(prefix)}
                elif key != "header":
                    raise HubError(400, f"Unsupported commit operation {key!r}")
            commit = self._add_commit(repo_id, branch, parent, tree, header.get("summary", ""),
                                      header.get("description", ""))
            self._save()
            return commit

    def _add_commit(self, repo_id: str, branch: str, parent: str | None, tree: dict, title: str, message: str) -> str:
        date = _now()
        body = json.dumps([parent, sorted((p, e["oid"]) for p, e in tree.items()), title, message, date])
        commit = hashlib.sha1(body.encode()).hexdigest()
        repo = self.repos[repo_id]
        repo["commits"][commit] = {"parent": parent, "tree": tree, "title": title, "message": message, "date": date}
        repo["branches"][branch] = commit
        return commit


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.0"  # one request per connection: no stale keep-alive sockets on stop()

    # -- plumbing ----------------------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        logger.debug("%s %s", self.address_string(), format % args)

    def _iter_body(self):
        """Yield the request body in chunks (Content-Length or chunked transfer encoding), once."""
        if self._body_consumed:
            return
        self._body_consumed = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: dict | None = None, content_type: str = "application/json"):
        self._send(status, json.dumps(payload).encode(), headers, content_type)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.replace("\n", " ").encode("ascii", "replace").decode()}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._json({"error": err.message}, err.status, headers)

    def _dispatch(self) -> None:
        self._body_consumed = False
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.parts = [unquote(p) for p in url.path.strip("/").split("/")]
        self.server.record(self.command, url.path)
        try:
            fault = self.server.take_fault(url.path)
            if fault is not None:
                raise HubError(fault["status"], fault["message"])
            self._route()
        except HubError as err:
            for _ in self._iter_body():  # drain, so the client reads the answer instead of a reset
                pass
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("client went away during %s %s", self.command, url.path)
        except Exception as err:  # answer 500 rather than dropping the connection
            logger.exception("hub server error on %s %s", self.command, url.path)
            for _ in self._iter_body():
                pass
            self._error(HubError(500, f"Internal error: {type(err).__name__}"))

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # -- routing -----------------------------------------------------------------------------
    def _require_auth(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _check_read(self, repo_id: str) -> None:
        if self.store.repo(repo_id)["private"] and "Authorization" not in self.headers:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")

    @property
    def store(self) -> _Store:
        return self.server.store

    def _route(self) -> None:
        p, method = self.parts, self.command
        body = b"".join(self._iter_body()) if method == "POST" else b""
        if p == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if p == ["api", "agent-harnesses"] and method == "GET":  # fetched by huggingface_hub's user-agent code
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if p == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if p == ["api", "validate-yaml"] and method == "POST":  # upload_folder/create_commit check README.md first
            return self._validate_yaml(json.loads(body or b"{}"))
        if p[0] == "lfs-upload" and len(p) == 2 and method == "PUT":
            return self._lfs_put(p[1])
        if len(p) >= 4 and p[:2] == ["api", "models"]:
            repo_id, rest = f"{p[2]}/{p[3]}", p[4:]
            action, arg = (rest[0] if rest else None), "/".join(rest[1:])
            if method == "GET" and action in (None, "revision"):
                return self._model_info(repo_id, arg or "main")
            if method == "GET" and action == "tree" and rest[1:]:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if method == "GET" and action == "refs":
                return self._refs(repo_id)
            if method == "GET" and action == "commits" and arg:
                return self._commits(repo_id, arg)
            if method == "POST" and action == "preupload" and arg:
                return self._preupload(repo_id, arg, json.loads(body))
            if method == "POST" and action == "commit" and arg:
                return self._commit(repo_id, arg, body)
            if action in ("xet-write-token", "xet-read-token"):
                raise HubError(501, "Xet storage is not supported by this server: run the client with "
                                    "HF_HUB_DISABLE_XET=1 (set before huggingface_hub is imported)")
            if method == "POST" and action == "branch" and arg:
                self._require_auth()
                self.store.create_branch(repo_id, arg, json.loads(body or b"{}").get("startingPoint"))
                return self._json({})
        if len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            return self._lfs_batch(f"{p[0]}/{p[1][:-4]}", json.loads(body))
        if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        raise HubError(404, f"No route for {method} /{'/'.join(p)}")

    # -- endpoints ---------------------------------------------------------------------------
    def _whoami(self) -> None:
        self._require_auth()
        self._json({"type": "user", "name": USER_NAME, "fullname": "Local User", "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}})

    def _validate_yaml(self, payload: dict) -> None:
        """The README.md front matter must be a YAML mapping (the Hub also checks known keys; this does not)."""
        import yaml

        match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", payload.get("content", ""), re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
            if not isinstance(meta, (dict, type(None))):
                raise ValueError("metadata must be a YAML mapping")
        except (yaml.YAMLError, ValueError) as err:
            message = f"Invalid YAML metadata: {str(err).splitlines()[0]}"
            return self._json({"error": message, "errors": [{"message": message}], "warnings": []}, 400)
        warnings = [] if meta else [{"message": "Empty or missing yaml metadata in repo card"}]
        self._json({"errors": [], "warnings": warnings})

    def _create_repo(self, payload: dict) -> None:
        self._require_auth()
        if payload.get("type", "model") != "model":
            raise HubError(400, "Only model repos are supported by this server")
        repo_id = f"{payload.get('organization') or USER_NAME}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        try:
            self.store.create_repo(repo_id, payload.get("visibility", "public") == "private")
        except HubError as err:
            return self._json({"error": err.message, "url": url}, err.status, {"X-Error-Message": err.message})
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, revision: str) -> None:
        self._check_read(repo_id)
        with self.store.lock:
            repo = self.store.repo(repo_id)
            commit, tree = self.store.tree(repo_id, revision)
            siblings = [self._sibling(path, entry) for path, entry in sorted(tree.items())]
            self._json({"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                        "sha": commit, "private": repo["private"], "disabled": False, "gated": False,
                        "downloads": 0, "likes": 0, "tags": [], "createdAt": repo["created"],
                        "lastModified": repo["commits"][commit]["date"], "siblings": siblings})

    @staticmethod
    def _sibling(path: str, entry: dict) -> dict:
        sibling = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
        if entry["lfs"]:
            pointer = _lfs_pointer(entry["sha256"], entry["size"])
            sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": len(pointer)}
        return sibling

    def _tree(self, repo_id: str, revision: str, path: str) -> None:
        self._check_read(repo_id)
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        with self.store.lock:
            _, tree = self.store.tree(repo_id, revision)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"Path {path} not found at {revision}", "EntryNotFound")
        files, folders = {}, set()
        for file_path, entry in tree.items():
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files[file_path] = entry
        listing = []
        for folder in sorted(folders):
            content = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(folder + "/"))
            listing.append({"type": "directory", "path": folder, "size": 0,
                            "oid": hashlib.sha1(json.dumps(content).encode()).hexdigest()})
        for file_path, entry in sorted(files.items()):
            item = {"type": "file", "path": file_path, "size": entry["size"], "oid": entry["oid"]}
            if entry["lfs"]:
                pointer = _lfs_pointer(entry["sha256"], entry["size"])
                item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)}
            listing.append(item)
        self._json(listing)

    def _refs(self, repo_id: str) -> None:
        self._check_read(repo_id)
        with self.store.lock:
            branches = self.store.repo(repo_id)["branches"]
            refs = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit}
                    for name, commit in sorted(branches.items())]
        self._json({"branches": refs, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, repo_id: str, revision: str) -> None:
        self._check_read(repo_id)
        with self.store.lock:
            commit = self.store.resolve(repo_id, revision)
            commits, history = self.store.repo(repo_id)["commits"], []
            while commit is not None:
                info = commits[commit]
                history.append({"id": commit, "title": info["title"], "message": info["message"],
                                "date": info["date"], "authors": [{"user": USER_NAME}]})
                commit = info["parent"]
        self._json(history)

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        self._require_auth()
        with self.store.lock:
            self.store.repo(repo_id)
            try:
                _, tree = self.store.tree(repo_id, revision)
            except HubError:  # branch will be created by the commit
                _, tree = self.store.tree(repo_id, "main")
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample", ""))
            lfs = path.lower().endswith(LFS_EXTENSIONS) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample
            mode = "lfs" if lfs else "regular"
            existing = tree.get(path)
            oid = None
            if existing is not None and existing["lfs"] == lfs:
                oid = existing["sha256"] if lfs else existing["oid"]
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": files, "commitOid": None})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        self._require_auth()
        if self.query.get("create_pr", "0") not in ("0", "false", "False"):
            raise HubError(400, "create_pr is not supported by the local hub server")
        ops = [json.loads(line) for line in body.splitlines() if line.strip()]
        commit = self.store.commit(repo_id, revision, ops)
        self._json({"success": True, "commitOid": commit, "commitUrl": f"{self.server.url}/{repo_id}/commit/{commit}",
                    "hookOutput": "", "pullRequestUrl": None})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        self._require_auth()
        self.store.repo(repo_id)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported")
        objects = []
        for obj in payload.get("objects", []):
            item = {"oid": obj["oid"], "size": int(obj["size"]), "authenticated": True}
            if not self.store.has_blob(obj["oid"]):
                item["actions"] = {"upload": {"href": f"{self.server.url}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(item)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        self.store.put_blob_stream(self._iter_body(), expected_sha256=oid)
        self._send(200)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        self._check_read(repo_id)
        with self.store.lock:
            commit, tree = self.store.tree(repo_id, revision)
        entry = tree.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=commit)
        size = entry["size"]
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                   "ETag": f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and size > 0:
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            elif last:
                start = max(size - int(last), 0)
            if start > end:
                raise HubError(416, "Requested range not satisfiable")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1 if size else 0))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET" and size:
            with open(self.store.blob_path(entry["sha256"]), "rb") as blob:
                blob.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    chunk = blob.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: _Store):
        super().__init__(address, _Handler)
        self.store = store
        self.url = f"http://{address[0]}:{self.server_address[1]}"
        self._faults: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self._meta_lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:  # default prints tracebacks to stderr
        logger.debug("connection error from %s", client_address, exc_info=True)

    def record(self, method: str, path: str) -> None:
        with self._meta_lock:
            self.requests.append((method, path))

    def take_fault(self, path: str) -> dict | None:
        with self._meta_lock:
            for fault in self._faults:
                if fault["remaining"] > 0 and (fault["path_contains"] is None or fault["path_contains"] in path):
                    fault["remaining"] -= 1
                    return fault
        return None


class HubServer:
    """A Hugging Face Hub-protocol server on 127.0.0.1, running in a daemon thread.

    Args:
        storage_dir: Directory holding blobs and repo state. ``None`` uses a temporary directory
            that is deleted on ``stop()``.
        host: Interface to bind; only loopback (``127.0.0.1``/``localhost``) is allowed.
        port: TCP port; ``0`` picks a free one.

    Attributes:
        url: Base URL to use as ``HF_ENDPOINT`` (set once started).
        requests: ``(method, path)`` of every request received, in order.
    """

    def __init__(self, storage_dir: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 0):
        if host not in _LOOPBACK_HOSTS:
            raise ValueError(f"HubServer only binds loopback; got host={host!r}, use '127.0.0.1'")
        self._host, self._port = "127.0.0.1", port
        self._tmp = None if storage_dir is not None else tempfile.mkdtemp(prefix="hub-server-")
        self.storage_dir = Path(storage_dir if storage_dir is not None else self._tmp)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HubServer is not started")
        return self._server.url

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(self._server.requests) if self._server else []

    @property
    def pending_faults(self) -> int:
        """Number of injected failures not yet served."""
        return sum(f["remaining"] for f in self._server._faults) if self._server else 0

    def fail_next(self, n: int, status: int = 503, *, path_contains: str | None = None,
                  message: str = "Service temporarily unavailable (injected fault)") -> None:
        """Answer the next ``n`` matching requests with ``status`` instead of serving them.

        Args:
            n: How many requests to fail.
            status: HTTP status to answer (e.g. 503, 429, 401, 403).
            path_contains: Only fail requests whose URL path contains this substring.
            message: Error message put in the JSON body and ``X-Error-Message``.
        """
        with self._server._meta_lock:
            self._server._faults.append({"remaining": n, "status": status, "path_contains": path_contains,
                                         "message": message})

    def start(self) -> "HubServer":
        """Bind the socket and serve in a daemon thread. Returns ``self``."""
        if self._server is not None:
            return self
        self._server = _Server((self._host, self._port), _Store(self.storage_dir))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="hub-server",
                                        daemon=True)
        self._thread.start()
        logger.info("local hub server listening on %s (storage %s)", self.url, self.storage_dir)
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and remove the temporary storage, if any."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local Hugging Face Hub-protocol server (127.0.0.1 only).")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (0 picks a free one)")
    parser.add_argument("--storage", default=None, help="state directory (default: temporary, deleted on exit)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    server = HubServer(args.storage, port=args.port).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the cleanup below on `kill`
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
