"""Lossless GGUF ``Q4_1`` export of a (merged) GPTQ 2/3/4-bit model, for llama.cpp / ollama / LM Studio.

A GPTQ asymmetric 4-bit group is a GGUF ``Q4_1`` block (``ggml-common.h``, ``block_q4_1``; see
docs/gguf.md).  Per 32 consecutive weights of one output row a ``Q4_1`` block stores fp16 ``d``, fp16 ``m``
and 16 bytes ``qs`` with ``w[j] = (qs[j] & 0xF) * d + m`` and ``w[j + 16] = (qs[j] >> 4) * d + m``.
GPTQ dequantises ``W[o, i] = s[l, o] * (q[i, o] - z[l, o])`` with ``l = g_idx[i]``; so with act-order off
and a group size that is a multiple of 32 (or -1), every block lies in one group and

    d = s[l, o]            (exact: the GPTQ scale is already fp16)
    m = fp16(-s[l, o] * z[l, o])   (one rounding, under 1 % of a quantisation step)
    qs = the GPTQ codes q[i, o], unchanged.

Everything that is not a quantised linear weight (hyperparameters, tokenizer, chat template, tensor
names, the q/k row permutation of Llama, embeddings, norms, an unquantised ``lm_head``) is written by
**llama.cpp's own converter** (``convert_hf_to_gguf.py`` and its ``conversion/`` package, with its own
``gguf-py``), run unmodified in a subprocess.  We subclass the converter's model class for the
architecture and change three things only: (1) instead of dequantising GPTQ, each GPTQ layer's weight
enters the converter as its pre-packed ``Q4_1`` rows (uint8 values carried in a float16 tensor, exact for 0..255, so every
row operation of the converter, such as Llama's q/k head permutation, moves whole blocks unchanged);
(2) those tensors leave it as ``Q4_1`` bytes instead of being quantised again; (3) ``general.file_type``
says ``MOSTLY_Q4_1``.  The converter is not on PyPI on its own; :func:`llama_cpp_converter` takes it from
the pinned ``llama-cpp-python`` sdist on PyPI (sha256-checked, cached), or from a llama.cpp checkout.

A GPTQ base + its unmerged QA-LoRA adapter is written the same way, the adapter's per-group update ``D`` added
to ``m`` (``export_gguf(base_dir, path, adapter=...)``; docs/gguf.md, "Base + adapter").

Public API: :func:`export_gguf`, :func:`pack_q4_1`, :func:`qalora_offsets`, :func:`read_gptq_layers`, :func:`check_gguf`,
:func:`reference_gguf`, :func:`compare_with_reference`, :func:`llama_cpp_completion_loss`,
:func:`gguf_heldout_fidelity`, :func:`push_gguf_to_hub`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

logger = logging.getLogger(__name__)

QK4_1 = 32  # weights per Q4_1 block (ggml-common.h)
Q4_1_BLOCK_BYTES = 20  # fp16 d + fp16 m + 16 bytes of nibbles
FLOAT_TYPES = ("auto", "f32", "f16", "bf16")

# llama.cpp's converter as shipped in the llama-cpp-python sdist on PyPI (llama.cpp commit 0c1e57098).
CONVERTER_REQUIREMENT = "llama-cpp-python==0.3.36"
CONVERTER_SDIST = "llama_cpp_python-0.3.36.tar.gz"
CONVERTER_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_COMMIT = "0c1e57098"
_SDIST_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
_CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/")
CONVERTER_ENV_VAR = "QALORA_HF_LLAMA_CPP_DIR"

LLAMA_INSTALL_HINT = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF '
    '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" '
    "pip install 'qalora-hf[llama]'   (or: make install-llama)"
)

Q4_1_BITS = (2, 3, 4)  # GPTQ code widths whose codes a Q4_1 nibble holds unchanged
WHAT_EXPORTS = (
    "GGUF Q4_1 holds exactly: GPTQ bits=4 (or 2, 3), desc_act=False (no act-order), group_size -1 or a multiple of 32, "
    "every quantised layer's in_features a multiple of 32"
)


class GGUFExportError(ValueError):
    """The model cannot be written as a lossless GGUF Q4_1 file; the message says what would export."""


# --------------------------------------------------------------------------------------------------
# Q4_1 packing (our part: exact integers in, exact blocks out)


def pack_q4_1(q, z, scales, g_idx, name: str = "layer", offset=None, bits: int = 4, stats: Optional[dict] = None):
    """Pack one GPTQ 2/3/4-bit layer into GGUF ``Q4_1`` rows, without re-quantising.

    Args:
        q: integer codes ``[K, N]`` in ``[0, 15]`` (``in_features`` x ``out_features``; torch or numpy).
            2- and 3-bit codes are 4-bit codes that leave the top values unused.
        z: v2 zero-points (the real ``z``) ``[G, N]`` in ``[0, 15]``.
        scales: ``[G, N]`` fp16 scales (any float dtype holding fp16 values).
        g_idx: ``[K]`` group of each input channel.
        name: layer name for error messages.
        offset: optional float ``[G, N]`` added to every weight of group ``l`` in output row ``o``: a QA-LoRA
            adapter's whole update, ``D = qalora_hf.adapter.group_delta(layer)`` (paper §3.3: the pooled
            adapter's ``dW`` is constant inside a group).  It goes into ``m`` exactly, before the one fp16
            rounding, so the block decodes to ``s * (q - z) + D`` (docs/gguf.md, "Base + adapter").
            Each group of each output row is then written in the form that rounds ``m`` least: direct
            (``d = s``, codes ``q + k``, ``m = -s*(z + k) + D``) or mirrored (``d = -s``, codes ``maxq - q + k``,
            ``m = s*(maxq - z + k) + D``), with ``k`` from 0 to ``15 - maxq`` (the nibble values 2/3-bit codes
            leave free; only ``k = 0`` at 4 bits).  All decode to the same weights up to that rounding; without
            the choice, a symmetric base's ``m = -8s`` lies on the fp16 grid and every ``|D|`` under half its
            ulp (``s/512`` to ``s/256``) would round away.
        bits: the GPTQ code width (``maxq = 2**bits - 1`` for the mirrored form; only with ``offset``).
        stats: optional dict; with ``offset``, ``"shift_sq"`` += sum of ``(D / s)**2``, ``"err_sq"`` += sum of
            ``((fp16(m) - m) / s)**2`` over the groups (steps squared) and ``"groups"`` += their number: how much
            of the adapter's shift the one rounding of ``m`` changes (:func:`export_gguf` reports the ratio).

    Returns:
        numpy uint8 ``[N, K // 32 * 20]``: row ``o`` holds the ``K / 32`` ``block_q4_1`` of output row
        ``o`` (``d`` fp16 = ``s``, ``m`` fp16 = ``-s * z`` rounded once, ``qs[j] = q[j] | q[j + 16] << 4``;
        with ``offset``, per group the direct or the mirrored form above), the byte layout
        ``gguf.GGUFWriter.add_tensor(..., raw_dtype=Q4_1)`` takes.

    Raises:
        GGUFExportError: ``K`` not a multiple of 32, a block of 32 input channels spanning two groups
            (act-order, or a group size that is not a multiple of 32), a code outside ``[0, 15]``, or an
            ``offset`` that is not finite or not ``[G, N]``.
    """
    import numpy as np
    import torch

    q = torch.as_tensor(q).to(torch.int64)
    z = torch.as_tensor(z).to(torch.int64)
    s = torch.as_tensor(scales).to(torch.float32)
    g = torch.as_tensor(g_idx).to(torch.int64)
    k, n = q.shape
    if k % QK4_1:
        raise GGUFExportError(f"{name}: in_features={k} is not a multiple of {QK4_1}; {WHAT_EXPORTS}.")
    if tuple(g.shape) != (k,) or tuple(z.shape) != tuple(s.shape) or s.shape[1] != n:
        raise GGUFExportError(f"{name}: inconsistent shapes q {tuple(q.shape)}, z {tuple(z.shape)}, scales {tuple(s.shape)}, g_idx {tuple(g.shape)}.")
    blocks_g = g.view(k // QK4_1, QK4_1)
    if not bool((blocks_g == blocks_g[:, :1]).all()):
        raise GGUFExportError(
            f"{name}: some block of {QK4_1} consecutive input channels spans several GPTQ groups (act-order, or a group size "
            f"that is not a multiple of {QK4_1}), so no Q4_1 block can hold it exactly; {WHAT_EXPORTS}."
        )
    for what, t in (("codes", q), ("zero-points", z)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 15):
            raise GGUFExportError(f"{name}: {what} outside [0, 15]; not a 2/3/4-bit GPTQ layer.")
    if not bool((s.half().float() == s).all()):
        raise GGUFExportError(f"{name}: scales are not fp16 values; GPTQ stores fp16 scales.")
    gb = blocks_g[:, 0]  # group of each block, [K/32]
    # s*z is exact in fp32 (11-bit mantissa x 4-bit integer); "0.0 - x" so that z = 0 gives +0.0, not -0.0
    m = 0.0 - s * z.to(torch.float32)
    d = s
    if offset is not None:
        off = torch.as_tensor(offset).to(torch.float64)
        if tuple(off.shape) != tuple(s.shape) or not bool(torch.isfinite(off).all()):
            raise GGUFExportError(f"{name}: offset must be finite with the scales' shape {tuple(s.shape)}, got {tuple(off.shape)}.")
        maxq = (1 << bits) - 1
        if bits not in Q4_1_BITS or int(q.max()) > maxq or int(z.max()) > maxq:
            raise GGUFExportError(f"{name}: codes or zero-points above 2**bits - 1 = {maxq}, or bits={bits} not in {Q4_1_BITS}.")
        # Forms: codes q + k (d = s) or maxq - q + k (d = -s), k = 0 .. 15 - maxq; all decode to s*(q - z) + D.
        # Each writes the value at its code 0 as m, exact in float64 here; the one fp16 rounding differs.
        ks = torch.arange(QK4_1 // 2 - maxq, dtype=torch.float64)  # 0 .. 15 - maxq: unused nibble values
        sd, zd = s.double(), z.double()
        m_direct = off[None] - sd[None] * (zd[None] + ks[:, None, None])  # [F, G, N]: codes q + k, d = s
        m_mirror = off[None] + sd[None] * (maxq - zd[None] + ks[:, None, None])  # codes maxq - q + k, d = -s
        cand = torch.cat([m_direct, m_mirror])
        best = (cand.half().double() - cand).abs().argmin(0)  # [G, N]: the form that rounds m least (first on ties)
        m = cand.gather(0, best[None])[0]
        if stats is not None:
            sd_safe = sd.clamp_min(1e-30)
            stats["shift_sq"] = stats.get("shift_sq", 0.0) + float(((off / sd_safe) ** 2).sum())
            stats["err_sq"] = stats.get("err_sq", 0.0) + float((((m.half().double() - m) / sd_safe) ** 2).sum())
            stats["groups"] = stats.get("groups", 0) + off.numel()
        mirror, k_best = best >= len(ks), (best % len(ks))
        d = torch.where(mirror, -s, s)
        q = torch.where(mirror[g], maxq - q, q) + k_best[g]
    d = d[gb].t().contiguous()  # [N, K/32]
    m = m[gb].t().contiguous()
    codes = q.t().reshape(n, k // QK4_1, QK4_1).to(torch.uint8)  # [N, K/32, 32]
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = np.concatenate(
        [
            d.half().numpy().view(np.uint8).reshape(n, k // QK4_1, 2),
            m.half().numpy().view(np.uint8).reshape(n, k // QK4_1, 2),
            qs.numpy(),
        ],
        axis=-1,
    )
    return np.ascontiguousarray(out.reshape(n, k // QK4_1 * Q4_1_BLOCK_BYTES))


# --------------------------------------------------------------------------------------------------
# Reading a GPTQ export directory (v1 qzeros on disk -> v2 with gptqmodel's own converter)


@dataclass
class GPTQLayerInts:
    """The integers of one GPTQ layer read from disk: ``q`` [K, N], ``z`` (v2) [G, N], ``scales`` fp16 [G, N], ``g_idx`` [K]."""

    q: Any
    z: Any
    scales: Any
    g_idx: Any

    def dequantize(self):
        """float32 ``W[o, i] = s[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])``, shape ``[N, K]``."""
        import torch

        g = self.g_idx.to(torch.int64)
        return (self.scales.float()[g] * (self.q - self.z[g]).float()).t().contiguous()


def _safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{path} holds no *.safetensors; pass a directory written by export_gptq / 'qalora-hf merge'.")
    return files


def _tensor_index(path: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index = {}
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                index[key] = f
    return index


def _check_quantization_config(config: dict, where: str) -> dict:
    qc = config.get("quantization_config")
    if not qc:
        raise GGUFExportError(
            f"{where} is a float model (no quantization_config): this export writes GPTQ integers as Q4_1 without "
            "re-quantising. Quantise and merge first (QALoraTrainer / 'qalora-hf merge'); a float model goes through "
            "llama.cpp's own convert_hf_to_gguf.py."
        )
    method = str(qc.get("quant_method", "")).lower().replace("quantizationmethod.", "")
    if method != "gptq":
        raise GGUFExportError(f"{where} is quantised with {method!r}, not GPTQ; {WHAT_EXPORTS}.")
    bits, desc_act, group_size = int(qc.get("bits", 0)), bool(qc.get("desc_act", False)), int(qc.get("group_size", -1))
    if bits not in Q4_1_BITS:
        raise GGUFExportError(
            f"{where}: bits={bits}; GGUF has no type that holds {bits}-bit GPTQ integers exactly (Q4_1 holds codes 0..15). "
            f"{WHAT_EXPORTS}. Refusing rather than re-quantising."
        )
    if desc_act:
        raise GGUFExportError(
            f"{where}: desc_act=True (act-order): a GPTQ group is then scattered over the input channels, and a Q4_1 block "
            f"needs 32 consecutive channels of one group. {WHAT_EXPORTS}."
        )
    if group_size != -1 and (group_size <= 0 or group_size % QK4_1):
        raise GGUFExportError(f"{where}: group_size={group_size} is not a multiple of {QK4_1}; {WHAT_EXPORTS}.")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise GGUFExportError(f"{where}: checkpoint_format={fmt!r}; expected 'gptq' (v1) or 'gptq_v2'.")
    return qc


def check_gptq_dir(path: str | os.PathLike) -> dict:
    """Check, before any work, that ``path`` is a GPTQ export that maps exactly onto Q4_1.

    Reads ``config.json`` and the safetensors headers and ``g_idx`` tensors only.

    Returns:
        ``{"config": config.json dict, "layers": {prefix: (in_features, out_features)}}``.

    Raises:
        GGUFExportError: not a directory with config.json, an adapter directory (merge first), a float
            model, bits != 4, act-order, a group size not a multiple of 32, a layer with ``in_features``
            not a multiple of 32, or ``g_idx`` blocks spanning two groups.
    """
    import torch
    from safetensors import safe_open

    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        try:
            recorded = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except ValueError:
            recorded = None
        base = recorded if isinstance(recorded, str) and recorded else "<GPTQ base>"
        raise GGUFExportError(
            f"{path} is an adapter directory (adapter_config.json, no config.json): write it with its GPTQ base, without "
            f"a merge: export_gguf('{base}', ..., adapter='{path}') / 'qalora-hf gguf {base} --adapter {path} -o x.gguf'; "
            "or merge it into its GPTQ base first (merge_qalora / 'qalora-hf merge'), then export the merged directory."
        )
    if not (path / "config.json").is_file():
        raise GGUFExportError(f"{path}: no config.json; pass a GPTQ export directory (export_gptq / 'qalora-hf merge').")
    config = json.loads((path / "config.json").read_text())
    _check_quantization_config(config, str(path))
    index = _tensor_index(path)
    lora = [k for k in index if "lora_" in k]
    if lora:
        raise GGUFExportError(f"{path} holds adapter tensors ({lora[0]}); merge first with merge_qalora.")
    layers = {}
    for key in sorted(index):
        if not key.endswith(".qweight"):
            continue
        prefix = key[: -len(".qweight")]
        missing = [s for s in (".qzeros", ".scales", ".g_idx") if prefix + s not in index]
        if missing:
            raise GGUFExportError(f"{path}: {prefix} has qweight but no {missing[0]}.")
        with safe_open(str(index[prefix + ".g_idx"]), framework="pt") as st:
            g_idx = st.get_tensor(prefix + ".g_idx").to(torch.int64)
        with safe_open(str(index[key]), framework="pt") as st:
            out_features = st.get_slice(key).get_shape()[1]
        k = int(g_idx.numel())
        if k % QK4_1:
            raise GGUFExportError(f"{prefix}: in_features={k} is not a multiple of {QK4_1}; {WHAT_EXPORTS}.")
        blocks = g_idx.view(-1, QK4_1)
        if not bool((blocks == blocks[:, :1]).all()):
            raise GGUFExportError(f"{prefix}: g_idx puts one block of {QK4_1} input channels into several groups (act-order?); {WHAT_EXPORTS}.")
        layers[prefix] = (k, int(out_features))
    if not layers:
        raise GGUFExportError(f"{path} has a GPTQ quantization_config but no qweight tensors.")
    return {"config": config, "layers": layers}


def read_gptq_layers(path: str | os.PathLike, prefixes: Optional[Iterable[str]] = None) -> Iterable[tuple[str, GPTQLayerInts]]:
    """Yield ``(prefix, GPTQLayerInts)`` for each GPTQ layer of an export directory, zero-points in v2.

    ``qweight``/``qzeros`` are unpacked with :func:`qalora_hf.gptq_format.unpack`; v1 ``qzeros``
    (``checkpoint_format: "gptq"``) are first converted with gptqmodel's own v1 -> v2 conversion.
    """
    from safetensors import safe_open

    from .gptq_format import qzeros_v1_to_v2, unpack

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    bits = int(qc["bits"])
    v1 = qc.get("checkpoint_format", "gptq") == "gptq"
    index = _tensor_index(path)
    wanted = sorted(k[: -len(".qweight")] for k in index if k.endswith(".qweight")) if prefixes is None else list(prefixes)

    def get(key):
        with safe_open(str(index[key]), framework="pt") as st:
            return st.get_tensor(key)

    for prefix in wanted:
        qweight, qzeros, scales, g_idx = (get(prefix + s) for s in (".qweight", ".qzeros", ".scales", ".g_idx"))
        if v1:
            qzeros = qzeros_v1_to_v2(qzeros, bits)
        k, n = g_idx.numel(), scales.shape[1]
        q = unpack(qweight, bits, dim=0)[:k, :n]
        z = unpack(qzeros, bits, dim=1)[:, :n]
        yield prefix, GPTQLayerInts(q=q, z=z, scales=scales, g_idx=g_idx)


# --------------------------------------------------------------------------------------------------
# llama.cpp's converter: where it comes from


def _converter_ok(path: Path) -> bool:
    return all((path / p).exists() for p in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py"))


def llama_cpp_converter(converter_dir: Optional[str | os.PathLike] = None, cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """The directory of llama.cpp's ``convert_hf_to_gguf.py`` + ``conversion/`` + ``gguf-py/`` to run.

    In order: ``converter_dir``; ``$QALORA_HF_LLAMA_CPP_DIR`` (e.g. a llama.cpp checkout, for architectures
    newer than the pinned converter); the cached copy ``<cache>/llama.cpp/<commit>``; else the pinned
    ``llama-cpp-python`` sdist is downloaded with ``pip download`` (PyPI, sha256-checked; about 76 MB once)
    and those files are extracted into the cache.

    Raises:
        FileNotFoundError: ``converter_dir`` / the env var points at a directory without the converter.
        qalora_hf.pypi.FetchError: the download failed or did not verify.
    """
    from . import pypi
    from .cache import default_cache_dir

    explicit = converter_dir or os.environ.get(CONVERTER_ENV_VAR)
    if explicit:
        path = Path(explicit).expanduser()
        if not _converter_ok(path):
            raise FileNotFoundError(
                f"{path} is not a llama.cpp source tree (needs convert_hf_to_gguf.py, conversion/ and gguf-py/gguf/)."
            )
        return path
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / "llama.cpp" / CONVERTER_COMMIT
    if _converter_ok(target):
        return target
    import tarfile

    with pypi.cache_lock(cache):
        if _converter_ok(target):
            return target
        with pypi.scratch_dir(cache) as scratch:
            package = pypi.Package(CONVERTER_REQUIREMENT, CONVERTER_SDIST, sdist=True)
            pypi.log(f"downloading llama.cpp's converter ({CONVERTER_REQUIREMENT} sdist, llama.cpp {CONVERTER_COMMIT}) with pip ...")
            sdist = pypi.pip_download(package, scratch)
            pypi.verify_sha256(sdist, CONVERTER_SDIST_SHA256, CONVERTER_SDIST)
            staged = scratch / "converter"
            with tarfile.open(sdist, "r:gz") as tf:
                for member in tf:
                    rel = member.name[len(_SDIST_ROOT):] if member.name.startswith(_SDIST_ROOT) else None
                    if rel is None or not member.isfile() or not any(rel == m or rel.startswith(m) for m in _CONVERTER_MEMBERS):
                        continue
                    if ".." in Path(rel).parts:
                        continue
                    dest = staged / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tf.extractfile(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
            (staged / "SOURCE.txt").write_text(
                f"llama.cpp {CONVERTER_COMMIT} (MIT, see LICENSE), extracted from {CONVERTER_SDIST} "
                f"(sha256 {CONVERTER_SDIST_SHA256}) by qalora_hf.gguf_export.\n"
            )
            if not _converter_ok(staged):
                raise pypi.FetchError(f"{CONVERTER_SDIST} did not contain llama.cpp's converter under {_SDIST_ROOT}")
            target.parent.mkdir(parents=True, exist_ok=True)
            pypi.replace_dir(staged, target)
    return target


# --------------------------------------------------------------------------------------------------
# The converter run (in a subprocess, so that llama.cpp's own gguf-py is the one imported)


def _run_converter(spec: dict, converter: Path) -> None:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    spec = dict(spec, converter=str(converter))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    try:
        result = subprocess.run([sys.executable, "-m", "qalora_hf.gguf_export", "--convert", spec_path], env=env,
                                capture_output=True, text=True)
    finally:
        os.unlink(spec_path)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        marker = "GGUFExportError: "
        for line in reversed(tail.splitlines()):
            if line.startswith(marker):
                raise GGUFExportError(line[len(marker):])
        raise RuntimeError(f"llama.cpp's converter failed (exit {result.returncode}):\n{tail}")
    for line in result.stderr.splitlines():
        # transformers 5 configs say rope_type "default", which this converter does not name (it writes no scaling: right)
        if "WARNING" in line and "Unknown RoPE type: default" not in line:
            logger.warning("converter: %s", line)


def _converter_main(spec_path: str) -> None:  # runs in the subprocess
    spec = json.loads(Path(spec_path).read_text())
    converter = Path(spec["converter"])
    sys.path.insert(0, str(converter / "gguf-py"))  # llama.cpp's own gguf-py, matching its converter
    sys.path.insert(0, str(converter))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import numpy as np
    import torch

    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    dir_model = Path(spec["dir_model"])
    packed_file = spec.get("packed_file")
    packed: dict[str, np.ndarray] = {}
    if packed_file:
        from safetensors.numpy import load_file

        packed = load_file(packed_file)  # {"<prefix>.weight": uint8 [N, K/32*20]}
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}[spec["float_type"]]
    hparams = ModelBase.load_hparams(dir_model, False)
    arch = get_model_architecture(hparams, ModelType.TEXT)
    try:
        base_cls = get_model_class(arch)
    except NotImplementedError:
        raise GGUFExportError(f"llama.cpp's converter ({spec['converter']}) does not support the architecture {arch}.") from None
    tokenizer_pre = spec.get("tokenizer_pre")
    # Integer fingerprint of a row of bytes: the multiset of row fingerprints going in must come out, so any
    # converter step that is not a pure row reorder/split/concat of the packed weights is caught.
    rng = np.random.default_rng(0)
    weights = {}

    def fingerprints(t: "torch.Tensor") -> list[int]:
        rows = t.reshape(-1, t.shape[-1]).to(torch.int64)
        w = weights.get(rows.shape[1])
        if w is None:
            w = weights[rows.shape[1]] = torch.from_numpy(rng.integers(1, 1 << 20, size=rows.shape[1], dtype=np.int64))
        return (rows * w).sum(1).tolist()

    class Q41(base_cls):  # type: ignore[misc, valid-type]
        model_arch = base_cls.model_arch

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._packed_out: set[str] = set()
            self._fp_in: list[int] = []
            self._fp_out: list[int] = []
            writer_add = self.gguf_writer.add_tensor

            def add_tensor(name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
                if name in self._packed_out:
                    if tensor.dtype != np.float16 or tensor.shape[-1] % Q4_1_BLOCK_BYTES:
                        raise GGUFExportError(f"{name}: the converter changed the packed Q4_1 rows ({tensor.dtype}, {tensor.shape}).")
                    raw = tensor.astype(np.uint8)
                    if not np.array_equal(raw.astype(np.float16), tensor):
                        raise GGUFExportError(f"{name}: the converter changed the values of the packed Q4_1 rows (architecture {arch}).")
                    tensor, raw_dtype = raw, gguf.GGMLQuantizationType.Q4_1
                writer_add(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, tensor_endianess=tensor_endianess)

            self.gguf_writer.add_tensor = add_tensor

        def dequant_model(self):
            if not packed:
                return super().dequant_model()
            for prefix_weight, rows in packed.items():
                prefix = prefix_weight[: -len(".weight")]
                for suffix in (".qweight", ".qzeros", ".scales", ".g_idx"):
                    self.model_tensors.pop(prefix + suffix, None)
                # fp16 holds 0..255 exactly and is a dtype the converter passes through unchanged
                self.model_tensors[prefix_weight] = lambda rows=rows: torch.from_numpy(rows.astype(np.float16))
            left = [k for k in self.model_tensors if k.endswith((".qweight", ".qzeros", ".g_idx"))]
            if left:
                raise GGUFExportError(f"GPTQ tensor {left[0]} was not packed.")

        def modify_tensors(self, data_torch, name, bid):
            out = list(super().modify_tensors(data_torch, name, bid))
            if name in packed:
                self._fp_in += fingerprints(data_torch)
                for new_name, t in out:
                    if t.ndim < 2 or t.shape[-1] % Q4_1_BLOCK_BYTES:
                        raise GGUFExportError(f"{name} -> {new_name}: the {arch} converter reshapes this weight along its "
                                              "input dimension, which Q4_1 rows cannot follow.")
                    self._packed_out.add(new_name)
                    self._fp_out += fingerprints(t)
            else:
                clash = [n for n, _ in out if n in self._packed_out]
                if clash:
                    raise GGUFExportError(f"{clash[0]}: the {arch} converter mixes a packed weight with {name}.")
            return out

        def tensor_force_quant(self, name, new_name, bid, n_dims):
            if new_name in self._packed_out:
                return gguf.GGMLQuantizationType.F16  # kept as is here (fp16 bytes); written as Q4_1 by add_tensor
            return super().tensor_force_quant(name, new_name, bid, n_dims)

        def prepare_metadata(self, vocab_only):
            if packed:
                if sorted(self._fp_in) != sorted(self._fp_out) or len(self._fp_in) != sum(r.shape[0] for r in packed.values()):
                    raise GGUFExportError(f"the {arch} converter did not pass every packed Q4_1 row through unchanged.")
                self.ftype = gguf.LlamaFileType.MOSTLY_Q4_1
            super().prepare_metadata(vocab_only)

        def get_vocab_base_pre(self, tokenizer):
            if tokenizer_pre:
                return tokenizer_pre
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                raise GGUFExportError(
                    "llama.cpp's converter does not recognise this tokenizer's BPE pre-tokenizer (its hash is not in "
                    "get_vocab_base_pre); pass tokenizer_pre=<name> (--tokenizer-pre), e.g. 'gpt-2' for GPT-2's byte-level "
                    "split, or use a newer llama.cpp converter (converter_dir / $" + CONVERTER_ENV_VAR + ")."
                ) from None

    with torch.inference_mode():
        model = Q41(dir_model, ftype, Path(spec["out_path"]), eager=True, model_name=spec.get("model_name"))
        model.write()


def _write_packed(layers: dict[str, Any], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({f"{prefix}.weight": rows for prefix, rows in layers.items()}, str(path))


def _auto_float_type(path: Path, gptq_prefixes: Iterable[str]) -> str:
    """f16 / bf16 if every unquantised float tensor of the checkpoint is exactly representable in it, else f32."""
    import torch
    from safetensors import safe_open

    skip = tuple(f"{p}." for p in gptq_prefixes)
    ok = {"f16": True, "bf16": True}
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.startswith(skip):
                    continue
                t = st.get_tensor(key)
                if not t.is_floating_point():
                    continue
                t = t.float()
                ok["f16"] = ok["f16"] and bool((t.half().float() == t).all())
                ok["bf16"] = ok["bf16"] and bool((t.bfloat16().float() == t).all())
    return "f16" if ok["f16"] else "bf16" if ok["bf16"] else "f32"


def _check_output(output_path: str | os.PathLike, overwrite: bool) -> Path:
    target = Path(output_path).expanduser().absolute()
    if target.suffix.lower() != ".gguf":
        raise GGUFExportError(f"{output_path}: the output file name must end in .gguf.")
    if target.is_dir():
        raise GGUFExportError(f"{output_path} is a directory; pass a file path ending in .gguf.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it.")
    return target


def _check_model(model) -> None:
    """Refuse an in-memory model that cannot be exported, before any work."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise GGUFExportError(
            "the model still holds adapters (a PeftModel / LoRA layers): merge first with "
            "qalora_hf.merge_qalora(model), then export the merged model; or write base + adapter losslessly with "
            "export_gguf(<GPTQ base directory>, path, adapter=<saved adapter directory>)."
        )
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    _check_quantization_config({"quantization_config": qc if qc is None or isinstance(qc, dict) else qc.to_dict()}, type(model).__name__)
    from .model import gptq_layers

    layers = gptq_layers(model)
    if not layers:
        raise GGUFExportError("the model has a GPTQ quantization_config but no gptqmodel quantised layers.")
    for name, layer in layers.items():
        if int(layer.bits) not in Q4_1_BITS:
            raise GGUFExportError(f"{name}: bits={layer.bits}; {WHAT_EXPORTS}.")
        if layer.in_features % QK4_1:
            raise GGUFExportError(f"{name}: in_features={layer.in_features} is not a multiple of {QK4_1}; {WHAT_EXPORTS}.")
        g = layer.g_idx.detach().cpu().to(int).view(-1, QK4_1)
        if not bool((g == g[:, :1]).all()):
            raise GGUFExportError(f"{name}: g_idx puts one block of {QK4_1} input channels into several groups (act-order?); {WHAT_EXPORTS}.")


