"""What may not leave this machine: Hub tokens, local paths, the user name, and pickles.

Every exported folder and every folder pushed to the Hub goes through :func:`assert_folder_publishable`;
the model card text goes through :func:`assert_no_secrets`.  Checked:

* every file: no pickle (by suffix — ``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.pickle``, ``.ckpt`` — or
  by the pickle protocol's first byte ``0x80`` followed by a protocol number), no Hub token (an
  ``hf_...`` token or the exact value of ``$HF_TOKEN`` / ``$HUGGING_FACE_HUB_TOKEN`` / the stored login /
  any secret passed in).  Weight files (``*.safetensors``, ``*.gguf``) are checked in their metadata
  header only;
* small metadata files (``config.json``, ``adapter_config.json``, ``merge_report.json``, ``README.md``,
  ...): also no local absolute path, and in Markdown (the card) no machine user name.  Tokenizer files (``tokenizer.json``,
  ``vocab.json``, ``merges.txt``, ...) are vocabularies, where words such as ``/home`` are ordinary tokens,
  so only the token check applies to them.
"""

from __future__ import annotations

import getpass
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Optional

_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
# An absolute path under a local root, not preceded by a word character, '.', '/' or ':' (so URLs pass).
_LOCAL_PATH = re.compile(r"(?<![\w./:~-])(?:~/|/(?:root|home|tmp|work|Users|var/folders|private|mnt|scratch)(?=/|\b))")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Vocabulary files: token check only (a vocabulary legitimately holds strings such as "/home" or "root").
VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
               "special_tokens_map.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")
HEADER_ONLY_SUFFIXES = (".safetensors", ".gguf")
BINARY_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")


def _local_markers() -> list[str]:
    """Literal strings that identify this machine: home, cwd."""
    return [p for p in (str(Path.home()), os.getcwd()) if p and p not in ("/", "\\") and len(p) > 1]


def _user_name() -> Optional[str]:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return None


def known_tokens(extra: Iterable[Optional[str]] = ()) -> list[str]:
    """The token values to look for: ``extra`` plus ``$HF_TOKEN``, ``$HUGGING_FACE_HUB_TOKEN`` and the stored login."""
    values = [*extra, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        values.append(get_token())
    except Exception:
        pass
    return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)


def find_tokens(text: str, tokens: Iterable[Optional[str]] = ()) -> list[str]:
    """Descriptions (never the values) of the Hub tokens found in ``text``."""
    found = ["a Hugging Face token (hf_...)"] if _TOKEN.search(text) else []
    if any(t in text for t in known_tokens(tokens)):
        found.append("the Hub token in use")
    return found


def find_secrets(text: str, tokens: Iterable[Optional[str]] = (), user_name: bool = True) -> list[str]:
    """What :func:`assert_no_secrets` objects to in ``text``, each described without the secret itself.

    ``user_name=False`` skips the whole-word user-name check (used for JSON metadata, where a user called
    e.g. ``llama`` would match ``"model_type": "llama"``)."""
    found = find_tokens(text, tokens)
    match = _LOCAL_PATH.search(text)
    if match:
        found.append(f"a local absolute path ({text[match.start():match.start() + 40].split()[0]!r}...)")
    for marker in _local_markers():
        if marker in text:
            found.append(f"a local path ({marker!r})")
    user = _user_name() if user_name else None
    if user and len(user) >= 2 and re.search(rf"(?<![A-Za-z0-9_]){re.escape(user)}(?![A-Za-z0-9_])", text):
        found.append(f"the machine user name ({user!r})")
    return found


def assert_no_secrets(text: str) -> None:
    """Raise ``ValueError`` if ``text`` holds a Hub token, a local absolute path or the machine user name.

    Checked: ``hf_`` tokens and the values of ``$HF_TOKEN`` / the stored login; absolute paths under
    ``/root``, ``/home``, ``/tmp``, ``/work``, ``/Users``, ``~/`` ...; the current home directory and
    working directory; the user name as a whole word.
    """
    found = find_secrets(text)
    if found:
        raise ValueError("the model card would publish " + "; ".join(dict.fromkeys(found)) +
                         ". Remove it from the card inputs (training_args, names, metrics) before exporting.")


def _is_pickle(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _header_text(path: Path) -> str:
    """The metadata part of a weight file: the JSON header of a safetensors file, the first MiB of a GGUF."""
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            return f.read(min(n, 100 << 20)).decode("utf-8", "replace")
        return f.read(1 << 20).decode("latin-1")


def find_folder_leaks(folder: str | os.PathLike, tokens: Iterable[Optional[str]] = ()) -> list[str]:
    """``"relative/path: what"`` for every pickle, token, local path or user name in the files of ``folder``."""
    root = Path(folder)
    tokens = list(tokens)
    problems = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if _is_pickle(path):
            problems.append(f"{rel}: a pickle file (only safetensors and text files may be published)")
            continue
        suffix = path.suffix.lower()
        if suffix in BINARY_SUFFIXES:
            continue
        if suffix in HEADER_ONLY_SUFFIXES:
            found = find_tokens(_header_text(path), tokens)
        else:
            text = path.read_bytes().decode("utf-8", "replace")
            if path.name in VOCAB_FILES:
                found = find_tokens(text, tokens)
            else:
                found = find_secrets(text, tokens, user_name=suffix == ".md")
        problems += [f"{rel}: {what}" for what in dict.fromkeys(found)]
    return problems


def assert_folder_publishable(folder: str | os.PathLike, tokens: Iterable[Optional[str]] = ()) -> None:
    """Raise ``ValueError`` naming every file of ``folder`` that holds a pickle, a token, a local path or the user name.

    Args:
        folder: directory about to be renamed into place or uploaded.
        tokens: exact secret values to look for besides ``$HF_TOKEN`` and the stored login (e.g. a
            ``hub_token`` passed on the command line).
    """
    problems = find_folder_leaks(folder, tokens)
    if problems:
        raise ValueError("refusing to publish: " + "; ".join(problems) +
                         ". Remove those files or values (no pickles, tokens or local paths may leave this machine).")


# The files PEFT's save_pretrained writes for an adapter in safetensors form; nothing else of an adapter or
# checkpoint directory (training_args.bin, optimizer.pt, rng_state.pth, ...: pickles, which can hold the
# hub_token) is ever copied into an export.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_adapter_dir(adapter_dir: str | os.PathLike) -> Path:
    """The adapter directory, checked to hold PEFT's safetensors adapter files.

    Raises:
        FileNotFoundError: ``adapter_config.json`` or ``adapter_model.safetensors`` is missing (an adapter
            saved as a pickle, ``adapter_model.bin``, must be re-saved with ``save_pretrained(...,
            safe_serialization=True)`` first).
    """
    path = Path(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        hint = (" (it has adapter_model.bin, a pickle: load it and re-save with save_pretrained(dir, safe_serialization=True))"
                if (path / "adapter_model.bin").is_file() else "")
        raise FileNotFoundError(f"adapter_dir {path.name} has no {' or '.join(missing)}{hint}.")
    return path
