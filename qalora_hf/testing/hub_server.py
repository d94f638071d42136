"""A small local server speaking the Hugging Face Hub protocol, for tests and offline demos.

It is driven by the real ``huggingface_hub`` client through ``HF_ENDPOINT`` and implements the
subset that ``create_repo``, ``create_branch``, ``upload_folder``/``create_commit`` (regular files
and basic LFS transfers), ``model_info``, ``list_repo_tree``/``list_repo_files``,
``list_repo_refs``, ``list_repo_commits``, ``hf_hub_download`` and ``snapshot_download`` use.

Clients must run with ``HF_HUB_DISABLE_XET=1``: the server never advertises Xet storage.

State lives in a directory: ``blobs/<sha256>`` (content addressed) and ``state.json`` (repos,
branches, and every commit's full tree), so a restarted server serves the same repos and old
commit ids stay downloadable. One server at a time may use a directory (it holds a lock on it);
partial uploads are removed when they fail and swept at start-up after a kill.

Safety (docs/hub_server.md): it binds loopback only; every request is checked before storage
is touched: repo ids, branch names and revisions (git ref rules), file paths (no ``..``, no
absolute or backslash paths, no empty segments, no control characters) and LFS oids (64 lowercase
hex). Writes need ``Authorization: Bearer <token>`` with a token the server was configured with and
write access to the repo's namespace; private repos are readable only with such a token (404
otherwise, as on the Hub); an ``Authorization`` header holding anything else is answered 401.
LFS uploads go to signed, size-bound URLs handed out by the (authenticated) batch endpoint.

Usage::

    with HubServer(storage_dir, token="hf_...", namespaces=["local-user", "my-org"]) as server:
        os.environ["HF_ENDPOINT"] = server.url
        ...

    HF_TOKEN=hf_... python -m qalora_hf.testing.hub_server --port 8765 --storage DIR \
        [--namespace local-user ...] [--verbose]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

try:  # POSIX: one server per storage directory
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

USER_NAME = "local-user"
LFS_EXTENSIONS = (".safetensors", ".bin", ".png", ".jpg", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".npz")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_OID = re.compile(r"[0-9a-f]{64}")
# Hub repo names (same rule as qalora_hf.hub): letters, digits, '-', '_', '.', not at the ends, no '--'/'..'.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")  # git check-ref-format: controls, space, ~^:?*[\\
_PATH_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_PATH_BYTES = 1024
_MAX_REF_BYTES = 255
MAX_JSON_BODY_BYTES = 256 * 1024 * 1024  # commit payloads carry regular (< 10 MB) files base64-encoded
MAX_LFS_OBJECT_BYTES = 64 * 1024**3
UPLOAD_URL_TTL_S = 3600
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


# -- input checks: every name that reaches storage or the state goes through one of these ---------------
def check_name(name, what: str = "repo name") -> str:
    """A namespace or repo name: ``[A-Za-z0-9._-]``, 1-96 characters, alphanumeric at both ends, no ``--``/``..``.

    Raises:
        HubError: 400, saying which rule is broken.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or "--" in name or ".." in name:
        raise HubError(400, f"Invalid {what} {name!r}: use 1-96 letters, digits, '-', '_' or '.', starting and "
                            "ending with a letter or digit, without '--' or '..'")
    return name


def check_repo_id(namespace, name) -> str:
    """``namespace/name`` after :func:`check_name` on both parts."""
    return f"{check_name(namespace, 'namespace')}/{check_name(name)}"


