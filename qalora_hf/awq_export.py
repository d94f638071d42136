"""The merged GPTQ integers, repacked losslessly into AWQ's GEMM layout (for vLLM/SGLang Marlin, mlx-lm, transformers).

A merged QA-LoRA model is asymmetric (``sym: false``).  vLLM and SGLang run an asymmetric GPTQ checkpoint on
their slow ExLlama path only, and mlx-lm refuses any checkpoint with a ``g_idx``; the same integers written
in AWQ's layout reach vLLM's ``awq_marlin`` (zero-points, group size 32/64/128), SGLang's AWQ-Marlin, mlx-lm
and transformers (through gptqmodel).  See docs/awq.md for the engines and the checks in their source.

Both formats dequantise a 4-bit weight the same way, ``W[o, i] = s[l, o] * (q[i, o] - z[l, o])`` with
integer zero-points and ``l = i // group_size``; only the packing differs:

========  =====================  ==========================  ======================================
tensor    GPTQ v1 (``export_gptq``)  AWQ GEMM (this module)  note
========  =====================  ==========================  ======================================
qweight   int32 ``[K/8, N]``         int32 ``[K, N/8]``      AWQ packs along the outputs, nibbles in
                                                             the order ``[0, 2, 4, 6, 1, 3, 5, 7]``
qzeros    int32 ``[G, N/8]``, z-1    int32 ``[G, N/8]``, z   same interleave; AWQ stores ``z`` itself
scales    fp16 ``[G, N]``            fp16 ``[G, N]``         unchanged
g_idx     int32 ``[K]``              (none)                  so act-order cannot be written as AWQ
========  =====================  ==========================  ======================================

The packing is gptqmodel's own ``pack_awq`` (``gptqmodel/quantization/awq/utils/packing_utils.py``), which
takes exact integer codes; its inverse there (``unpack_awq`` + ``reverse_awq_order`` inside
``dequantize_gemm``) is what gptqmodel's AWQ kernels run, and ``tests/test_awq_export.py`` checks every
layer against it bit for bit.  Only the checks, the state dict and the config are written here.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch

logger = logging.getLogger(__name__)

AWQ_BITS = 4
#: Group sizes every AWQ kernel we target takes: vLLM ``awq_marlin`` (``MARLIN_SUPPORTED_GROUP_SIZES`` minus -1),
#: gptqmodel's AWQ kernels (torch, Marlin, ExLlamaV2, GEMM) and MLX (``mx.quantize``: 32, 64, 128).
AWQ_GROUP_SIZES = (32, 64, 128)
#: What the AWQ GEMM layout packs into one int32: 8 nibbles along the outputs.
AWQ_PACK = 32 // AWQ_BITS


class AwqExportError(ValueError):
    """The model cannot be written losslessly in AWQ's layout; the message says what would export."""


# --------------------------------------------------------------------------------------------------
# One layer