def _check_adapter_dir(adapter) -> Path:
    """A saved QA-LoRA adapter directory (``adapter_config.json`` with ``use_qalora``, safetensors weights)."""
    from .safety import check_adapter_dir

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise GGUFExportError(f"adapter={adapter}: no adapter_config.json there; pass the directory the adapter was saved to "
                              "(save_pretrained / a trainer checkpoint).")
    if not json.loads((path / "adapter_config.json").read_text()).get("use_qalora", False):
        raise GGUFExportError(f"adapter={adapter} is a plain LoRA adapter (use_qalora is not true): its update is not constant "
                              "inside quantisation groups, so no Q4_1 block holds it. Only QA-LoRA adapters export this way.")
    try:
        check_adapter_dir(path)
    except (FileNotFoundError, ValueError) as err:
        raise GGUFExportError(f"adapter={adapter}: {err}") from None
    return path


def qalora_offsets(model, adapter_name: str = "default") -> dict:
    """Each QA-LoRA layer's whole update as a per-group offset, by GPTQ layer name.

    Args:
        model: a ``PeftModel`` holding QA-LoRA adapter ``adapter_name`` (unmerged) on a GPTQ base.

    Returns:
        ``{prefix: D}`` with ``prefix`` the layer's name in the base checkpoint (``model.layers.0.self_attn.q_proj``)
        and ``D`` float32 ``[G, N]`` = :func:`qalora_hf.adapter.group_delta` (``dW[o, i] = D[g_idx[i], o]``).
    """
    from .adapter import group_delta
    from .merge import qalora_layers

    out = {}
    for name, module in qalora_layers(model, adapter_name).items():
        if adapter_name in getattr(module, "merged_adapters", []):
            raise GGUFExportError(f"{name}: the adapter is already merged into the layer; export the merged model without adapter=.")
        out[name.removeprefix("base_model.model.")] = group_delta(module, adapter_name)
    return out