def check_ref(ref, what: str = "branch name") -> str:
    """A branch name or revision following ``git check-ref-format`` (the Hub applies git's rules).

    Refused: empty or over 255 bytes, a leading ``-`` or ``/``, a trailing ``/`` or ``.``, ``..``, ``//``,
    ``@{``, the name ``@``, a component starting with ``.`` or ending with ``.lock``, control characters,
    space and any of ``~^:?*[\\``.

    Raises:
        HubError: 400, saying which rule is broken.
    """
    problem = None
    if not isinstance(ref, str) or not ref:
        problem = "it is empty"
    elif len(ref.encode()) > _MAX_REF_BYTES:
        problem = f"it is longer than {_MAX_REF_BYTES} bytes"
    elif _REF_FORBIDDEN.search(ref):
        problem = "it contains a control character, a space or one of ~^:?*[\\"
    elif ref.startswith(("-", "/")) or ref.endswith(("/", ".")):
        problem = "it starts with '-' or '/', or ends with '/' or '.'"
    elif ".." in ref or "//" in ref or "@{" in ref or ref == "@":
        problem = "it contains '..', '//' or '@{', or is '@'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in ref.split("/")):
        problem = "a '/'-separated component starts with '.' or ends with '.lock'"
    if problem:
        raise HubError(400, f"Invalid {what} {ref!r}: {problem} (git ref name rules)")
    return ref


def check_path(path, *, allow_root: bool = False) -> str:
    """A file path inside a repo: relative, ``/``-separated, no empty, ``.``, ``..`` or ``.git`` segment.

    Refused also: a leading ``/`` or drive letter (absolute), any backslash, control characters (NUL
    included) and more than 1024 bytes. ``allow_root`` accepts ``""`` (the repo root, for tree listings).

    Raises:
        HubError: 400, saying which rule is broken.
    """
    if allow_root and path == "":
        return path
    problem = None
    if not isinstance(path, str) or not path:
        problem = "it is empty"
    elif len(path.encode()) > _MAX_PATH_BYTES:
        problem = f"it is longer than {_MAX_PATH_BYTES} bytes"
    elif _PATH_CONTROL.search(path):
        problem = "it contains a control character"
    elif "\\" in path:
        problem = "it contains a backslash; separate folders with '/'"
    elif path.startswith("/") or re.match(r"[A-Za-z]:", path):
        problem = "it is absolute; give it relative to the repo root"
    elif any(part in ("", ".", "..") for part in path.split("/")):
        problem = "it has an empty, '.' or '..' segment"
    elif any(part == ".git" for part in path.split("/")):
        problem = "it is inside '.git'"
    if problem:
        raise HubError(400, f"Invalid path {path!r}: {problem}")
    return path


def check_oid(oid) -> str:
    """An LFS object id: a sha256 as exactly 64 lowercase hex characters.

    Raises:
        HubError: 400.
    """
    if not isinstance(oid, str) or not _OID.fullmatch(oid):
        raise HubError(400, f"Invalid LFS oid {str(oid)[:80]!r}: expected a sha256, 64 lowercase hex characters")
    return oid


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_LFS_OBJECT_BYTES:
        raise HubError(400, f"Invalid LFS object size {size!r}: expected an integer in [0, {MAX_LFS_OBJECT_BYTES}]")
    return size