def awq_pack_layer(q: torch.Tensor, z: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pack one layer's exact integers into AWQ GEMM tensors with gptqmodel's ``pack_awq``.

    Args:
        q: integer codes ``[K, N]`` (``q[i, o]``, GPTQ's orientation), values in ``[0, 15]``.
        z: integer zero-points ``[G, N]`` (the real ``z``, GPTQ "v2"), values in ``[0, 15]``.
        scales: ``[G, N]`` fp16 (or float holding fp16 values exactly).

    Returns:
        ``{"qweight": int32 [K, N/8], "qzeros": int32 [G, N/8], "scales": fp16 [G, N]}``.

    Raises:
        ValueError: a code or zero-point outside ``[0, 15]``, ``N`` not a multiple of 8, a scale that is not
            an fp16 value, or mismatched shapes.
    """
    from gptqmodel.quantization.awq.utils.packing_utils import pack_awq

    k, n = q.shape
    if z.shape != scales.shape or z.shape[1] != n:
        raise ValueError(f"q {tuple(q.shape)}, z {tuple(z.shape)} and scales {tuple(scales.shape)} do not fit one layer.")
    if n % AWQ_PACK:
        raise ValueError(f"out_features={n} is not a multiple of {AWQ_PACK}: AWQ packs 8 outputs per int32.")
    for name, t in (("q", q), ("z", z)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 15):
            raise ValueError(f"{name} must lie in [0, 15] for 4-bit AWQ; got [{int(t.min())}, {int(t.max())}].")
    scales16 = scales.to(torch.float16)
    if not torch.equal(scales16.to(scales.dtype), scales):
        raise ValueError("scales hold values that fp16 cannot represent; AWQ stores fp16 scales, so the repack would round them.")
    # pack_awq masks with `& 15` and packs with int32 shifts: exact for codes already in [0, 15] (checked above).
    qweight, qzeros = pack_awq(q.to(torch.int32).contiguous(), z.to(torch.int32).contiguous(), AWQ_BITS)
    return {"qweight": qweight.contiguous(), "qzeros": qzeros.contiguous(), "scales": scales16.contiguous()}


def awq_unpack_layer(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`awq_pack_layer` through gptqmodel's own ``unpack_awq`` + ``reverse_awq_order``.

    Returns:
        int64 ``q [K, N]`` and ``z [G, N]``.
    """
    from gptqmodel.quantization.awq.utils.packing_utils import reverse_awq_order, unpack_awq

    q, z = unpack_awq(qweight, qzeros, AWQ_BITS)
    q, z = reverse_awq_order(q, z, AWQ_BITS)
    return (q & 15).to(torch.int64), (z & 15).to(torch.int64)


# --------------------------------------------------------------------------------------------------
# Checks (all before anything is loaded or written)

_GPTQ_INSTEAD = "export_gptq (GPTQ v1; vLLM/SGLang then run it on their ExLlama kernel)"


def check_awq_config(qc: dict, where: str = "the model") -> int:
    """Check a GPTQ ``quantization_config`` dict for a lossless AWQ repack; returns its group size.

    Raises:
        AwqExportError: not GPTQ, bits other than 4, act-order, or a group size AWQ kernels do not take.
    """
    method = str(qc.get("quant_method", "")).lower().replace("quantizationmethod.", "")
    if method == "awq":
        raise AwqExportError(f"{where} is already an AWQ checkpoint; there is nothing to repack.")
    if method != "gptq":
        raise AwqExportError(f"{where} is quantised with {method!r}, not GPTQ; export_awq repacks GPTQ integers "
                             "(merge a QA-LoRA adapter into its GPTQ base first).")
    bits = int(qc.get("bits", 0))
    if bits != AWQ_BITS:
        raise AwqExportError(f"{where} is {bits}-bit; AWQ's GEMM layout is 4-bit only, so it cannot be written as AWQ "
                             f"without re-quantising. Write it with {_GPTQ_INSTEAD}, or quantise the base at 4 bits.")
    if qc.get("desc_act"):
        raise AwqExportError(f"{where} uses act-order (desc_act=True); AWQ has no g_idx, so its permuted groups cannot be "
                             f"written as AWQ. Write it with {_GPTQ_INSTEAD}, or quantise the base with desc_act=False "
                             "for an AWQ-exportable model.")
    group_size = int(qc.get("group_size", -1))
    if group_size not in AWQ_GROUP_SIZES:
        raise AwqExportError(f"{where} has group_size={group_size}; the AWQ kernels (vLLM awq_marlin, gptqmodel, MLX) "
                             f"take group sizes {list(AWQ_GROUP_SIZES)}. Write it with {_GPTQ_INSTEAD}, or quantise "
                             f"the base with a group size in {list(AWQ_GROUP_SIZES)}.")
    return group_size


def _check_layer(name: str, layer, group_size: int) -> None:
    bits, k, n = int(layer.bits), int(layer.in_features), int(layer.out_features)
    if bits != AWQ_BITS:
        raise AwqExportError(f"layer {name} is {bits}-bit; AWQ is 4-bit only. Write the model with {_GPTQ_INSTEAD}.")
    if int(layer.group_size) != group_size:
        raise AwqExportError(f"layer {name} has group_size={int(layer.group_size)}, the model {group_size}; AWQ's config "
                             f"has one group size for all layers. Write the model with {_GPTQ_INSTEAD}.")
    if n % AWQ_PACK:
        raise AwqExportError(f"layer {name} has out_features={n}, not a multiple of {AWQ_PACK}; AWQ packs 8 outputs per "
                             f"int32. Write the model with {_GPTQ_INSTEAD}.")
    g_idx = layer.g_idx.detach().cpu().to(torch.int64)
    if not torch.equal(g_idx, torch.arange(k) // group_size):
        raise AwqExportError(f"layer {name} has a permuted g_idx (act-order); AWQ has no g_idx, so it cannot be written as "
                             f"AWQ. Write the model with {_GPTQ_INSTEAD}, or quantise the base with desc_act=False.")


def check_awq_exportable(model) -> tuple[int, dict[str, torch.nn.Module]]:
    """Check an in-memory (merged) GPTQ model for a lossless AWQ repack.

    Returns:
        ``(group_size, {qualified name: gptqmodel layer})``.

    Raises:
        AwqExportError: the model still holds adapters, is a float model, is not GPTQ, or a setting/layer AWQ
            cannot hold (see :func:`check_awq_config`).
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .model import gptq_layers

    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise AwqExportError("the model still holds (QA-)LoRA adapters; merge them first with qalora_hf.merge_qalora(model), "
                             "then export the merged model (AWQ, like GPTQ, stores integers only).")
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    layers = gptq_layers(model)
    if qc is None and not layers:
        raise AwqExportError(f"{type(model).__name__} is a float model (no quantization_config, no GPTQ layers); export_awq "
                             "repacks GPTQ integers losslessly. Quantise it to GPTQ 4-bit first (qalora_hf.QuantizeConfig "
                             "or transformers.GPTQConfig, desc_act=False, group size 32/64/128).")
    group_size = check_awq_config(qc if isinstance(qc, dict) else qc.to_dict()) if qc is not None else None
    if not layers:
        raise AwqExportError("the model has no gptqmodel quantised layers to repack.")
    if group_size is None:
        group_size = int(next(iter(layers.values())).group_size)
        if group_size not in AWQ_GROUP_SIZES:
            raise AwqExportError(f"the model has group_size={group_size}; AWQ kernels take {list(AWQ_GROUP_SIZES)}.")
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, layer in layers.items():
        if out_emb is not None and layer is out_emb:
            raise AwqExportError(f"layer {name} (the output embedding) is quantised; transformers' AWQ loader always keeps "
                                 f"the output embedding in float, so it could not load it. Write the model with {_GPTQ_INSTEAD}.")
        _check_layer(name, layer, group_size)
    return awq_group_size(group_size, [int(layer.in_features) for layer in layers.values()]), layers


def awq_group_size(group_size: int, in_features: list[int]) -> int:
    """The AWQ group size that holds GPTQ groups of ``group_size`` exactly: ``group_size``, or for a ragged last group
    the largest AWQ group size dividing it and every ``in_features`` (:func:`qalora_hf.gptq_format.exact_group_size`).

    Raises:
        AwqExportError: no AWQ group size (32, 64, 128) divides them all.
    """
    from .gptq_format import exact_group_size

    a = exact_group_size(group_size, in_features, AWQ_GROUP_SIZES)
    if a is None:
        raise AwqExportError(f"group_size={group_size} leaves a ragged last group on in_features "
                             f"{sorted({k for k in in_features if k % group_size})}, and no AWQ group size "
                             f"{list(AWQ_GROUP_SIZES)} divides both; AWQ has no partial groups. Write the model with {_GPTQ_INSTEAD}.")
    return a


def awq_quantization_config(group_size: int, modules_to_not_convert: Optional[list[str]] = None) -> dict:
    """The ``quantization_config`` of an AWQ GEMM checkpoint, as AutoAWQ writes it.

    Keys read by transformers 5 (``AwqConfig``: ``bits``, ``group_size``, ``zero_point``, ``version`` -> ``format``,
    ``modules_to_not_convert``) and gptqmodel (the same, through ``hf_select_quant_linear_v2``), both read here; vLLM's
    ``AWQConfig`` / ``AWQMarlinConfig.from_config`` read ``bits``, ``group_size``, ``zero_point`` and
    ``modules_to_not_convert`` (our reading of its source; not run here).
    ``zero_point: true`` is the asymmetric form ``s * (q - z)``.
    """
    return {
        "quant_method": "awq",
        "bits": AWQ_BITS,
        "group_size": int(group_size),
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": modules_to_not_convert or None,
    }


def _float_linears(model, layers: dict) -> list[str]:
    """Float ``nn.Linear`` modules that stay unquantised (transformers would otherwise make them AWQ layers)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in layers]
    # Plain names, not regexes: vLLM matches them as substrings of a layer's prefix, transformers as a prefix up to a
    # module boundary (a "." in a name matches itself there too).  lm_head is in transformers' default skips; it is
    # listed anyway so that every engine knows.
    return names


def awq_state_dict(model, layers: dict) -> dict[str, torch.Tensor]:
    """The model's state dict with every GPTQ layer's ``qweight``/``qzeros``/``scales``/``g_idx`` replaced by AWQ's tensors.

    Every other tensor (embeddings, norms, biases, float layers) is kept exactly, in its dtype.
    """
    from .gptq_format import read_layer

    sd = dict(model.state_dict())
    for name, layer in layers.items():
        t = read_layer(layer)
        packed = awq_pack_layer(t.q, t.z, t.scales)
        sd.pop(f"{name}.g_idx", None)
        for key, value in packed.items():
            sd[f"{name}.{key}"] = value
    return sd


# --------------------------------------------------------------------------------------------------
# Export


def _check_gptq_dir(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a GPTQ export directory (export_gptq) or a merged model.")
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if qc is None:
        raise AwqExportError(f"{path} is a float model (no quantization_config); export_awq repacks GPTQ integers. "
                             "Quantise it to GPTQ 4-bit first (desc_act=False, group size 32/64/128).")
    check_awq_config(qc, where=str(path.name))
    if (path / "adapter_config.json").is_file():
        raise AwqExportError(f"{path} is a PEFT adapter directory; merge the adapter into its GPTQ base first "
                             "(qalora-hf merge), then export the merged model.")
    return config


def load_gptq_export(path: Union[str, os.PathLike]):
    """Load a GPTQ export directory for repacking: gptqmodel's torch kernel (v2 zero-points in memory), tensors in
    their on-disk dtype.  Returns ``(model, tokenizer or None)``."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    path = Path(path)
    config = _check_gptq_dir(path)
    bits = int(config["quantization_config"]["bits"])
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQConfig(bits=bits, backend="torch"), dtype="auto")
    model.eval()
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def export_awq(
    model_or_dir,
    output_dir: Union[str, os.PathLike],
    tokenizer=None,
    card=None,
    extra_files: Optional[dict[str, Union[str, os.PathLike]]] = None,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
    adapter_dir: Optional[Union[str, os.PathLike]] = None,
    base_model_id: Optional[str] = None,
    tokens: tuple = (),
) -> Path:
    """Write a merged 4-bit GPTQ model, losslessly, as an AWQ GEMM checkpoint, atomically.

    The integer codes, integer zero-points and fp16 scales are the GPTQ model's own, repacked into AWQ's GEMM
    layout (see the module docstring and docs/awq.md); every other tensor is written unchanged.  The directory
    holds ``*.safetensors``, ``config.json`` with :func:`awq_quantization_config`, ``generation_config.json``,
    the tokenizer, ``README.md`` from ``card`` (a ``huggingface_hub.ModelCard``), the adapter's
    ``adapter_config.json`` + ``adapter_model.safetensors`` in ``adapter/`` (``base_model_name_or_path`` set to
    ``base_model_id`` or stripped of local directories) and ``extra_files`` (``{relative name: source path}``).
    It is written into a hidden temporary directory beside ``output_dir``, checked by
    :func:`qalora_hf.safety.assert_folder_publishable` (no pickle, no token — ``tokens`` adds exact values —,
    no local path) and renamed into place when complete, as :func:`qalora_hf.export_gptq` does.

    Args:
        model_or_dir: a merged transformers GPTQ model in memory (gptqmodel layers with v2 zero-points, e.g.
            the output of ``merge_qalora`` or a model loaded with ``GPTQConfig(bits=4, backend="torch")``), or
            the path of a GPTQ export directory (loaded with gptqmodel's torch kernel; its tokenizer is copied
            when ``tokenizer`` is None).
        output_dir: target directory.
        overwrite: replace a non-empty ``output_dir``.

    Returns:
        ``Path(output_dir)`` (absolute).

    Raises:
        AwqExportError (a ``ValueError``): the model still holds adapters (merge first), is a float model, is
            not 4-bit, uses act-order (AWQ has no ``g_idx``), or has a group size other than 32/64/128, or a
            layer whose ``out_features`` is not a multiple of 8.  A ragged last group (``in_features`` not a
            multiple of the group size) is split in place into smaller AWQ groups (:func:`awq_group_size`), exactly.  The
            message names what would export instead.  Raised before anything is written.
        FileExistsError: ``output_dir`` exists and is not empty, and ``overwrite`` is False.
        FileNotFoundError: ``model_or_dir`` is a path without ``config.json``, an extra file is missing, or
            ``adapter_dir`` lacks ``adapter_config.json`` / ``adapter_model.safetensors``.
        ValueError: an ``extra_files`` name outside the export, or a file that would publish a pickle, a token
            or a local path (nothing is renamed into place then).
    """
    from .export import _check_extra_names, write_export_dir
    from .gptq import split_ragged_groups
    from .safety import check_adapter_dir

    target = Path(output_dir).absolute()
    if isinstance(model_or_dir, (str, os.PathLike)):
        src = Path(model_or_dir)
        _check_gptq_dir(src)  # cheap refusals before loading
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} exists and is not empty; choose another output_dir or pass overwrite=True.")
        model, dir_tokenizer = load_gptq_export(src)
        tokenizer = tokenizer if tokenizer is not None else dir_tokenizer
    else:
        model = model_or_dir
    group_size, layers = check_awq_exportable(model)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose another output_dir or pass overwrite=True.")
    for name, src in (extra_files or {}).items():
        if not Path(src).is_file():
            raise FileNotFoundError(f"extra file {name!r}: {src} does not exist.")
    if adapter_dir is not None:
        adapter_dir = check_adapter_dir(adapter_dir)
    _check_extra_names(extra_files or {})
    # a ragged last group: split in place into the AWQ group size (the same weights), as export_gptq does
    split_ragged_groups(model, sizes=(group_size,))
    state_dict = awq_state_dict(model, layers)
    qconfig = awq_quantization_config(group_size, _float_linears(model, layers))


    def write_weights(tmp: Path) -> None:
        # transformers' GPTQ quantizer would swap in the in-memory (GPTQ) state dict; detach it for the write.
        quantizer = getattr(model, "hf_quantizer", None)
        model.hf_quantizer = None
        try:
            model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
        finally:
            model.hf_quantizer = quantizer

    write_export_dir(target, write_weights, model=model, quantization_config=qconfig, tokenizer=tokenizer, card=card,
                     adapter_dir=adapter_dir, extra_files=extra_files, base_model_id=base_model_id, tokens=tokens)
    logger.info("exported AWQ (GEMM, group size %d) checkpoint to %s", group_size, target)
    return target


def awq_sibling_repo_id(repo_id: str) -> str:
    """The Hub name of the AWQ sibling of a GPTQ repo: a trailing ``-GPTQ``/``-gptq-4bit``/``-GPTQ-Int4`` becomes
    ``-AWQ``; otherwise ``-AWQ`` is appended (``me/model-gptq-4bit`` -> ``me/model-AWQ``)."""
    namespace, _, name = repo_id.rpartition("/")
    stem = re.sub(r"[-_]gptq([-_](4bit|4-bit|int4|w4))?$", "", name, flags=re.IGNORECASE)
    return f"{namespace + '/' if namespace else ''}{stem}-AWQ"
