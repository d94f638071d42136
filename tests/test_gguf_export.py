"""GGUF Q4_1 export: exact blocks (gguf-py's own decoder and quantiser), llama.cpp's converter as the
reference for everything else, refusals before anything is written, and llama.cpp itself when installed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qalora_hf.gguf_export import (  # noqa: E402
    GGUFExportError,
    check_gguf,
    compare_with_reference,
    dequantized_float_checkpoint,
    export_gguf,
    gguf_metadata,
    llama_cpp_available,
    pack_q4_1,
    reference_gguf,
)

MODEL_NAME = "tiny-qalora"
TOKENIZER_PRE = "gpt-2"  # the tiny test tokenizer is a fresh byte-level BPE: its hash is in no converter table


def _q4_1(rows: np.ndarray, n: int, k: int) -> np.ndarray:
    return gguf.quants.dequantize(rows, gguf.GGMLQuantizationType.Q4_1).reshape(n, k)


def _synthetic(k=128, n=6, group_size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    q = torch.randint(0, 16, (k, n), generator=g)
    q[::16] = 0  # every block of 32 holds the codes 0 and 15 in each row
    q[1::16] = 15
    z = torch.randint(0, 16, (groups, n), generator=g)
    s = (torch.rand(groups, n, generator=g) * 0.02 + 1e-3).half().float()
    g_idx = torch.arange(k) // group_size
    return q, z, s, g_idx


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_pack_q4_1_is_what_gguf_py_decodes_and_quantises(group_size):
    q, z, s, g_idx = _synthetic(group_size=group_size)
    k, n = q.shape
    rows = pack_q4_1(q, z, s, g_idx)
    assert rows.dtype == np.uint8 and rows.shape == (n, k // 32 * 20)
    decoded = _q4_1(rows, n, k)
    w = (s[g_idx] * (q - z[g_idx]).float()).t().numpy()
    m = (-(s * z.float()))[g_idx].t().numpy()
    err = np.abs(decoded - w)
    assert np.all(err <= np.abs(m) * 2.0**-11 + 1e-7), err.max()  # only m = -s*z is rounded (to fp16)
    assert err.max() > 0  # and it is rounded: the check is not vacuous
    # gguf-py's own Q4_1 quantiser, fed the decoded weights (each block spans codes 0..15), writes the same bytes:
    assert np.array_equal(gguf.quants.quantize(decoded, gguf.GGMLQuantizationType.Q4_1), rows)


def test_pack_q4_1_refuses_blocks_that_span_groups():
    q, z, s, _ = _synthetic(k=128, group_size=16)
    with pytest.raises(GGUFExportError, match="multiple of 32"):
        pack_q4_1(q, z[:8], s[:8], torch.arange(128) // 16)
    act_order = torch.randperm(128, generator=torch.Generator().manual_seed(0)) // 64
    with pytest.raises(GGUFExportError, match="act-order"):
        pack_q4_1(q, z[:2], s[:2], act_order)
    with pytest.raises(GGUFExportError, match="in_features=48"):
        pack_q4_1(q[:48], z[:1], s[:1], torch.zeros(48, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# A real tiny export (4-bit g32 asym), written through the CLI, and llama.cpp's reference conversion


@pytest.fixture(scope="module")
def exported(gptq_checkpoint, tmp_path_factory):
    from qalora_hf.cli import main

    src = gptq_checkpoint(4, False, False)
    out = tmp_path_factory.mktemp("gguf") / "tiny-Q4_1.gguf"
    assert main(["gguf", str(src), "-o", str(out), "--tokenizer-pre", TOKENIZER_PRE, "--model-name", MODEL_NAME]) == 0
    return src, out


@pytest.fixture(scope="module")
def reference(exported, tmp_path_factory):
    """llama.cpp's converter, unmodified, on the model dequantised by gptqmodel's own dequantize_weight()."""
    src, _ = exported
    root = tmp_path_factory.mktemp("gguf-ref")
    float_dir = dequantized_float_checkpoint(src, root / "float")
    return reference_gguf(float_dir, root / "ref-f32.gguf", float_type="f32", tokenizer_pre=TOKENIZER_PRE, model_name=MODEL_NAME)


def test_every_q4_1_tensor_decodes_to_gptqmodels_dequantised_weight(exported, load_tiny_gptq):
    from qalora_hf.model import gptq_layers

    src, out = exported
    model = load_tiny_gptq(4)
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    layers = gptq_layers(model)
    assert len(layers) == 14
    for prefix, layer in layers.items():
        t = tensors[names.get_name(prefix) + ".weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        decoded = gguf.quants.dequantize(t.data, t.tensor_type)
        with torch.no_grad():
            w = layer.dequantize_weight().t().float().numpy()  # gptqmodel's own dequantisation, [N, K]
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(prefix.rsplit(".", 1)[-1])
        if heads:  # llama.cpp's Llama converter permutes the q/k rows (LlamaModel.permute)
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        step = np.abs(w).max()
        assert decoded.shape == w.shape
        assert np.abs(decoded - w).max() <= step * 2.0**-10, prefix  # fp16 rounding of m only
    report = check_gguf(out, src)
    assert report["tensors"] == 14 and 0 < report["max_err_over_step"] < 0.01


def test_metadata_and_float_tensors_match_llama_cpps_own_conversion(exported, reference, tiny_tok):
    _, out = exported
    cmp = compare_with_reference(out, reference)
    assert set(cmp["metadata_diff"]) == {"general.file_type"}, cmp["metadata_diff"]
    assert cmp["metadata_diff"]["general.file_type"] == (int(gguf.LlamaFileType.MOSTLY_Q4_1), int(gguf.LlamaFileType.ALL_F32))
    assert cmp["tensor_names_equal"] and cmp["float_tensors_differ"] == []
    assert cmp["q4_1_tensors"] == 14 and cmp["q4_1_max_err_over_ref_absmax"] < 2e-3

    md = gguf_metadata(out)
    cfg = json.loads((exported[0] / "config.json").read_text())
    assert md["general.architecture"] == "llama" and md["general.name"] == MODEL_NAME
    assert md["llama.block_count"] == cfg["num_hidden_layers"] == 2
    assert md["llama.embedding_length"] == 64 and md["llama.feed_forward_length"] == 128
    assert md["llama.attention.head_count"] == 4 and md["llama.attention.head_count_kv"] == 2
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == TOKENIZER_PRE
    vocab = sorted(tiny_tok.get_vocab().items(), key=lambda kv: kv[1])
    assert md["tokenizer.ggml.tokens"] == [tok for tok, _ in vocab]
    assert md["tokenizer.ggml.eos_token_id"] == tiny_tok.eos_token_id and md["tokenizer.ggml.bos_token_id"] == tiny_tok.bos_token_id
    assert md["tokenizer.chat_template"] == tiny_tok.chat_template
    assert len(md["tokenizer.ggml.merges"]) > 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F32  # float32 source, not fp16-exact: kept F32
    assert all(v == gguf.GGMLQuantizationType.F32 for k, v in types.items() if k.endswith("_norm.weight"))


def test_in_memory_merged_model_exports_the_same_tensors(exported, load_tiny_gptq, tiny_tok, tmp_path):
    _, out = exported
    mine = export_gguf(load_tiny_gptq(4), tmp_path / "mem.gguf", tokenizer=tiny_tok, tokenizer_pre=TOKENIZER_PRE, model_name=MODEL_NAME)
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(mine)).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


# --------------------------------------------------------------------------------------------------
# Base + unmerged QA-LoRA adapter: the adapter goes into each block's m, so the file is the trained model


def test_pack_q4_1_offset_goes_into_m_exactly():
    q, z, s, g_idx = _synthetic(group_size=64)
    k, n = q.shape
    d = torch.randn(s.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.003
    z[0, :3], d[0, :3] = 0, torch.tensor([1e-6, -3e-7, 2e-5], dtype=torch.float64)  # m = D alone, in fp16's subnormal range
    decoded = _q4_1(pack_q4_1(q, z, s, g_idx, offset=d), n, k)
    w = (s.double()[g_idx] * (q - z[g_idx]).double() + d[g_idx]).t().numpy()
    ends = torch.maximum((d - s.double() * z.double()).abs(), (s.double() * (15 - z).double() + d).abs())  # |m|, either form
    m = ends[g_idx].t().numpy()
    # one fp16 rounding of m (half an ulp, at least half the smallest subnormal), then float32 arithmetic
    assert np.all(np.abs(decoded - w) <= np.maximum(m * 2.0**-11, 2.0**-25) + np.abs(w) * 2.0**-22)
    assert np.abs(decoded[:3, :32] - w[:3, :32]).max() > 0
    assert np.abs(decoded - _q4_1(pack_q4_1(q, z, s, g_idx), n, k)).max() > 1e-3  # the offset is there
    with pytest.raises(GGUFExportError, match="offset must be finite"):
        pack_q4_1(q, z, s, g_idx, offset=d[:1])
    with pytest.raises(GGUFExportError, match="above 2\\*\\*bits - 1 = 7"):
        pack_q4_1(q, z, s, g_idx, offset=d, bits=3)


@pytest.mark.parametrize("bits,min_slope", [(4, 0.75), (3, 0.9), (2, 0.9)])
def test_pack_q4_1_offset_on_a_symmetric_base_is_not_rounded_away(bits, min_slope):
    """A symmetric base's m = -s*2**(bits-1) lies on the fp16 grid: written directly, every |D| under half its ulp
    rounds away. Each group is written in the form that rounds m least (direct or mirrored, d = -s; at 2/3 bits also
    with the codes moved up by k), so the shift each group decodes to follows D."""
    gen = torch.Generator().manual_seed(0)
    k, n, gs, maxq = 256, 512, 64, (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (k, n), generator=gen)
    z = torch.full((k // gs, n), (maxq + 1) // 2)
    s = (torch.rand(k // gs, n, generator=gen) * 0.02 + 1e-3).half().float()
    g_idx = torch.arange(k) // gs
    # shifts of ~0.0015 steps at 4 bits, under half the ulp of m = -8s; halved per bit less, as that ulp is
    d = torch.randn(s.shape, generator=gen, dtype=torch.float64) * 0.0015 * 2.0 ** (bits - 4) * s.double()
    rows = pack_q4_1(q, z, s, g_idx, offset=d, bits=bits)
    decoded = _q4_1(rows, n, k).astype(np.float64)
    base = (s.double()[g_idx] * (q - z[g_idx]).double()).t().numpy()
    shift = (decoded - base).reshape(n, k // gs, gs).mean(-1).T  # [G, N], what each group decodes to
    zs = s.double() * ((maxq + 1) // 2)
    direct = (d - zs).half().double() + zs  # the direct form's shift
    dn = d.numpy()
    slope = lambda r: float((r * dn).sum() / (dn**2).sum())  # noqa: E731
    assert slope(direct.numpy()) < 0.5 and slope(shift) > min_slope
    assert np.abs(shift - dn).max() <= np.abs(direct.numpy() - dn).max() + 1e-12  # never worse than the direct form
    d_fp16 = rows.reshape(n, k // 32, 20)[..., :2].copy().view(np.float16)
    assert (d_fp16 < 0).any() and (d_fp16 > 0).any()  # both forms are used


def test_export_warns_when_the_adapter_is_below_m_resolution():
    """The ratio rms(m rounding) / rms(D) that export_gguf reports, and its warning for shifts fp16's m cannot resolve."""
    import warnings

    from qalora_hf.gguf_export import M_ROUNDING_WARN, _report_m_rounding

    q, z, s, g_idx = _synthetic(group_size=64)
    ratios = {}
    for size in (1e-2, 1e-5):  # shifts of ~0.01 and ~0.00001 quantisation steps
        stats: dict = {}
        d = torch.randn(s.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * size * s.double()
        pack_q4_1(q, z, s, g_idx, offset=d, stats=stats)
        assert stats["groups"] == s.numel() and stats["shift_sq"] == pytest.approx(float(((d / s.double()) ** 2).sum()))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ratios[size] = _report_m_rounding(stats)
        assert bool(caught) == (ratios[size] > M_ROUNDING_WARN)
    assert ratios[1e-2] < 0.1 < M_ROUNDING_WARN < 1 < ratios[1e-5]


def _llama_cpp_and_transformers_logits(gguf_path, model, tok):
    """Logits of one tiny text from llama.cpp running ``gguf_path`` and from ``model`` in transformers."""
    from qalora_hf.gguf_export import _llama
    from qalora_hf.testing.tiny import TINY_TEXTS

    ids = tok(TINY_TEXTS[3])["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    llm = _llama(gguf_path, n_ctx=64, n_threads=1, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    llm.close()
    return got, ref


def _effective_weight(module) -> torch.Tensor:
    """W [N, K] of a layer as its own forward computes it (gptqmodel's kernel + PEFT's QA-LoRA path), bias removed."""
    k = module.get_base_layer().in_features
    with torch.no_grad():
        eye = torch.eye(k, dtype=torch.float32)
        out = module(eye) - module(torch.zeros(1, k))
    return out.t().double()


@pytest.mark.parametrize("bits,sym,ragged", [(4, False, False), (3, True, False), (4, False, True)],
                         ids=["b4-asym", "b3-sym", "b4-asym-ragged"])
def test_base_plus_adapter_decodes_to_the_trained_models_weights(bits, sym, ragged, gptq_checkpoint, tiny_tok, tmp_path, hub):
    """``ragged``: hidden 96 / intermediate 160 with group size 64, so every layer ends in a ragged group of 32 (as
    SmolLM2's 576 with 128), which Q4_1's 32-blocks hold exactly."""
    from qalora_hf import QALoraConfig, get_qalora_model
    from qalora_hf.cli import main
    from qalora_hf.gptq import load_gptq_model
    from qalora_hf.merge import qalora_layers
    from qalora_hf.testing.tiny import quantize_tiny, save_tiny_float_model

    if ragged:
        float_dir = save_tiny_float_model(tmp_path / "float", hidden_size=96, intermediate_size=160, num_attention_heads=3,
                                          num_key_value_heads=1)
        base = quantize_tiny(float_dir, tmp_path / "base", bits=bits, group_size=64, sym=sym)
    else:
        base = gptq_checkpoint(bits, False, sym)
    torch.manual_seed(0)
    peft_model = get_qalora_model(load_gptq_model(str(base)), QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    layers = qalora_layers(peft_model)
    for m in layers.values():  # a visible update: a fraction of a quantisation step per group
        m.lora_B["default"].weight.data.mul_(0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "tiny-qalora-Q4_1.gguf"
    repo = f"local-user/tiny-b{bits}-qalora-GGUF"
    assert main(["gguf", str(base), "--adapter", str(tmp_path / "adapter"), "-o", str(out), "--tokenizer-pre", TOKENIZER_PRE,
                 "--model-name", MODEL_NAME, "--push-to-hub", repo, "--gptq-repo-id", "local-user/tiny-base"]) == 0
    from huggingface_hub import ModelCard, hf_hub_download

    card = ModelCard.load(hf_hub_download(repo, "README.md", cache_dir=tmp_path / "dl"))
    assert card.data.base_model == ["local-user/tiny-base"] and card.data.base_model_relation == "finetune"
    assert "without a merge" in card.text and "m = -s*z + D" in card.text and "--adapter" in card.text
    assert Path(hf_hub_download(repo, out.name, cache_dir=tmp_path / "dl")).read_bytes() == out.read_bytes()

    cfg = peft_model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert len(layers) == 14
    moved = 0.0
    for name, module in layers.items():
        if ragged:
            assert module.get_base_layer().in_features % 64, name  # every layer has a ragged last group
        prefix = name.removeprefix("base_model.model.")
        t = tensors[names.get_name(prefix) + ".weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        decoded = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        trained = _effective_weight(module).numpy()
        base_w = module.get_base_layer().dequantize_weight().t().double().numpy()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(prefix.rsplit(".", 1)[-1])
        if heads:  # llama.cpp's Llama converter permutes the q/k rows (LlamaModel.permute)
            trained, base_w = (w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
                               for w in (trained, base_w))
        step = np.abs(base_w).max()
        assert np.abs(decoded - trained).max() <= step * 2.0**-10 + 1e-5, prefix  # fp16 rounding of m, fp32 matmul
        moved = max(moved, float(np.abs(decoded - base_w).max() / step))
    assert moved > 0.01  # the adapter is in the file, not just the base
    d_fp16 = [np.asarray(t.data).reshape(-1, 20)[:, :2].copy().view(np.float16) for t in tensors.values()
              if t.tensor_type == gguf.GGMLQuantizationType.Q4_1]
    assert any((d < 0).any() for d in d_fp16)  # mirrored groups (d = -s) are in the file, and llama.cpp runs them below
    meta = gguf_metadata(out)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_1)

    if llama_cpp_available():  # llama.cpp itself runs the file like transformers runs the unmerged adapter
        got, ref = _llama_cpp_and_transformers_logits(out, peft_model, tiny_tok)
        assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max() + 1e-3


def test_adapter_from_another_base_is_refused_before_writing(gptq_checkpoint, tmp_path):
    from qalora_hf import QALoraConfig, get_qalora_model
    from qalora_hf.gptq import load_gptq_model

    peft_model = get_qalora_model(load_gptq_model(str(gptq_checkpoint(4, False, False))), QALoraConfig(r=4))
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "x.gguf"
    with pytest.raises(GGUFExportError, match="does not fit the base .*pass the GPTQ base it was trained on"):
        export_gguf(gptq_checkpoint(4, False, True), out, adapter=tmp_path / "adapter")  # same shape: caught at load
    with pytest.raises(GGUFExportError, match=r"trained on another GPTQ base \(bits=4 \(the base has 3\)"):
        export_gguf(gptq_checkpoint(3, False, False), out, adapter=tmp_path / "adapter")  # from the configs, before loading
    _no_output(out)


def test_cli_says_when_the_adapter_is_below_m_resolution(gptq_checkpoint, tmp_path, capsys):
    from qalora_hf import QALoraConfig, get_qalora_model
    from qalora_hf.cli import main
    from qalora_hf.gptq import load_gptq_model
    from qalora_hf.merge import qalora_layers

    base = gptq_checkpoint(4, False, False)
    torch.manual_seed(0)
    peft_model = get_qalora_model(load_gptq_model(str(base)), QALoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    for m in qalora_layers(peft_model).values():  # shifts of ~1e-6 steps: under fp16's resolution of m
        m.lora_B["default"].weight.data.mul_(1e-6)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "tiny.gguf"
    assert main(["gguf", str(base), "--adapter", str(tmp_path / "adapter"), "-o", str(out), "--tokenizer-pre", TOKENIZER_PRE]) == 0
    captured = capsys.readouterr()
    assert "[qalora-hf] WARNING: the adapter's shifts are small next to fp16's resolution of m" in captured.err
    assert "adapter shifts" in captured.out and "WARNING" in captured.out and out.is_file()


# --------------------------------------------------------------------------------------------------
# Refusals: before anything is written, with a message that names what would export


def _no_output(path: Path):
    assert not path.exists() and not list(path.parent.glob(f".{path.name}.tmp-*"))


@pytest.mark.parametrize("kind", ["bits8", "act_order", "group48", "float_dir", "adapter_dir", "lora_adapter", "adapter_no_base"])
def test_refusals_of_directories(kind, gptq_checkpoint, tiny_float_dir, tmp_path):
    out = tmp_path / "x.gguf"
    if kind == "bits8":
        src, match = gptq_checkpoint(8, False, False), "bits=8.*Q4_1 holds codes 0..15"
    elif kind == "act_order":
        src, match = gptq_checkpoint(4, True, False), "act-order"
    elif kind == "group48":
        src = tmp_path / "g48"
        shutil.copytree(gptq_checkpoint(4, False, False), src)
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"]["group_size"] = 48
        (src / "config.json").write_text(json.dumps(cfg))
        match = "group_size=48 is not a multiple of 32"
    elif kind == "float_dir":
        src, match = tiny_float_dir, "float model"
    elif kind == "adapter_dir":
        src = tmp_path / "adapter"
        src.mkdir()
        (src / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/somewhere/base", "use_qalora": True}))
        match = r"qalora-hf gguf /somewhere/base --adapter .*or merge it into its GPTQ base first"
    else:  # adapter=: a plain LoRA adapter, or a model instead of the base directory
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"use_qalora": kind != "lora_adapter"}))
        src = gptq_checkpoint(4, False, False)
        match = "plain LoRA adapter" if kind == "lora_adapter" else "GPTQ base directory"
        with pytest.raises(GGUFExportError, match=match):
            export_gguf(src if kind == "lora_adapter" else object(), out, adapter=adapter)
        _no_output(out)
        return
    with pytest.raises(GGUFExportError, match=match) as err:
        export_gguf(src, out)
    if kind != "float_dir" and kind != "adapter_dir":
        assert "bits=4 (or 2, 3)" in str(err.value) and "desc_act=False" in str(err.value)  # names what would export
    _no_output(out)


def test_refusals_of_models_with_adapters_and_float_models(load_tiny_gptq, tiny_float_dir, tiny_tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from qalora_hf import QALoraConfig, get_qalora_model

    out = tmp_path / "x.gguf"
    peft_model = get_qalora_model(load_tiny_gptq(4), QALoraConfig(r=4))
    with pytest.raises(GGUFExportError, match="merge first with qalora_hf.merge_qalora"):
        export_gguf(peft_model, out, tokenizer=tiny_tok)
    with pytest.raises(GGUFExportError, match="merge first"):
        export_gguf(peft_model.base_model.model, out, tokenizer=tiny_tok)  # LoRA layers still inside
    with pytest.raises(GGUFExportError, match="float model"):
        export_gguf(AutoModelForCausalLM.from_pretrained(tiny_float_dir), out, tokenizer=tiny_tok)
    with pytest.raises(GGUFExportError, match="float_type"):
        export_gguf(load_tiny_gptq(4), out, tokenizer=tiny_tok, float_type="q8_0")
    _no_output(out)


def test_existing_file_is_kept_and_unknown_pre_tokenizer_is_named(exported, tmp_path):
    src, _ = exported
    out = tmp_path / "keep.gguf"
    out.write_bytes(b"previous")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_gguf(src, out)
    assert out.read_bytes() == b"previous"
    # the converter's own tokenizer detection runs and fails on the tiny tokenizer: a clear error, nothing replaced
    with pytest.raises(GGUFExportError, match="tokenizer_pre"):
        export_gguf(src, out, overwrite=True)
    assert out.read_bytes() == b"previous" and not list(tmp_path.glob(".keep.gguf.tmp-*"))


def test_cli_refuses_before_loading_anything(gptq_checkpoint, tmp_path, capsys):
    from qalora_hf.cli import main

    assert main(["gguf", str(gptq_checkpoint(8, False, False)), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "bits=8" in capsys.readouterr().err
    assert main(["gguf", str(tmp_path / "missing"), "-o", str(tmp_path / "x.gguf")]) == 2
    assert main(["gguf", str(gptq_checkpoint(4, False, False)), "-o", str(tmp_path / "x.bin")]) == 2
    _no_output(tmp_path / "x.gguf")
    from qalora_hf.gguf_export import _check_output

    assert _check_output(tmp_path / "x.GGUF", overwrite=False).name == "x.GGUF"  # the extension's case does not matter
    # a training run's directory as --adapter: the message names the checkpoint inside it
    run = tmp_path / "run"
    (run / "checkpoint-20").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json"):
        (run / "checkpoint-20" / name).write_text("{}")
    capsys.readouterr()
    assert main(["gguf", str(gptq_checkpoint(4, False, False)), "--adapter", str(run), "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "no adapter_config.json" in err and "or a checkpoint-* directory" in err
    _no_output(tmp_path / "x.gguf")


# --------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python; not installed in CI: `make install-llama`)


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed (make install-llama)")
def test_llama_cpp_runs_the_export_like_transformers_runs_the_gptq_model(exported, load_tiny_gptq, tiny_tok):
    from qalora_hf.data import token_batches
    from qalora_hf.gguf_export import llama_cpp_completion_loss
    from qalora_hf.metrics import measure
    from qalora_hf.testing.tiny import TINY_TEXTS

    _, out = exported
    model = load_tiny_gptq(4)
    got, ref = _llama_cpp_and_transformers_logits(out, model, tiny_tok)
    # close, not bit-identical: llama.cpp rounds the activations to Q8_1 in its Q4_1 dot product
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max() + 1e-3
    rows = [{"prompt": t.split("Response:")[0] + "Response:", "completion": t.split("Response:")[1]} for t in TINY_TEXTS[:8]]
    ours = llama_cpp_completion_loss(out, tiny_tok, rows, n_threads=1)
    theirs = measure(model, token_batches(rows, tiny_tok, 256)).loss
    assert ours["rows"] == 8 and ours["same_tokens"] == 8  # llama.cpp's tokenizer (from the GGUF) splits as HF does
    assert abs(ours["loss"] - theirs) < 0.01


# --------------------------------------------------------------------------------------------------
# Hub: the -GGUF sibling repo (real huggingface_hub client against the local Hub-protocol server), cards


def test_push_gguf_repo_with_card_and_modelfile(exported, hub, tmp_path):
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    from qalora_hf.card import ALPACA_OLLAMA_TEMPLATE
    from qalora_hf.gguf_export import push_gguf_to_hub

    src, out = exported
    fid = {"loss_gguf": 1.5931, "loss_gptq": 1.5925, "gain_kept_gguf": 0.97, "gain_kept_gptq": 0.974, "rows": 99}
    commit = push_gguf_to_hub(out, "local-user/tiny-qalora-GGUF", gptq_dir=src, gptq_repo_id="local-user/tiny-qalora",
                              fidelity=fid, prompt_template=ALPACA_OLLAMA_TEMPLATE)
    assert len(commit) == 40
    files = set(HfApi().list_repo_files("local-user/tiny-qalora-GGUF"))
    assert files >= {out.name, "README.md", "Modelfile"}
    got = hf_hub_download("local-user/tiny-qalora-GGUF", out.name, cache_dir=tmp_path / "dl")
    assert Path(got).read_bytes() == out.read_bytes()
    assert check_gguf(got, src)["tensors"] == 14
    modelfile = Path(hf_hub_download("local-user/tiny-qalora-GGUF", "Modelfile", cache_dir=tmp_path / "dl")).read_text()
    assert modelfile.startswith(f"FROM ./{out.name}\n") and "### Response:" in modelfile
    card = ModelCard.load(hf_hub_download("local-user/tiny-qalora-GGUF", "README.md", cache_dir=tmp_path / "dl"))
    assert card.data.base_model == ["local-user/tiny-qalora"] and card.data.base_model_relation == "quantized"
    assert card.data.library_name == "gguf" and "q4_1" in card.data.tags
    for text in (f"llama-cli -m {out.name}", f"llama-completion -m {out.name}", "ollama create", "| fine-tuning gain kept, GGUF in llama.cpp | 97.0% |",
                 "+0.0006"):
        assert text in card.text, text


def test_gptq_card_has_the_llama_cpp_section_and_the_demo_replaces_it():
    from qalora_hf.card import LLAMA_CPP_HEADING, build_model_card, llama_cpp_section, replace_section

    card = build_model_card(repo_id="u/m", base_model="u/base", qalora_config={"r": 16}, training_args={}, bits=4, group_size=32,
                            desc_act=False, framework_versions={})
    text = str(card)
    assert LLAMA_CPP_HEADING in text and "qalora-hf gguf" in text and "## Training" in text
    new = replace_section(text, LLAMA_CPP_HEADING, llama_cpp_section("u/m-GGUF", "m-Q4_1.gguf", {"gain_kept_gguf": 0.95}))
    assert new.count(LLAMA_CPP_HEADING) == 1 and "hf download u/m-GGUF m-Q4_1.gguf" in new and "95.0%" in new
    assert new.index(LLAMA_CPP_HEADING) < new.index("## Training")  # the rest of the card is kept, in place
    assert new.replace(new[new.index(LLAMA_CPP_HEADING):new.index("## Training")], "") == \
        text.replace(text[text.index(LLAMA_CPP_HEADING):text.index("## Training")], "")


def test_converter_location(tmp_path, monkeypatch):
    from qalora_hf.gguf_export import CONVERTER_ENV_VAR, llama_cpp_converter

    monkeypatch.setenv(CONVERTER_ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a llama.cpp source tree"):
        llama_cpp_converter()
    monkeypatch.delenv(CONVERTER_ENV_VAR)
    pinned = llama_cpp_converter()  # the pinned converter (fetched into the cache once, sha256-checked)
    assert (pinned / "convert_hf_to_gguf.py").is_file() and "MIT" in (pinned / "LICENSE").read_text()
    assert llama_cpp_converter(pinned) == pinned