def _check_adapter_fits(adapter: Path, base_dir: Path, config: dict) -> None:
    """Before loading anything: the bits and group size the adapter recorded (``qalora_base``) are the base's."""
    raw = json.loads((adapter / "adapter_config.json").read_text())
    recorded = raw.get("qalora_base") if isinstance(raw.get("qalora_base"), dict) else {}
    qc = config["quantization_config"]
    want = {"bits": recorded.get("bits"), "group_size": recorded.get("group_size", raw.get("qalora_group_size"))}
    have = {"bits": int(qc.get("bits", 0)), "group_size": int(qc.get("group_size", -1))}
    wrong = [f"{k}={want[k]} (the base has {have[k]})" for k in want if want[k] is not None and int(want[k]) != have[k]]
    if wrong:
        trained_on = raw.get("base_model_name_or_path")
        raise GGUFExportError(f"adapter={adapter} was trained on another GPTQ base ({', '.join(wrong)}"
                              + (f"; it records {trained_on}" if trained_on else "") + f"), not on {base_dir}: pass the base it was trained on.")


def _adapter_offsets(base_dir: Path, adapter: Path, layers: dict) -> dict:
    from .gptq import load_gptq_model
    from .model import load_qalora_adapter

    try:
        peft_model = load_qalora_adapter(load_gptq_model(str(base_dir)), str(adapter))
    except ValueError as err:  # another base of the same shape, a stock adapter on act-order, an adapter that does not fit
        raise GGUFExportError(f"adapter={adapter} does not fit the base {base_dir}; pass the GPTQ base it was trained on "
                              f"(nothing was written). Details: {err}") from None
    offsets = qalora_offsets(peft_model)
    del peft_model
    unknown = sorted(set(offsets) - set(layers))
    if unknown or not offsets:
        raise GGUFExportError(f"adapter={adapter}: " + (f"{unknown[0]} is not a GPTQ layer of {base_dir}." if unknown
                                                         else "it holds no QA-LoRA layer on this base."))
    return offsets