def _check_tokens(tokens: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    checked = {}
    for token, namespaces in tokens.items():
        if not isinstance(token, str) or not token or _REF_FORBIDDEN.search(token) or len(token) > 1024:
            raise ValueError("a HubServer token must be a non-empty string without spaces or control characters")
        namespaces = (namespaces,) if isinstance(namespaces, str) else tuple(namespaces)
        if not namespaces:
            raise ValueError("each HubServer token needs at least one namespace (its user name comes first)")
        for namespace in namespaces:
            try:
                check_name(namespace, "namespace")
            except HubError as err:
                raise ValueError(err.message) from None
        checked[token] = namespaces
    return checked


class _Store:
    """Repos, branches, commits and blobs, persisted under ``root``. All methods hold ``lock``."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock_storage()
        self.state_path = root / "state.json"
        self.lock = threading.RLock()
        self.repos: dict = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.sweep_partial_uploads()

    def _lock_storage(self) -> int | None:
        if fcntl is None:  # pragma: no cover
            return None
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(f"hub storage {str(self.root)!r} is in use by another hub server: stop that one "
                               "or pass another storage directory") from None
        return fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def sweep_partial_uploads(self) -> int:
        """Delete upload temp files a killed server left behind (only this server uses the storage)."""
        stale = list(self.blobs.glob(".upload.*.tmp")) + list(self.root.glob("state.*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            logger.warning("removed %d partial upload(s) left by an earlier server in %s", len(stale), self.blobs)
        return len(stale)

    # -- persistence -------------------------------------------------------------------------
    def _save(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix="state.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(self.repos))
            os.replace(tmp, self.state_path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / check_oid(sha256)  # never a path outside blobs/, even from an old state.json

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def put_blob(self, data: bytes) -> str:
        return self.put_blob_stream([data])

    def put_blob_stream(self, chunks, expected_sha256: str | None = None, expected_size: int | None = None) -> str:
        """Store a blob from an iterable of byte chunks, hashing on the fly; returns its sha256.

        The bytes go to a ``.upload.*.tmp`` file beside the blobs that is renamed into place only when the
        content matches ``expected_sha256``/``expected_size``, and deleted on any failure (client gone,
        timeout, mismatch, disk full). ``expected_size`` also bounds how much is written.
        """
        if expected_sha256 is not None:
            check_oid(expected_sha256)
        digest, size = hashlib.sha256(), 0
        fd, name = tempfile.mkstemp(dir=self.blobs, prefix=".upload.", suffix=".tmp")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if expected_size is not None and size > expected_size:
                        raise HubError(400, f"Uploaded content is larger than the announced {expected_size} bytes")
                    digest.update(chunk)
                    try:
                        out.write(chunk)
                    except OSError as err:  # disk full, read-only, ...: the client is told, the temp file goes
                        raise HubError(507, f"Hub server cannot store the upload: {err.strerror or err}") from None
            sha = digest.hexdigest()
            if expected_size is not None and size != expected_size:
                raise HubError(400, f"Uploaded content has {size} bytes, expected {expected_size}")
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
        check_ref(revision, "revision")
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
        check_ref(branch)
        if _COMMIT_SHA.fullmatch(branch):
            raise HubError(400, f"Invalid branch name {branch!r}: a 40-hex name would be taken for a commit id")
        with self.lock:
            repo = self.repo(repo_id)
            if branch in repo["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo["branches"][branch] = self.resolve(repo_id, starting_point or "main")
            self._save()

    @staticmethod
    def check_ops(ops: list) -> list[tuple[str, dict]]:
        """Validate a commit's ndjson operations (keys, paths, oids, base64) before anything is stored.

        Returns:
            ``[(key, value), ...]`` with the header first.

        Raises:
            HubError: 400 on the first malformed operation.
        """
        checked, headers = [], []
        for number, op in enumerate(ops):
            if not isinstance(op, dict) or not isinstance(op.get("value", {}), dict):
                raise HubError(400, f"Commit operation {number} is not an object with a 'value' object")
            key, value = op.get("key"), op.get("value", {})
            if key == "header":
                headers.append(value)
                continue
            if key not in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                raise HubError(400, f"Unsupported commit operation {key!r}")
            path = value.get("path")
            if key == "deletedFolder" and isinstance(path, str):
                path = path.rstrip("/")
            check_path(path)
            if key == "file":
                if value.get("encoding", "base64") != "base64" or not isinstance(value.get("content"), str):
                    raise HubError(400, f"Commit operation for {path!r} needs base64 'content'")
                try:
                    base64.b64decode(value["content"], validate=True)
                except (binascii.Error, ValueError):
                    raise HubError(400, f"Commit operation for {path!r} has content that is not valid base64") from None
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise HubError(400, f"LFS file {path!r}: only the sha256 algorithm is supported")
                check_oid(value.get("oid"))
            checked.append((key, {**value, "path": path}))
        if len(headers) > 1:
            raise HubError(400, "A commit has at most one 'header' operation")
        return [("header", headers[0] if headers else {})] + checked

    def commit(self, repo_id: str, branch: str, ops: list[dict]) -> str:
        check_ref(branch)
        ops = self.check_ops(ops)
        with self.lock:
            repo = self.repo(repo_id)
            header = ops[0][1]
            if _COMMIT_SHA.fullmatch(branch):
                raise HubError(400, "Cannot commit to a commit id: revision must be a branch", "RevisionNotFound")
            if branch not in repo["branches"]:
                repo["branches"][branch] = repo["branches"]["main"]
            parent = repo["branches"][branch]
            expected = header.get("parentCommit")
            if expected and expected != parent:
                raise HubError(412, f"Parent commit {expected} is not the head of {branch} ({parent})")
            tree = dict(repo["commits"][parent]["tree"])
            for key, value in ops[1:]:
                path = value["path"]
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
                    prefix = path + "/"
                    tree = {p: e for p, e in tree.items() if not p.startswith(prefix)}
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

    def setup(self) -> None:
        self.timeout = self.server.request_timeout_s  # a stalled client cannot hold a thread (or a temp blob)
        super().setup()

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
                try:
                    size = int(self.rfile.readline(64).split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    size = -1
                if size < 0:
                    raise HubError(400, "Malformed chunked request body")
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                while size > 0:  # never one read of a client-chosen size
                    chunk = self.rfile.read(min(size, 1 << 20))
                    if not chunk:
                        return
                    size -= len(chunk)
                    yield chunk
                self.rfile.readline(64)
        try:
            remaining = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HubError(400, "Malformed Content-Length header") from None
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
            self.user = self._authenticate()
            self._route()
        except HubError as err:
            self._answer_error(err)
        except (ConnectionError, TimeoutError) as err:  # client gone, reset, or stalled past request_timeout_s
            logger.debug("connection lost during %s %s: %s", self.command, url.path, type(err).__name__)
        except Exception as err:  # answer 500 rather than dropping the connection
            logger.exception("hub server error on %s %s", self.command, url.path)
            self._answer_error(HubError(500, f"Internal error: {type(err).__name__}"))

    def _answer_error(self, err: HubError) -> None:
        try:  # drain a body of sane size, so the client reads the answer instead of a reset
            if int(self.headers.get("Content-Length") or 0) <= MAX_JSON_BODY_BYTES:
                for _ in self._iter_body():
                    pass
        except (HubError, ValueError, ConnectionError, TimeoutError):
            pass
        try:
            self._error(err)
        except (ConnectionError, TimeoutError):
            logger.debug("client went away before the %d answer to %s", err.status, self.command)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # -- authentication ----------------------------------------------------------------------
    def _authenticate(self) -> tuple[str, ...] | None:
        """Namespaces the request's bearer token may write (user first), ``None`` without a header.

        An ``Authorization`` header that is not ``Bearer <configured token>`` (Basic, empty, unknown
        token) is refused with 401 on every route, as the Hub does.
        """
        header = self.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        namespaces = self.server.namespaces_of(token.strip()) if scheme.lower() == "bearer" else None
        if namespaces is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return namespaces

    def _require_auth(self) -> tuple[str, ...]:
        if self.user is None:
            hint = ("start the server with a token (HubServer(token=...) or --token / HF_TOKEN) and send it"
                    if not self.server.tokens else "pass the server's token (HF_TOKEN or token=...)")
            raise HubError(401, f"Authentication required for this request: {hint}")
        return self.user

    def _require_write(self, repo_id: str, *, exists: bool = True) -> None:
        """Writes need a token with write access to the repo's namespace (existing repos: readable first)."""
        user = self._require_auth()
        if exists:
            self._check_read(repo_id)
        namespace = repo_id.split("/", 1)[0]
        if namespace not in user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}: this token may write to the "
                                f"namespace(s) {', '.join(user)}")

    def _check_read(self, repo_id: str) -> None:
        """Private repos exist only for a token of their namespace (404 otherwise, as on the Hub)."""
        repo = self.store.repo(repo_id)
        if repo["private"] and (self.user is None or repo_id.split("/", 1)[0] not in self.user):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")

    def _json_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HubError(400, "Malformed Content-Length header") from None
        if length > MAX_JSON_BODY_BYTES:
            raise HubError(413, f"Request body of {length} bytes is over the {MAX_JSON_BODY_BYTES} bytes limit")
        body, size = [], 0
        for chunk in self._iter_body():
            size += len(chunk)
            if size > MAX_JSON_BODY_BYTES:
                raise HubError(413, f"Request body is over the {MAX_JSON_BODY_BYTES} bytes limit")
            body.append(chunk)
        return b"".join(body)

    @staticmethod
    def _parse_json(body: bytes, default=None):
        if not body.strip() and default is not None:
            return default
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise HubError(400, "Request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise HubError(400, "Request body must be a JSON object")
        return value

    # -- routing -----------------------------------------------------------------------------
    @property
    def store(self) -> _Store:
        return self.server.store

    def _route(self) -> None:
        p, method = self.parts, self.command
        body = self._json_body() if method == "POST" else b""
        if p == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if p == ["api", "agent-harnesses"] and method == "GET":  # fetched by huggingface_hub's user-agent code
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if p == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(self._parse_json(body, {}))
        if p == ["api", "validate-yaml"] and method == "POST":  # upload_folder/create_commit check README.md first
            return self._validate_yaml(self._parse_json(body, {}))
        if p[0] == "lfs-upload" and len(p) == 2 and method == "PUT":
            return self._lfs_put(p[1])
        if len(p) >= 4 and p[:2] == ["api", "models"]:
            repo_id, rest = check_repo_id(p[2], p[3]), p[4:]
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
                return self._preupload(repo_id, arg, self._parse_json(body))
            if method == "POST" and action == "commit" and arg:
                return self._commit(repo_id, arg, body)
            if action in ("xet-write-token", "xet-read-token"):
                raise HubError(501, "Xet storage is not supported by this server: run the client with "
                                    "HF_HUB_DISABLE_XET=1 (set before huggingface_hub is imported)")
            if method == "POST" and action == "branch" and arg:
                check_ref(arg)
                starting_point = self._parse_json(body, {}).get("startingPoint")
                if starting_point is not None:
                    check_ref(starting_point, "starting point")
                self._require_write(repo_id)
                self.store.create_branch(repo_id, arg, starting_point)
                return self._json({})
        if len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            return self._lfs_batch(check_repo_id(p[0], p[1][:-4]), self._parse_json(body))
        if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(check_repo_id(p[0], p[1]), check_ref(p[3], "revision"), check_path("/".join(p[4:])))
        raise HubError(404, f"No route for {method} /{'/'.join(p)}")

    # -- endpoints ---------------------------------------------------------------------------
    def _whoami(self) -> None:
        user = self._require_auth()
        self._json({"type": "user", "name": user[0], "fullname": user[0], "orgs": [{"name": org} for org in user[1:]],
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
        user = self._require_auth()
        if payload.get("type", "model") not in ("model", None):
            raise HubError(400, "Only model repos are supported by this server")
        repo_id = check_repo_id(payload.get("organization") or user[0], payload.get("name"))
        self._require_write(repo_id, exists=False)
        url = f"{self.server.url}/{repo_id}"
        try:
            self.store.create_repo(repo_id, payload.get("visibility", "public") == "private")
        except HubError as err:
            return self._json({"error": err.message, "url": url}, err.status, {"X-Error-Message": err.message})
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, revision: str) -> None:
        check_ref(revision, "revision")
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
        check_ref(revision, "revision")
        path = check_path(path.rstrip("/"), allow_root=True)
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
        check_ref(revision, "revision")
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
        check_ref(revision, "revision")
        items = payload.get("files", [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise HubError(400, "preupload 'files' must be a list of objects")
        for item in items:
            check_path(item.get("path"))
        self._require_write(repo_id)
        with self.store.lock:
            self.store.repo(repo_id)
            try:
                _, tree = self.store.tree(repo_id, revision)
            except HubError:  # branch will be created by the commit
                _, tree = self.store.tree(repo_id, "main")
        files = []
        for item in items:
            path = item["path"]
            try:
                size = int(item.get("size", 0))
                sample = base64.b64decode(item.get("sample", ""))
            except (TypeError, ValueError, binascii.Error):
                raise HubError(400, f"preupload entry for {path!r} has a bad 'size' or 'sample'") from None
            lfs = path.lower().endswith(LFS_EXTENSIONS) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample
            mode = "lfs" if lfs else "regular"
            existing = tree.get(path)
            oid = None
            if existing is not None and existing["lfs"] == lfs:
                oid = existing["sha256"] if lfs else existing["oid"]
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": files, "commitOid": None})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        check_ref(revision)
        if self.query.get("create_pr", "0") not in ("0", "false", "False"):
            raise HubError(400, "create_pr is not supported by the local hub server")
        try:
            ops = [json.loads(line) for line in body.splitlines() if line.strip()]
        except (ValueError, UnicodeDecodeError):
            raise HubError(400, "Commit payload is not ndjson (one JSON object per line)") from None
        self._require_write(repo_id)
        commit = self.store.commit(repo_id, revision, ops)
        self._json({"success": True, "commitOid": commit, "commitUrl": f"{self.server.url}/{repo_id}/commit/{commit}",
                    "hookOutput": "", "pullRequestUrl": None})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported")
        objects = payload.get("objects", [])
        if not isinstance(objects, list) or not all(isinstance(obj, dict) for obj in objects):
            raise HubError(400, "LFS batch 'objects' must be a list of objects")
        checked = [(check_oid(obj.get("oid")), _check_size(obj.get("size"))) for obj in objects]
        self._require_write(repo_id)
        answer = []
        for oid, size in checked:
            item = {"oid": oid, "size": size, "authenticated": True}
            if not self.store.has_blob(oid):
                item["actions"] = {"upload": {"href": self.server.upload_url(oid, size), "header": {}}}
            answer.append(item)
        self._json({"transfer": "basic", "objects": answer, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        """PUT of one LFS object to the signed URL the batch endpoint gave (oid, size, expiry, HMAC)."""
        check_oid(oid)
        size = self.server.check_upload_url(oid, self.query)
        length = self.headers.get("Content-Length")
        if length is not None and length.strip() != str(size):
            raise HubError(400, f"Content-Length {length.strip()} does not match the announced size {size}")
        self.store.put_blob_stream(self._iter_body(), expected_sha256=oid, expected_size=size)
        self._send(200)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        self._check_read(repo_id)  # repo id, revision and path were checked by the router
        with self.store.lock:
            commit, tree = self.store.tree(repo_id, revision)
        entry = tree.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=commit)
        try:  # before any header goes out: a state.json entry (e.g. written by an older server) is checked too
            blob = self.store.blob_path(entry["sha256"])
        except HubError:
            raise HubError(500, f"Stored entry for {path} has an invalid blob id; refusing to serve it") from None
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
            with open(blob, "rb") as stream:
                stream.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    chunk = stream.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: _Store, tokens: dict[str, tuple[str, ...]],
                 request_timeout_s: float):
        super().__init__(address, _Handler)
        self.store, self.tokens, self.request_timeout_s = store, tokens, request_timeout_s
        self.url = f"http://{address[0]}:{self.server_address[1]}"
        self._faults: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self._meta_lock = threading.Lock()
        self._upload_key = secrets.token_bytes(32)  # signs LFS upload URLs; new per process

    def namespaces_of(self, token: str) -> tuple[str, ...] | None:
        """Namespaces ``token`` may write, comparing in constant time; ``None`` for an unknown token."""
        found = None
        for known, namespaces in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = namespaces
        return found

    def _signature(self, oid: str, size: int, expires: int) -> str:
        return hmac.new(self._upload_key, f"{oid}:{size}:{expires}".encode(), hashlib.sha256).hexdigest()

    def upload_url(self, oid: str, size: int) -> str:
        expires = int(time.time()) + UPLOAD_URL_TTL_S
        return (f"{self.url}/lfs-upload/{oid}?size={size}&expires={expires}"
                f"&signature={self._signature(oid, size, expires)}")

    def check_upload_url(self, oid: str, query: dict) -> int:
        """The announced size of a validly signed, unexpired upload URL for ``oid``; 403 otherwise."""
        try:
            size, expires, signature = int(query["size"]), int(query["expires"]), query["signature"]
        except (KeyError, ValueError):
            raise HubError(403, "LFS upload URL is not signed: get one from the LFS batch endpoint") from None
        if not hmac.compare_digest(self._signature(oid, size, expires), signature) or expires < time.time():
            raise HubError(403, "LFS upload URL has a bad signature or has expired: ask the LFS batch endpoint again")
        return size

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
            that is deleted on ``stop()``. One server at a time may use it.
        host: Interface to bind; only loopback (``127.0.0.1``/``localhost``) is allowed.
        port: TCP port; ``0`` picks a free one.
        token: The token clients send as ``Authorization: Bearer <token>`` (``HF_TOKEN`` on the client);
            it may write to ``namespaces``. Without ``token`` and ``tokens`` the server is read-only.
        namespaces: Namespaces ``token`` may write and read privately; the first is the user name
            ``whoami`` reports and the default namespace of ``create_repo``.
        tokens: More tokens, ``{token: [user, org, ...]}``, each with its own namespaces.
        request_timeout_s: Seconds a client may stay silent mid-request before it is dropped
            (its partial upload is deleted).

    Attributes:
        url: Base URL to use as ``HF_ENDPOINT`` (set once started).
        requests: ``(method, path)`` of every request received, in order.

    Raises:
        ValueError: A non-loopback ``host``, an empty or whitespace-holding token, or an invalid namespace.
        RuntimeError: On ``start()``, when another server holds ``storage_dir``.
    """

    def __init__(self, storage_dir: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 0, *,
                 token: str | None = None, namespaces: Sequence[str] | str = (USER_NAME,),
                 tokens: Mapping[str, Sequence[str]] | None = None, request_timeout_s: float = 60.0):
        if host not in _LOOPBACK_HOSTS:
            raise ValueError(f"HubServer only binds loopback; got host={host!r}, use '127.0.0.1'")
        configured = dict(tokens or {})
        if token is not None:
            configured[token] = namespaces
        elif ((namespaces,) if isinstance(namespaces, str) else tuple(namespaces)) != (USER_NAME,):
            raise ValueError(f"namespaces={namespaces!r} given without a token: pass token=... (or --token / "
                             "$HF_TOKEN) for them")
        self.tokens = _check_tokens(configured)
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        self._request_timeout_s = float(request_timeout_s)
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
        store = _Store(self.storage_dir)
        try:
            self._server = _Server((self._host, self._port), store, self.tokens, self._request_timeout_s)
        except BaseException:
            store.close()
            raise
        if not self.tokens:
            logger.warning("local hub server has no token configured: it is read-only (pass token=... or --token)")
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
            self._server.store.close()
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
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN") or None,
                        help="token that may write (clients send it as HF_TOKEN); default: $HF_TOKEN; "
                             "none: the server is read-only. Prefer $HF_TOKEN: arguments show in `ps`")
    parser.add_argument("--namespace", action="append", default=None, metavar="NS",
                        help=f"namespace the token may write, repeatable; the first is the user name "
                             f"(default: {USER_NAME})")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        server = HubServer(args.storage, port=args.port, token=args.token,
                           namespaces=args.namespace or (USER_NAME,)).start()
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
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
