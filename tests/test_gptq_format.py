"""qalora_hf.gptq_format against gptqmodel's own packing and dequantisation."""

from __future__ import annotations

import pytest
import torch
from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

from qalora_hf.gptq_format import pack, qzeros_v2_to_v1, read_layer, unpack, write_layer
from qalora_hf.gptq import gptq_layers

from conftest import config_id

BITS = (2, 3, 4, 8)
# one checkpoint per width, covering act-order and sym both ways
LAYER_CONFIGS = [(2, True, False), (3, False, True), (4, True, True), (8, False, False), (4, False, False, True)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_round_trip(bits, dim):
    gen = torch.Generator().manual_seed(bits * 10 + dim)
    shape = (64, 12) if dim == 0 else (12, 96)
    codes = torch.randint(0, 2**bits, shape, generator=gen)
    codes[0, 0], codes[-1, -1] = 0, 2**bits - 1  # extremes included
    packed = pack(codes, bits, dim=dim)
    assert packed.dtype == torch.int32
    expected_shape = (shape[0] * bits // 32, shape[1]) if dim == 0 else (shape[0], shape[1] * bits // 32)
    assert tuple(packed.shape) == expected_shape
    assert torch.equal(unpack(packed, bits, dim=dim), codes)
    assert torch.equal(pack(unpack(packed, bits, dim=dim), bits, dim=dim), packed)


def test_pack_known_words():
    # 4 bit, lowest bits first: values 0..7 -> 0x76543210; symmetric v2 zero 8 everywhere -> 0x88888888
    assert pack(torch.arange(32).remainder(8).view(32, 1), 4, dim=0)[0, 0].item() == 0x76543210
    assert pack(torch.full((1, 32), 8), 4, dim=1).tolist() == [[0x88888888 - 2**32] * 4]
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(torch.full((32, 1), 16), 4, dim=0)


@pytest.mark.parametrize("cfg", LAYER_CONFIGS, ids=config_id)
def test_read_layer_matches_gptqmodel_dequantize(cfg, load_tiny_gptq):
    bits, desc_act, sym, *rest = cfg
    model = load_tiny_gptq(bits, desc_act, sym, bool(rest and rest[0]))
    layers = gptq_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        t = read_layer(layer)
        k, n = layer.in_features, layer.out_features
        assert t.bits == bits and t.q.shape == (k, n) and t.z.shape == (k // 32, n)
        assert int(t.q.min()) >= 0 and int(t.q.max()) <= t.maxq
        if sym:
            assert bool((t.z == 2 ** (bits - 1)).all()), name  # v2 zero-points of a symmetric layer
        ref = layer.dequantize_weight().t().float()  # fp16 products, rounded
        torch.testing.assert_close(t.dequantize(), ref, atol=1e-3 * float(t.scales.abs().max()), rtol=2**-10, msg=name)
        # exact when gptqmodel also computes in float32
        orig = layer.scales.data
        layer.scales.data = orig.float()
        try:
            assert torch.equal(t.dequantize(), layer.dequantize_weight().t()), name
        finally:
            layer.scales.data = orig


@pytest.mark.parametrize("cfg", LAYER_CONFIGS[:4], ids=config_id)
def test_write_read_is_bit_identical(cfg, load_tiny_gptq):
    model = load_tiny_gptq(*cfg)
    for name, layer in gptq_layers(model).items():
        qw, qz, sc = layer.qweight.clone(), layer.qzeros.clone(), layer.scales.clone()
        t = read_layer(layer)
        write_layer(layer, q=t.q, z=t.z, scales=t.scales)
        assert torch.equal(layer.qweight, qw), name
        assert torch.equal(layer.qzeros, qz), name
        assert torch.equal(layer.scales, sc), name


@pytest.mark.parametrize("bits", BITS)
def test_qzeros_v2_to_v1_inverted_by_gptqmodel(bits, load_tiny_gptq):
    model = load_tiny_gptq(bits, False, False)
    layer = gptq_layers(model)["model.layers.0.mlp.down_proj"]  # K = 128 (G = 4), N = 64
    t = read_layer(layer)
    gen = torch.Generator().manual_seed(bits)
    z = torch.randint(0, 2**bits, t.z.shape, generator=gen)
    z[:, ::3] = 0  # many z = 0 fields: v1 stores z - 1 = -1 there (borrows across fields)
    z[0, :] = 0
    z[1, :] = 1
    z[-1, :] = 2**bits - 1
    assert z.shape[0] == 4
    write_layer(layer, z=z)
    v2 = layer.qzeros.detach().clone()
    assert torch.equal(unpack(v2, bits, dim=1)[:, : t.z.shape[1]], z)

    v1 = qzeros_v2_to_v1(v2, bits)
    assert v1.dtype == torch.int32 and v1.shape == v2.shape
    assert not torch.equal(v1, v2)
    assert torch.equal(unpack(v1, bits, dim=1)[1], torch.zeros(t.z.shape[1], dtype=torch.int64))  # z = 1 -> stored 0
    assert torch.equal(unpack(v1, bits, dim=1)[-1], torch.full((t.z.shape[1],), 2**bits - 2))
    layer.qzeros.data.copy_(v1)
    convert_gptq_v1_to_v2_format_module(layer, bits=bits, pack_dtype=torch.int32)
    assert torch.equal(layer.qzeros.data, v2)
    assert torch.equal(read_layer(layer).z, z)