# Above this rms(m rounding) / rms(D), the fp16 grid of m resolves the adapter's shifts only coarsely. Measured on the
# fidelity matrix (docs/fidelity_matrix.md; gain kept by the file, decoded in transformers): ratio 0.05-0.06 kept
# 99.99-100.0 %, 0.23 kept 99.8 %, 0.64 kept 88.6 % (where the merge kept 99.4 %).
M_ROUNDING_WARN = 0.3


def _report_m_rounding(stats: dict) -> float:
    import math
    import warnings

    ratio = math.sqrt(stats["err_sq"] / stats["shift_sq"]) if stats.get("shift_sq") else 0.0
    logger.info("adapter in m: rms rounding of m = %.1f %% of the rms shift D/s (%.2e steps over %d groups)", 100 * ratio,
                math.sqrt(stats.get("shift_sq", 0.0) / max(stats.get("groups", 0), 1)), stats.get("groups", 0))
    if ratio > M_ROUNDING_WARN:
        warnings.warn(
            f"the adapter's shifts are small next to fp16's resolution of m: its one rounding changes them by "
            f"{100 * ratio:.0f} % (rms), so this file may keep less of the fine-tuning than the merged export (a very short "
            "or low-rate fine-tune). Compare both on held-out rows, or write the merged export's GGUF instead "
            "('qalora-hf merge', then 'qalora-hf gguf <merged dir>').", UserWarning, stacklevel=3)
    return ratio


