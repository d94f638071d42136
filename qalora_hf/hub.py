"""Push an exported (merged) QA-LoRA GPTQ model folder to the Hugging Face Hub.

The endpoint and the token follow ``huggingface_hub`` conventions: ``HF_ENDPOINT`` selects the Hub
(e.g. a local :class:`qalora_hf.testing.hub_server.HubServer`), ``HF_TOKEN`` or the stored login
provides the token when none is passed. Tokens never appear in the messages this module logs or raises.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from huggingface_hub import HfApi, constants

from .safety import assert_folder_publishable

try:  # transport errors of the HTTP client used by huggingface_hub >= 1.0
    import httpx2

    _TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
        httpx2.TimeoutException,
        httpx2.NetworkError,
        httpx2.RemoteProtocolError,
    )
except ImportError:  # pragma: no cover - older huggingface_hub
    _TRANSPORT_ERRORS = ()

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_TOKEN_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),  # Hugging Face user access tokens
    re.compile(r"(?i)(bearer\s+)[^\s'\",)]+"),  # Authorization header values
)
REDACTED = "***"


class HubPushError(RuntimeError):
    """A push to the Hub failed. The message is token-free; the original exception is not chained.

    Attributes:
        step: Which step failed (``"create_repo"``, ``"create_branch"`` or ``"upload_folder"``).
        status_code: HTTP status of the failing response, ``None`` for network errors.
        attempts: How many attempts were made.
    """

    def __init__(self, message: str, *, step: str, status_code: int | None, attempts: int):
        super().__init__(message)
        self.step, self.status_code, self.attempts = step, status_code, attempts


def redact_tokens(text: str, secrets: list[str | None] | tuple[str | None, ...] = ()) -> str:
    """Replace ``secrets`` and anything that looks like a Hub token or bearer value with ``***``.

    Args:
        text: Text to clean.
        secrets: Exact strings to remove (e.g. the token in use); ``None``/empty entries are ignored.

    Returns:
        ``text`` with every secret replaced by ``***``.
    """
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _TOKEN_PATTERNS[0].sub(REDACTED, text)
    return _TOKEN_PATTERNS[1].sub(rf"\g<1>{REDACTED}", text)


def _validate(folder: str | os.PathLike, repo_id: str, revision: str | None, max_retries: int,
              backoff_s: float) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"folder {str(path)!r} does not exist or is not a directory; pass the exported model folder")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"folder {str(path)!r} has no config.json; pass the folder written by the merge/export step "
            "(it must contain config.json next to the weights)"
        )
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(
            f"repo_id {repo_id!r} is invalid: use 'namespace/name' (e.g. 'my-user/llama-2-7b-qalora-gptq'), "
            "with exactly one '/', letters, digits, '-', '_' or '.', no '--' or '..', "
            "not starting or ending with '-' or '.', at most 96 characters per part"
        )
    if revision is not None and (not isinstance(revision, str) or not revision.strip() or revision != revision.strip()):
        raise ValueError(f"revision {revision!r} is invalid: pass a branch name such as 'main' or 'int4-g128', or None")
    if max_retries < 0 or backoff_s < 0:
        raise ValueError(f"max_retries ({max_retries}) and backoff_s ({backoff_s}) must be >= 0")
    return path


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it wraps (``__cause__``, else ``__context__``), outermost first.

    huggingface_hub wraps a failed LFS upload as ``RuntimeError("Error while uploading 'x' to the Hub.")``
    raised ``from`` the HTTP or transport error (``_commit_api._upload_lfs_files``).
    """
    chain, seen = [], set()
    while err is not None and id(err) not in seen and len(chain) < 8:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return chain


def _own_status(err: BaseException) -> int | None:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status is None:  # hf_xet reports HTTP errors as ConnectionError("... HTTP status client error (404 ...")
        match = re.search(r"HTTP status (?:client|server) error \((\d{3})", str(err))
        status = int(match.group(1)) if match else None
    return status


def _status_of(err: BaseException) -> int | None:
    """HTTP status of ``err`` or of the first exception it wraps that has one."""
    return next((s for s in map(_own_status, _chain(err)) if s is not None), None)


def _is_transient(err: BaseException) -> bool:
    """Retry on HTTP 408/429/5xx, connection errors and timeouts, also when wrapped (e.g. a failed LFS upload)."""
    status = _status_of(err)
    if status is not None:
        return status in RETRY_STATUS_CODES
    return any(isinstance(e, (ConnectionError, TimeoutError, *_TRANSPORT_ERRORS)) for e in _chain(err))


