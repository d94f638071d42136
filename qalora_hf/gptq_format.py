"""Read and write the integer tensors of a gptqmodel GPTQ linear layer.

The layout (docs/gptq_format.md, gptqmodel ``PackableQuantLinear.dequantize_weight``):

* ``qweight`` int32 ``[K * bits / 32, N]``: codes ``q[i, o]`` packed along the input dim ``i``.
* ``qzeros``  int32 ``[G, N * bits / 32]``: zero-points ``z[l, o]`` packed along the output dim ``o``.
* ``scales``  fp16  ``[G, N]``, ``g_idx`` int32 ``[K]``.
* ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])``.

Every supported width (2, 3, 4, 8 bits) packs 32 values into ``bits`` consecutive int32 words as one
little-endian bit stream: value ``j`` starts at bit ``j * bits`` of the stream.  For 2/4/8 bits that
is the familiar ``value << (j * bits)`` inside one word; for 3 bits it is gptqmodel's "10-1-10-1-10"
layout, whose values 10 and 21 straddle two words.  One generic packer therefore covers all widths;
``tests/test_gptq_format.py`` round-trips it against gptqmodel's own ``dequantize_weight``.

In memory, gptqmodel's torch kernels hold *v2* zero-points (the real ``z``).  On disk the ``gptq``
(v1) checkpoint format stores ``z - 1``; :func:`qzeros_v2_to_v1` applies gptqmodel's own conversion.

We pack by hand rather than through ``PackableQuantLinear.pack_block`` because that API re-derives
codes by rounding a float weight and needs ``out_features % 32 == 0``; the merge must write the
exact integer codes it chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

from .gptq import SUPPORTED_BITS, kernel_mergeable  # noqa: F401  (SUPPORTED_BITS: defined with the other GPTQ facts)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}.")


def _bit_positions(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(32, dtype=torch.int64) * bits
    return start // 32, start % 32  # word index inside the block, shift inside that word


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack int32 words into integer codes along ``dim`` (0: rows, 1: columns).

    Args:
        packed: int32 tensor, 2-D; its size along ``dim`` is a multiple of ``bits``.
        bits: 2, 3, 4 or 8.
        dim: the packed dimension (0 for ``qweight``, 1 for ``qzeros``).

    Returns:
        int64 tensor whose size along ``dim`` is ``packed.size(dim) * 32 // bits``, values in
        ``[0, 2**bits - 1]``.
    """
    _check_bits(bits)
    x = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 1:
        x = x.t()
    words, cols = x.shape
    blocks = x.reshape(words // bits, bits, cols)
    word, shift = _bit_positions(bits)
    mask = (1 << bits) - 1
    lo = blocks[:, word, :] >> shift.view(1, 32, 1)
    # Bits that spill into the next word (3-bit only); for 2/4/8 bits spill is always 0.
    spill = (shift + bits - 32).clamp(min=0)
    nxt = (word + 1).clamp(max=bits - 1)
    hi = (blocks[:, nxt, :] << (bits - spill).view(1, 32, 1)) * (spill > 0).view(1, 32, 1)
    values = ((lo | hi) & mask).reshape(words // bits * 32, cols)
    return values.t().contiguous() if dim == 1 else values


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`unpack`: pack integer codes in ``[0, 2**bits - 1]`` into int32 words.

    Raises:
        ValueError: a value outside ``[0, 2**bits - 1]`` or a packed size not a multiple of 32.
    """
    _check_bits(bits)
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > (1 << bits) - 1):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}; got [{int(v.min())}, {int(v.max())}].")
    if dim == 1:
        v = v.t()
    n, cols = v.shape
    if n % 32:
        raise ValueError(f"the packed dimension ({n}) must be a multiple of 32.")
    blocks = v.reshape(n // 32, 32, cols)
    word, shift = _bit_positions(bits)
    out = torch.zeros(n // 32, bits, cols, dtype=torch.int64)
    for j in range(32):
        w, s = int(word[j]), int(shift[j])
        out[:, w, :] |= blocks[:, j, :] << s
        if s + bits > 32:
            out[:, w + 1, :] |= blocks[:, j, :] >> (32 - s)
    out = (out & 0xFFFFFFFF).reshape(n // 32 * bits, cols)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.t().contiguous() if dim == 1 else out


@dataclass
class GPTQTensors:
    """The unpacked integer state of one GPTQ layer (all on CPU).

    Attributes:
        q: int64 ``[K, N]`` codes.
        z: int64 ``[G, N]`` zero-points (v2: the real ``z``).
        scales: float32 ``[G, N]`` (exact copies of the fp16 scales).
        g_idx: int64 ``[K]`` group of each input channel.
        bits: code width.
    """

    q: torch.Tensor
    z: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def dequantize(self) -> torch.Tensor:
        """Float32 ``W[o, i]`` of shape ``[N, K]`` (the ``nn.Linear`` layout)."""
        g = self.g_idx
        return (self.scales[g] * (self.q - self.z[g]).to(torch.float32)).t().contiguous()


#: Group sizes a ragged GPTQ model is split into on export, largest first (every GPTQ kernel takes them).
SPLIT_GROUP_SIZES = (128, 64, 32, 16)


def exact_group_size(group_size: int, in_features, sizes=SPLIT_GROUP_SIZES) -> Optional[int]:
    """The group size that holds GPTQ groups of ``group_size`` exactly on layers of these ``in_features``.

    ``group_size`` when it divides every ``in_features`` (or is -1, one group per row).  Otherwise GPTQ made a ragged last group
    (SmolLM2's 576 with 128: four groups of 128 and one of 64), which most kernels refuse (gptqmodel's CPU kernels,
    Marlin, vLLM: ``in_features`` must be a multiple of ``group_size``) and AWQ's layout cannot hold; then the largest
    of ``sizes`` dividing ``group_size`` and every ``in_features``, each group becoming ``group_size / a`` groups of
    ``a`` with its scale and zero-point (:func:`split_groups`): the same weights, bit for bit.  None when none does.
    """
    if group_size <= 0 or all(k % group_size == 0 for k in in_features):
        return group_size
    fits = [a for a in sizes if group_size % a == 0 and all(k % a == 0 for k in in_features)]
    return max(fits) if fits else None


def rank_in_group(g_idx: torch.Tensor) -> torch.Tensor:
    """int64 ``[K]``: the position of each input channel among the channels of its group, in channel order."""
    g_idx = g_idx.detach().cpu().to(torch.int64)
    counts = torch.bincount(g_idx)
    perm = torch.argsort(g_idx, stable=True)
    rank = torch.empty_like(g_idx)
    rank[perm] = torch.arange(g_idx.numel()) - (torch.cumsum(counts, 0) - counts)[g_idx[perm]]
    return rank


def split_groups(g_idx: torch.Tensor, group_size: int, new_group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split every quantisation group into groups of ``new_group_size`` (a divisor of ``group_size`` and ``K``).

    A group's channels, in channel order, fill its new groups ``new_group_size`` at a time, so with act-order off
    the result is ``arange(K) // new_group_size``; with act-order every new group still holds channels of one
    old group only.

    Returns:
        ``(new_g_idx, rows)``: int64 ``[K]`` the new group of each channel, and int64 ``[K / new_group_size]`` the old
        group of each new group: ``scales[rows]`` and ``qzeros[rows]`` (rows are groups in both, packed or not) are
        the new layer's, and it dequantises to the same weights.

    Raises:
        ValueError: ``new_group_size`` does not divide ``group_size`` and ``K``.
    """
    g_idx = g_idx.detach().cpu().to(torch.int64)
    k = g_idx.numel()
    if group_size % new_group_size or k % new_group_size:
        raise ValueError(f"new_group_size={new_group_size} must divide group_size={group_size} and in_features={k}.")
    per = group_size // new_group_size
    return g_idx * per + rank_in_group(g_idx) // new_group_size, torch.arange(k // new_group_size) // per


def read_layer(layer) -> GPTQTensors:
    """Unpack a gptqmodel ``BaseQuantLinear`` (``qweight``/``qzeros``/``scales``/``g_idx``) to integers.

    Raises:
        TypeError: ``layer`` has no GPTQ buffers.
        ValueError: the kernel does not keep gptqmodel's packed layout and v2 zero-points in memory
            (:func:`qalora_hf.gptq.kernel_mergeable`: e.g. ``TorchFusedLinear``, which repacks on its first
            inference forward); load the model with ``GPTQConfig(bits=..., backend="torch")``.
    """
    for name in ("qweight", "qzeros", "scales", "g_idx", "bits"):
        if not hasattr(layer, name):
            raise TypeError(f"{type(layer).__name__} is not a GPTQ layer (no `{name}`).")
    if not kernel_mergeable(type(layer)):
        raise ValueError(
            f"{type(layer).__name__} does not keep gptqmodel's packed qweight and v2 zero-points in memory (it repacks "
            'them for its own matmul, or holds v1 zero-points); load the model with GPTQConfig(bits=..., backend="torch").'
        )
    bits = int(layer.bits)
    k, n = layer.in_features, layer.out_features
    q = unpack(layer.qweight.detach().cpu(), bits, dim=0)[:k, :n]
    z = unpack(layer.qzeros.detach().cpu(), bits, dim=1)[:, :n]
    return GPTQTensors(
        q=q,
        z=z,
        scales=layer.scales.detach().cpu().to(torch.float32).clone(),  # a copy even when already fp32 on CPU
        g_idx=layer.g_idx.detach().cpu().to(torch.int64),
        bits=bits,
    )


def write_layer(layer, q: torch.Tensor | None = None, z: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> None:
    """Write new codes, zero-points and/or scales into a gptqmodel layer in place.

    Args:
        q: int ``[K, N]`` codes in ``[0, 2**bits - 1]``, or None to keep them.
        z: int ``[G, N]`` v2 zero-points in ``[0, 2**bits - 1]``, or None to keep them.
        scales: float ``[G, N]`` (stored as the layer's scale dtype, fp16), or None to keep them.

    Raises:
        ValueError: a code or zero-point outside the ``bits`` range, or a shape mismatch.
    """
    bits = int(layer.bits)
    if q is not None:
        if tuple(q.shape) != (layer.in_features, layer.out_features):
            raise ValueError(f"q has shape {tuple(q.shape)}, expected {(layer.in_features, layer.out_features)}.")
        packed = pack(_pad(q, layer.qweight.shape[0] * 32 // bits, layer.qweight.shape[1]), bits, dim=0)
        layer.qweight.data.copy_(packed.to(layer.qweight.device))
    if z is not None:
        if tuple(z.shape) != tuple(layer.scales.shape):
            raise ValueError(f"z has shape {tuple(z.shape)}, expected {tuple(layer.scales.shape)}.")
        packed = pack(_pad(z, layer.qzeros.shape[0], layer.qzeros.shape[1] * 32 // bits), bits, dim=1)
        layer.qzeros.data.copy_(packed.to(layer.qzeros.device))
    if scales is not None:
        layer.scales.data.copy_(scales.to(layer.scales.dtype).to(layer.scales.device))
    for hook in ("clear_weight_cache", "_stream_reset_cache"):
        fn = getattr(layer, hook, None)
        if callable(fn):
            fn()


def _pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if tuple(x.shape) == (rows, cols):
        return x
    out = torch.zeros(rows, cols, dtype=torch.int64)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def qzeros_v2_to_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed v2 ``qzeros`` (real ``z``) -> the ``checkpoint_format="gptq"`` (v1) words on disk.

    Uses gptqmodel's own ``convert_gptq_v2_to_v1_format_module`` so that gptqmodel's v1 loader (which
    transformers + optimum use) inverts it exactly, including ``z = 0`` fields.
    """
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    holder = _qzeros_holder(qzeros, bits, fmt=2)
    convert_gptq_v2_to_v1_format_module(holder, quantize_config=SimpleNamespace(bits=bits, pack_dtype=torch.int32))
    return holder.qzeros.data


def _qzeros_holder(qzeros: torch.Tensor, bits: int, fmt: int):
    """A bare gptqmodel layer holding a copy of ``qzeros`` (int32 packing, in format ``fmt``), for its converters."""
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    holder = PackableQuantLinear.__new__(PackableQuantLinear)
    torch.nn.Module.__init__(holder)
    holder.qzeros = torch.nn.Parameter(qzeros.clone(), requires_grad=False)
    holder.bits = bits
    holder.pack_dtype = torch.int32
    holder.planar = False
    holder._qzeros_format = fmt
    return holder


def qzeros_v1_to_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`qzeros_v2_to_v1` (gptqmodel's own ``convert_gptq_v1_to_v2_format_module``), on a copy."""
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    holder = _qzeros_holder(qzeros, bits, fmt=1)
    convert_gptq_v1_to_v2_format_module(holder, bits=bits, pack_dtype=torch.int32)
    return holder.qzeros.data


def checkpoint_format(config) -> str:
    """The on-disk zero-point format a transformers config's ``quantization_config`` names: ``"gptq"`` (v1,
    stores ``z - 1``) or ``"gptq_v2"`` (stores ``z``)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return "gptq"
    if isinstance(qc, dict):
        fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    else:
        fmt = getattr(qc, "format", None) or getattr(qc, "checkpoint_format", None) or "gptq"
    return str(getattr(fmt, "value", fmt)).lower()


def set_checkpoint_format(config, fmt: str) -> None:
    """Set the ``checkpoint_format`` label of a config's ``quantization_config`` (object or dict) to ``fmt``."""
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict):
        qc["checkpoint_format"] = fmt
        qc.pop("format", None)
    elif qc is not None:
        qc.format = fmt


def install_checkpoint_format_hooks(model) -> int:
    """Make ``model.state_dict()`` hold ``qzeros`` in the format its config names, and ``load_state_dict`` read them back.

    gptqmodel's trainable kernels keep v2 zero-points in memory (the real ``z``) while a checkpoint
    loaded from disk keeps ``checkpoint_format: "gptq"`` (v1: ``z - 1``) in its config, and
    transformers' ``save_pretrained`` / ``push_to_hub`` write ``model.state_dict()`` as it is: without
    these hooks a load -> save -> load round trip shifts every zero-point by one (docs/gptq_format.md).
    The state-dict hook converts a *copy* of each layer's ``qzeros`` from the layer's in-memory format
    (v2 for kernels with ``REQUIRES_FORMAT_V2``, else ``layer.qzero_format()``) to the labelled one with gptqmodel's own converters; the load pre-hook does
    the inverse, so ``model.load_state_dict(model.state_dict())`` is the identity.  The label is read at
    call time from ``model.config``.  Idempotent.

    Returns:
        How many GPTQ layers got the hooks (0 when all already had them).
    """
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    config = model.config
    added = 0

    def wanted() -> int:
        return 2 if checkpoint_format(config) == "gptq_v2" else 1

    def in_memory(module) -> int:
        # Kernels that require v2 hold v2 whatever their (not always updated) qzero_format() says: after
        # GPTQ packing gptqmodel leaves it at 1 while the buffers hold the real z.
        return 2 if getattr(type(module), "REQUIRES_FORMAT_V2", False) else module.qzero_format()

    def to_disk(module, state_dict, prefix, local_metadata):
        key = prefix + "qzeros"
        have, want = in_memory(module), wanted()
        if key in state_dict and have != want:
            convert = qzeros_v2_to_v1 if want == 1 else qzeros_v1_to_v2
            state_dict[key] = convert(state_dict[key].detach().cpu(), int(module.bits)).to(state_dict[key].device)

    def from_disk(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "qzeros"
        have, want = in_memory(module), wanted()
        if key in state_dict and have != want:
            convert = qzeros_v1_to_v2 if want == 1 else qzeros_v2_to_v1
            state_dict[key] = convert(state_dict[key].detach().cpu(), int(module.bits)).to(state_dict[key].device)

    for module in model.modules():
        if isinstance(module, BaseQuantLinear) and hasattr(module, "qzeros") and hasattr(module, "qzero_format"):
            if getattr(module, "_qalora_format_hooks", False):
                continue
            module.register_state_dict_post_hook(to_disk)
            module.register_load_state_dict_pre_hook(from_disk)
            module._qalora_format_hooks = True
            added += 1
    return added


def count_zero_points_at_0(model) -> int:
    """How many zero-points of ``model``'s GPTQ layers are exactly 0.

    The v1 checkpoint format stores ``z - 1`` per packed field; gptqmodel writes ``-1`` with word
    arithmetic (the borrow runs into the neighbouring fields) and its own loader inverts that exactly, but an
    engine that unpacks v1 field by field (``field + 1``, the ExLlama ``gptq`` path of vLLM and SGLang)
    misreads such a group and its neighbours by up to ``2**bits`` steps.  The merge never creates a new 0;
    a base checkpoint may hold some.  The AWQ and GGUF exports store ``z`` itself and are not affected.
    Counts the layers whose integers can be read (:func:`qalora_hf.gptq.kernel_mergeable`).
    """
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    total = 0
    for module in model.modules():
        if isinstance(module, BaseQuantLinear) and kernel_mergeable(type(module)):
            total += int((read_layer(module).z == 0).sum())
    return total