def export_gguf(
    source,
    output_path: str | os.PathLike,
    *,
    adapter: Optional[str | os.PathLike] = None,
    tokenizer=None,
    float_type: str = "auto",
    tokenizer_pre: Optional[str] = None,
    model_name: Optional[str] = None,
    overwrite: bool = False,
    converter_dir: Optional[str | os.PathLike] = None,
    check: bool = True,
) -> Path:
    """Write a merged GPTQ 2/3/4-bit model, or a GPTQ base + its QA-LoRA adapter, as one GGUF file whose
    linear weights are exact ``Q4_1`` blocks.

    Args:
        source: a GPTQ export directory (``export_gptq`` / ``qalora-hf merge`` output; v1 or v2 zero-points),
            or an in-memory merged GPTQ model (``transformers`` + gptqmodel); the latter is first written
            with :func:`qalora_hf.export_gptq` to a temporary directory, so ``tokenizer`` is then required.
            With ``adapter``: the GPTQ base directory the adapter was trained on.
        adapter: a saved QA-LoRA adapter directory (unmerged).  Its update is constant inside each group
            (paper §3.3), so it goes into each block's float ``m`` (:func:`pack_q4_1` ``offset``) and the file
            holds the trained model itself, to the fp16 rounding of ``m``: no merge, none of the merge's loss
            (docs/gguf.md, "Base + adapter").  The adapter is loaded with PEFT onto the base first (seconds
            to minutes: the base is loaded once, on CPU).
        output_path: the ``.gguf`` file to write; written to a temporary file beside it and renamed into
            place when complete.
        tokenizer: the tokenizer (only for an in-memory model).
        float_type: type of the tensors that are not GPTQ-quantised (embeddings, an unquantised lm_head;
            norms and biases are always F32, as llama.cpp's converter writes them): ``"auto"`` (default:
            ``f16``/``bf16`` when every such tensor is exactly representable there, else ``f32``: lossless),
            or ``"f32"``, ``"f16"``, ``"bf16"`` (the converter's ``--outtype``).
        tokenizer_pre: ``tokenizer.ggml.pre`` to write when llama.cpp's converter does not recognise the
            tokenizer's BPE pre-tokenizer (default: its own detection).
        model_name: ``general.name`` (default: the converter's, from the model card / directory name).
        overwrite: replace an existing ``output_path``.
        converter_dir: a llama.cpp source tree to take the converter from (see :func:`llama_cpp_converter`).
        check: after writing, decode every Q4_1 tensor with gguf-py and compare it with the GPTQ
            integers, plus the adapter's offsets (:func:`check_gguf`); the file is renamed into place only if
            that passes.

    Returns:
        ``Path(output_path)``.

    Raises:
        GGUFExportError: before anything is written, for a model holding adapters ("merge first"), a float
            model, bits not 2/3/4, act-order, a group size not a multiple of 32, an ``in_features`` not a
            multiple of 32, an architecture whose converter transforms linear weights other than by
            moving whole rows, an unrecognised BPE pre-tokenizer (pass ``tokenizer_pre``), or an ``adapter``
            that is missing, not QA-LoRA, trained on another base, or given with an in-memory ``source``.
        FileExistsError: ``output_path`` exists and ``overwrite`` is False.

    Warns:
        UserWarning: with ``adapter``, when the one fp16 rounding of ``m`` changes the adapter's per-group shifts by
            more than ``M_ROUNDING_WARN`` (30 %, rms): shifts that small are below what ``m`` resolves, and the merged
            export may keep more of the fine-tuning (docs/gguf.md).
    """
    if float_type not in FLOAT_TYPES:
        raise GGUFExportError(f"float_type={float_type!r}; choose one of {FLOAT_TYPES}.")
    target = _check_output(output_path, overwrite)
    if adapter is not None:
        if not isinstance(source, (str, os.PathLike)):
            raise GGUFExportError("adapter= needs source to be the GPTQ base directory the adapter was trained on, not a model.")
        adapter = _check_adapter_dir(adapter)
    with tempfile.TemporaryDirectory(prefix="qalora-gguf-") as scratch:
        scratch = Path(scratch)
        if isinstance(source, (str, os.PathLike)):
            src = Path(source).expanduser()
            if not src.is_dir():
                raise GGUFExportError(f"{source}: no such directory; pass a GPTQ export directory or a merged model.")
            info = check_gptq_dir(src)
            if adapter is not None:
                _check_adapter_fits(adapter, src, info["config"])
        else:
            _check_model(source)
            if tokenizer is None:
                raise GGUFExportError("exporting an in-memory model needs its tokenizer (tokenizer=...): the GGUF holds the vocabulary.")
            from .export import export_gptq

            src = export_gptq(source, scratch / "gptq", tokenizer=tokenizer)
            info = check_gptq_dir(src)
        converter = llama_cpp_converter(converter_dir)
        chosen = _auto_float_type(src, info["layers"]) if float_type == "auto" else float_type
        offsets = _adapter_offsets(src, adapter, info["layers"]) if adapter is not None else {}
        bits = int(info["config"]["quantization_config"]["bits"])
        stats: dict = {}
        packed = {prefix: pack_q4_1(t.q, t.z, t.scales, t.g_idx, prefix, offset=offsets.get(prefix), bits=bits, stats=stats)
                  for prefix, t in read_gptq_layers(src, info["layers"])}
        if offsets:
            _report_m_rounding(stats)
        _write_packed(packed, scratch / "packed.safetensors")
        del packed
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            _run_converter({"dir_model": str(src), "packed_file": str(scratch / "packed.safetensors"), "out_path": str(tmp),
                            "float_type": chosen, "tokenizer_pre": tokenizer_pre, "model_name": model_name}, converter)
            if check:
                check_gguf(tmp, src, offsets=offsets)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
    logger.info("wrote %s (Q4_1 linear weights%s, %s for the other tensors)", target,
                f", {len(offsets)} with the adapter in m" if offsets else "", chosen)
    return target