def _describe(err: BaseException) -> str:
    """``Type: message`` of ``err`` and of the exceptions it wraps, down to the first HTTP or transport error.

    A wrapper such as huggingface_hub's ``RuntimeError("Error while uploading 'x' to the Hub.")`` so keeps
    the status and server message of its cause; an HTTP error is reported alone.
    """
    parts: list[str] = []
    for e in _chain(err):
        parts.append(f"{type(e).__name__}: {str(e).strip()}")
        if _own_status(e) is not None or isinstance(e, (ConnectionError, TimeoutError, *_TRANSPORT_ERRORS)):
            break
    return " <- caused by ".join(parts)


def _with_retries(step: str, fn: Callable[[], T], *, max_retries: int, backoff_s: float, secrets: list) -> T:
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as err:  # classified below; anything unexpected is re-raised redacted too
            failure, status = err, _status_of(err)
            message = redact_tokens(_describe(err), secrets)
            if "xet-write-token" in message:
                message += (" (this endpoint has no Xet storage: "
                            "set HF_HUB_DISABLE_XET=1 before importing huggingface_hub)")
        if not _is_transient(failure) or attempt > max_retries:
            break
        delay = backoff_s * 2 ** (attempt - 1)
        logger.warning("%s failed (attempt %d/%d): %s; retrying in %.2fs",
                       step, attempt, max_retries + 1, message, delay)
        time.sleep(delay)
    del failure  # the original exception (and its request headers) must not escape
    logger.error("%s failed after %d attempt(s): %s", step, attempt, message)
    raise HubPushError(f"{step} failed after {attempt} attempt(s): {message}",
                       step=step, status_code=status, attempts=attempt)


def push_gptq_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload QA-LoRA merged GPTQ model",
    token: str | None = None,
    max_retries: int = 5,
    backoff_s: float = 1.0,
) -> str:
    """Upload an exported GPTQ model folder to a Hub model repo, creating the repo/branch if needed.

    Each step (``create_repo``, ``create_branch``, ``upload_folder``) is retried on transient
    failures (HTTP 408/429/5xx, connection errors, timeouts) with exponential backoff
    ``backoff_s * 2**k``; other HTTP errors (401, 403, 404, ...) fail at once. A failed LFS upload,
    which huggingface_hub wraps in a ``RuntimeError``, is classified by its cause, and the cause's
    message is kept in the error.

    Args:
        folder: Local folder with ``config.json`` and the quantized weights (subfolders are uploaded too).
        repo_id: Target model repo, ``"namespace/name"``.
        private: Create the repo as private (ignored if it already exists).
        revision: Branch to commit to; created from ``main`` when missing. ``None`` or ``"main"`` means ``main``.
        commit_message: Commit title.
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the stored login.
        max_retries: Retries per step after the first attempt.
        backoff_s: Delay before the first retry, in seconds (doubles each retry).

    Returns:
        The id (40-hex sha) of the commit holding the upload; use it as ``revision`` to pin downloads.

    Raises:
        ValueError: Invalid ``folder`` (missing, or no ``config.json``), ``repo_id``, ``revision`` or
            retry settings, or a file in ``folder`` that holds a pickle, a Hub token or a local path
            (:func:`qalora_hf.safety.assert_folder_publishable`); raised before any network request.
        HubPushError: A step failed for good; its message has every token redacted.
    """
    path = _validate(folder, repo_id, revision, max_retries, backoff_s)
    assert_folder_publishable(path, [token])
    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    secrets = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    api = HfApi(endpoint=endpoint, token=token)
    retry = {"max_retries": max_retries, "backoff_s": backoff_s, "secrets": secrets}
    branch = revision if revision not in (None, "main") else None

    logger.info("pushing %s to %s/%s (branch %s)", path, redact_tokens(endpoint, secrets), repo_id, branch or "main")
    _with_retries("create_repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True), **retry)
    if branch is not None:
        _with_retries("create_branch", lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), **retry)
    info = _with_retries(
        "upload_folder",
        lambda: api.upload_folder(folder_path=str(path), repo_id=repo_id, revision=branch,
                                  commit_message=commit_message),
        **retry,
    )
    oid = getattr(info, "oid", None) or str(info).rstrip("/").rsplit("/", 1)[-1]
    logger.info("pushed %s to %s at commit %s", path, repo_id, oid)
    return oid