# --------------------------------------------------------------------------------------------------
# Checks with gguf-py's own reader and decoder


def _permute_like_converter(arch: str, prefix: str, w, hparams: dict):
    """The row permutation llama.cpp's Llama converter applies to q_proj/k_proj (``LlamaModel.permute``)."""
    if arch != "llama":
        return w
    n_head = hparams["num_attention_heads"]
    n_kv = hparams.get("num_key_value_heads", n_head)
    if prefix.endswith("q_proj"):
        heads = n_head
    elif prefix.endswith("k_proj"):
        heads = n_kv
    else:
        return w
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_gguf(gguf_path: str | os.PathLike, gptq_dir: str | os.PathLike, offsets: Optional[dict] = None) -> dict:
    """Decode every ``Q4_1`` tensor of ``gguf_path`` with gguf-py (``gguf.quants.dequantize``) and compare it
    with the GPTQ export's dequantised weight ``s * (q - z)``, plus ``offsets[prefix][g_idx[i], o]`` when
    given (a QA-LoRA adapter's update, :func:`qalora_offsets`).

    Each GPTQ layer is matched to its GGUF tensor by its decoded values (a GGUF tensor is the layer's
    weight with its rows possibly reordered by the converter, e.g. Llama's q/k head permutation, which is
    applied to the reference for ``general.architecture == "llama"``). The tolerance per weight is half
    an fp16 ulp of the block's ``m`` as written in the file (the one rounding of the export), plus float32 rounding.

    Returns:
        ``{"tensors": n, "max_abs_err": float, "max_err_over_step": float}``, the largest error in units
        of the quantisation step ``s``.

    Raises:
        AssertionError: a tensor is missing, not Q4_1, of the wrong shape, or outside the tolerance.
    """
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    q41 = {t.name: t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q4_1}
    hparams = json.loads((Path(gptq_dir) / "config.json").read_text())
    by_shape: dict[tuple, list] = {}
    for t in q41.values():  # decoded on demand (a 7B model decoded at once would need 28 GB)
        by_shape.setdefault(tuple(int(x) for x in reversed(t.shape)), []).append((t.name, t))
    name_map = None
    try:  # gguf-py's own HF -> GGUF tensor names, to find each layer's tensor directly
        import gguf as _gguf

        arch_enum = {v: k for k, v in _gguf.MODEL_ARCH_NAMES.items()}[arch]
        blocks = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
        name_map = _gguf.get_tensor_name_map(arch_enum, blocks)
    except (KeyError, ValueError, AttributeError):
        pass
    used, worst_abs, worst_rel, n = set(), 0.0, 0.0, 0
    offsets = offsets or {}
    for prefix, ints in read_gptq_layers(gptq_dir):
        g = ints.g_idx.long()
        ref = ints.dequantize().double()
        if prefix in offsets:
            ref = ref + torch.as_tensor(offsets[prefix]).double()[g].t()
        ref = _permute_like_converter(arch, prefix, ref.float().numpy(), hparams)
        s = _permute_like_converter(arch, prefix, ints.scales.float()[g].t().numpy(), hparams)
        match = None
        mapped = name_map.get_name(prefix) if name_map is not None else None
        candidates = by_shape.get(ref.shape, [])
        if mapped and mapped + ".weight" in q41:  # try the mapped name first, then any same-shaped tensor
            candidates = sorted(candidates, key=lambda c: c[0] != mapped + ".weight")
        for name, t in candidates:
            if name in used:
                continue
            decoded = dequantize(t.data, GGMLQuantizationType.Q4_1)  # [N, K] float32
            # the one rounding is m's (the block's value at code 0, whichever form pack_q4_1 chose): half an fp16
            # ulp of the file's own m, at least half the smallest subnormal (2**-25), + fp32 rounding
            m = np.repeat(np.asarray(t.data).reshape(*ref.shape[:-1], -1, Q4_1_BLOCK_BYTES)[..., 2:4].copy().view(np.float16)[..., 0],
                          QK4_1, axis=-1).astype(np.float32)
            tol = np.maximum(np.abs(m) * 2.0**-11, 2.0**-25) + np.abs(ref) * 2.0**-22
            if np.all(np.abs(decoded - ref) <= tol):
                match = (name, decoded)
                break
        assert match is not None, f"{prefix}: no Q4_1 tensor of {gguf_path} decodes to its GPTQ weight within the fp16 rounding of m"
        used.add(match[0])
        err = np.abs(match[1] - ref)
        worst_abs = max(worst_abs, float(err.max()))
        worst_rel = max(worst_rel, float((err / np.maximum(s, 1e-30)).max()))
        n += 1
    assert used == set(q41), f"Q4_1 tensors not matched to a GPTQ layer: {sorted(set(q41) - used)[:3]}"
    return {"tensors": n, "max_abs_err": worst_abs, "max_err_over_step": worst_rel}


def dequantized_float_checkpoint(gptq_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write the GPTQ export as a float32 checkpoint: each GPTQ layer's weight dequantised by gptqmodel's
    own ``dequantize_weight()`` (model loaded with transformers + optimum + gptqmodel, torch kernel), every
    other tensor copied as is, ``quantization_config`` dropped, tokenizer files copied.  The input of
    :func:`reference_gguf`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GPTQConfig

    from .model import gptq_layers

    gptq_dir, out = Path(gptq_dir), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((gptq_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(gptq_dir, quantization_config=GPTQConfig(bits=int(config["quantization_config"]["bits"]), backend="torch"),
                                                 dtype=torch.float32)
    tensors = {}
    for f in _safetensors_files(gptq_dir):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if not key.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                    tensors[key] = st.get_tensor(key).clone()
    with torch.no_grad():
        for name, layer in gptq_layers(model).items():
            tensors[f"{name}.weight"] = layer.dequantize_weight().t().float().contiguous().clone()  # [K, N] -> [N, K]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in gptq_dir.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "added_tokens"))
                            or f.name in ("generation_config.json", "README.md")):
            shutil.copyfile(f, out / f.name)
    return out


def reference_gguf(float_dir: str | os.PathLike, output_path: str | os.PathLike, *, float_type: str = "f32",
                   tokenizer_pre: Optional[str] = None, model_name: Optional[str] = None,
                   converter_dir: Optional[str | os.PathLike] = None) -> Path:
    """Convert a float checkpoint with llama.cpp's converter, unmodified (``--outtype float_type``): the
    reference a Q4_1 export is compared with (:func:`compare_with_reference`)."""
    converter = llama_cpp_converter(converter_dir)
    _run_converter({"dir_model": str(Path(float_dir)), "packed_file": None, "out_path": str(Path(output_path).absolute()),
                    "float_type": float_type, "tokenizer_pre": tokenizer_pre, "model_name": model_name}, converter)
    return Path(output_path)


def _field_value(field) -> Any:
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return field.parts[-1].tolist()[0]


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value pairs of a GGUF file (``GGUFReader``), arrays as lists; the ``GGUF.*`` header fields left out."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def compare_with_reference(ours: str | os.PathLike, reference: str | os.PathLike) -> dict:
    """Compare a Q4_1 export with llama.cpp's own conversion of the dequantised model (:func:`reference_gguf`).

    Returns:
        ``{"metadata_diff": {key: (ours, reference)}, "tensor_names_equal": bool, "float_tensors_equal": [names
        that differ], "q4_1_max_abs_err": float, "q4_1_max_err_over_ref_absmax": float}``. ``metadata_diff``
        should hold only ``general.file_type`` (Q4_1 vs the reference's float type).
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    a, b = gguf_metadata(ours), gguf_metadata(reference)
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    ra, rb = GGUFReader(str(ours)), GGUFReader(str(reference))
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    float_diff, q_err, q_rel = [], 0.0, 0.0
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        dx = dequantize(x.data, x.tensor_type).astype(np.float32)
        dy = dequantize(y.data, y.tensor_type).astype(np.float32)
        if dx.shape != dy.shape:
            float_diff.append(name)
            continue
        if x.tensor_type == GGMLQuantizationType.Q4_1:
            err = float(np.abs(dx - dy).max())
            q_err = max(q_err, err)
            q_rel = max(q_rel, err / max(float(np.abs(dy).max()), 1e-30))
        elif x.tensor_type != y.tensor_type or not np.array_equal(dx, dy):
            float_diff.append(name)
    return {
        "metadata_diff": diff,
        "tensor_names_equal": set(ta) == set(tb),
        "float_tensors_differ": float_diff,
        "q4_1_tensors": sum(t.tensor_type == GGMLQuantizationType.Q4_1 for t in ta.values()),
        "q4_1_max_abs_err": q_err,
        "q4_1_max_err_over_ref_absmax": q_rel,
    }


def gguf_summary(gguf_path: str | os.PathLike, gptq_dir: Optional[str | os.PathLike]) -> dict:
    """What a GGUF export holds: tensor counts by type, ``general.file_type``, and :func:`check_gguf`'s figures
    (without ``gptq_dir``: no check, e.g. for a base + adapter file, which ``export_gguf`` checked itself)."""
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    out = {
        "architecture": bytes(reader.fields["general.architecture"].parts[-1]).decode(),
        "tensor_types": ", ".join(f"{n} {k}" for k, n in sorted(types.items())),
    }
    if gptq_dir is not None:
        check = check_gguf(gguf_path, gptq_dir)
        out["q4_1_tensors_checked"] = check["tensors"]
        out["max_err_over_step"] = f"{check['max_err_over_step']:.2e} (gguf-py decode vs GPTQ s*(q-z); fp16 rounding of m)"
    return out


GGUF_COMMIT_MESSAGE = "Upload lossless GGUF Q4_1 export (QA-LoRA merged GPTQ integers)"
GGUF_ADAPTER_COMMIT_MESSAGE = "Upload lossless GGUF Q4_1 export (GPTQ base + QA-LoRA adapter, no merge)"


def push_gguf_to_hub(
    gguf_path: str | os.PathLike,
    repo_id: str,
    *,
    gptq_dir: Optional[str | os.PathLike] = None,
    gptq_repo_id: Optional[str] = None,
    fidelity: Optional[dict] = None,
    prompt_template: Optional[str] = None,
    private: bool = False,
    commit_message: Optional[str] = None,
    token: Optional[str] = None,
    from_adapter: bool = False,
) -> str:
    """Push a GGUF file to its own Hub repo (convention: ``<gptq repo>-GGUF``) with a model card
    (:func:`qalora_hf.card.build_gguf_model_card`: llama.cpp / ollama commands) and an ollama ``Modelfile``.

    Args:
        gguf_path: the ``.gguf`` file (uploaded under its own name).
        gptq_dir: the GPTQ export it was made from (licence and base model are read from its card).
        gptq_repo_id: the GPTQ repo on the Hub (card metadata ``base_model``, relation ``quantized``).
        fidelity: measured figures for the card (see :func:`qalora_hf.card.llama_cpp_section`).
        prompt_template: an ollama ``TEMPLATE`` for the Modelfile (e.g. the Alpaca prompt the model was
            trained on); None: ollama uses the chat template stored in the GGUF.
        from_adapter: the file was written from a GPTQ base + unmerged adapter (``export_gguf(..., adapter=...)``);
            ``gptq_dir``/``gptq_repo_id`` are then the base's, and the card says so.

    Returns:
        The commit id. Retries transient failures like :func:`qalora_hf.push_gptq_to_hub`; tokens never
        appear in messages.

    Raises:
        ValueError: bad ``repo_id``, a missing file, or a file that would publish a token or a local path
            (:func:`qalora_hf.safety.assert_folder_publishable`), before any request.
        qalora_hf.hub.HubPushError: the upload failed for good.
    """
    from huggingface_hub import HfApi, constants

    from .card import build_gguf_model_card, ollama_modelfile
    from .hub import _REPO_ID, _with_retries, redact_tokens

    path = Path(gguf_path)
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise ValueError(f"{gguf_path}: not a .gguf file")
    if not _REPO_ID.fullmatch(repo_id or "") or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"repo_id {repo_id!r} is invalid: use 'namespace/name'")
    license_id, base = None, None
    if gptq_dir is not None and (Path(gptq_dir) / "README.md").is_file():
        from huggingface_hub import ModelCard

        data = ModelCard.load(Path(gptq_dir) / "README.md").data
        license_id = data.get("license")
        base = data.get("base_model")
    card = build_gguf_model_card(repo_id=repo_id, gguf_filename=path.name, gptq_repo_id=gptq_repo_id, license=license_id,
                                 upstream_base_models=base if isinstance(base, list) else [base] if base else [],
                                 fidelity=fidelity, from_adapter=from_adapter)
    commit_message = commit_message or (GGUF_ADAPTER_COMMIT_MESSAGE if from_adapter else GGUF_COMMIT_MESSAGE)
    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    secrets = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    api = HfApi(endpoint=endpoint, token=token)
    retry = {"max_retries": 5, "backoff_s": 1.0, "secrets": secrets}
    with tempfile.TemporaryDirectory(prefix="qalora-gguf-push-") as stage:
        stage = Path(stage)
        try:
            os.link(path, stage / path.name)
        except OSError:
            shutil.copyfile(path, stage / path.name)
        card.save(stage / "README.md")
        (stage / "Modelfile").write_text(ollama_modelfile(path.name, prompt_template))
        from .safety import assert_folder_publishable

        assert_folder_publishable(stage, [token])  # no token, local path or pickle (the GGUF's metadata header included)
        logger.info("pushing %s to %s/%s", path.name, redact_tokens(endpoint, secrets), repo_id)
        _with_retries("create_repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True), **retry)
        info = _with_retries("upload_folder", lambda: api.upload_folder(folder_path=str(stage), repo_id=repo_id,
                                                                         commit_message=commit_message), **retry)
    return getattr(info, "oid", None) or str(info).rstrip("/").rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python): held-out loss and a generated answer


def llama_cpp_available() -> bool:
    """True if ``llama_cpp`` (llama-cpp-python) imports."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # ImportError, or a binary that does not load on this CPU
        return False
    return True


def _llama(gguf_path, n_ctx: int, n_threads: Optional[int], logits_all: bool):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ImportError(f"llama-cpp-python is not installed; install it with: {LLAMA_INSTALL_HINT}") from None
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                 n_threads=n_threads or os.cpu_count(), verbose=False, seed=0)


def llama_cpp_completion_loss(gguf_path, tokenizer, rows, max_length: int = 256, n_threads: Optional[int] = None) -> dict:
    """Held-out loss of a GGUF model computed by llama.cpp (llama-cpp-python) on the token ids and labels
    that :func:`qalora_hf.metrics.measure` uses in transformers (:func:`qalora_hf.data.encode_row`: TRL's
    tokenisation, EOS appended, the loss over the completion tokens, cut to ``max_length``): mean
    cross-entropy in nats per counted token, from llama.cpp's logits for every position.

    Args:
        rows: dataset rows in any format :mod:`qalora_hf.data` reads (Alpaca rows, prompt/completion, text, messages).

    Returns:
        ``{"loss": float, "tokens": int, "rows": int, "same_tokens": int}``; ``same_tokens`` counts the rows
        whose text llama.cpp's own tokenizer (from the GGUF metadata) splits into the same ids as the Hugging
        Face tokenizer (a check of the GGUF's tokenizer metadata; the loss itself uses the Hugging Face ids for
        both engines).

    Raises:
        ImportError: llama-cpp-python is not installed (the message gives the install command).
    """
    import numpy as np

    from .data import IGNORE_INDEX, encode_row, row_to_prompt_completion

    encoded = []
    for row in rows:
        ids, labels = encode_row(row, tokenizer, max_length)
        text = "".join(row_to_prompt_completion(row, tokenizer))
        encoded.append((ids, labels, text, tokenizer(text, add_special_tokens=False)["input_ids"]))
    llm = _llama(gguf_path, n_ctx=max(max_length, 64), n_threads=n_threads, logits_all=True)
    total, count, same = 0.0, 0, 0
    for ids, labels, text, plain in encoded:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        tgt = np.asarray(labels[1:])
        keep = tgt != IGNORE_INDEX
        lp = logits[:-1][keep]
        lse = np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1)) + lp.max(-1)
        total += float((lse - lp[np.arange(lp.shape[0]), tgt[keep]]).sum())
        count += int(keep.sum())
        same += int(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == plain)
    llm.close()
    return {"loss": total / max(count, 1), "tokens": count, "rows": len(encoded), "same_tokens": same}


def llama_cpp_answer(gguf_path, instruction: str, max_new_tokens: int = 48, n_threads: Optional[int] = None) -> str:
    """Greedy answer of a GGUF model to an Alpaca-style instruction, generated by llama.cpp."""
    from .data import alpaca_prompt_completion

    prompt, _ = alpaca_prompt_completion({"instruction": instruction, "output": ""})
    llm = _llama(gguf_path, n_ctx=512, n_threads=n_threads, logits_all=False)
    out = llm(prompt, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
    llm.close()
    return out["choices"][0]["text"].strip()


def gguf_heldout_fidelity(gguf_path, gptq_dir, rows, *, loss_base: Optional[float] = None, loss_trained: Optional[float] = None,
                          max_length: int = 256, n_threads: Optional[int] = None, gptq_model=None,
                          loss_gptq: Optional[float] = None) -> dict:
    """Held-out loss of the GGUF in llama.cpp next to the GPTQ export's in transformers, on the same rows
    and the same token ids (:func:`llama_cpp_completion_loss`, :func:`qalora_hf.metrics.measure`).

    Args:
        gguf_path: the Q4_1 file (:func:`export_gguf`); gptq_dir: the GPTQ export it was made from (its
            tokenizer is used for both; the model is loaded with stock ``from_pretrained`` unless
            ``gptq_model`` is given, or skipped when ``loss_gptq`` is already known for these rows).
        rows: held-out dataset rows (e.g. the last rows of ``qalora_hf.data.read_rows(path)``).
        loss_base, loss_trained: held-out losses of the base GPTQ model and of the trained (unmerged)
            model on the same rows, for the fraction of the fine-tuning gain each export keeps.

    Returns:
        ``{"rows", "tokens", "same_tokens", "loss_gguf", "loss_gptq", "diff" (gguf - gptq, nats/token),
        "gain_kept_gguf", "gain_kept_gptq"}`` (gains None without ``loss_base``/``loss_trained``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import token_batches
    from .metrics import gain_kept, measure

    rows = list(rows)
    tokenizer = AutoTokenizer.from_pretrained(gptq_dir)
    lc = llama_cpp_completion_loss(gguf_path, tokenizer, rows, max_length=max_length, n_threads=n_threads)
    if loss_gptq is None:
        model = gptq_model if gptq_model is not None else AutoModelForCausalLM.from_pretrained(gptq_dir, dtype=torch.float32).eval()
        loss_gptq = measure(model, token_batches(rows, tokenizer, max_length)).loss
    out = {"rows": lc["rows"], "tokens": lc["tokens"], "same_tokens": lc["same_tokens"], "loss_gguf": lc["loss"],
           "loss_gptq": loss_gptq, "diff": lc["loss"] - loss_gptq, "gain_kept_gguf": None, "gain_kept_gptq": None}
    if loss_base is not None and loss_trained is not None:
        out["gain_kept_gguf"] = gain_kept(loss_base, loss_trained, lc["loss"])
        out["gain_kept_gptq"] = gain_kept(loss_base, loss_trained, loss_gptq)
    return out


if __name__ == "__main__":  # internal: the converter subprocess (python -m qalora_hf.gguf_export --convert spec.json)
    if len(sys.argv) == 3 and sys.argv[1] == "--convert":
        try:
            _converter_main(sys.argv[2])
        except GGUFExportError as err:
            print(f"GGUFExportError: {err}", file=sys.stderr)
            sys.exit(3)
    else:
        sys.exit("internal entry point; use qalora_hf.export_gguf or 'qalora-hf gguf'")
