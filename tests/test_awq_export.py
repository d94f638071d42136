"""AWQ GEMM export: the merged GPTQ integers repacked for vLLM/SGLang Marlin, mlx-lm and transformers.

Checked against gptqmodel's own AWQ code: its unpacking and dequantisation (``dequantize_gemm``), the kernel
stock ``from_pretrained`` picks, and its portable reference kernel (``AwqTorchLinear``), in a fresh process
that never imports qalora_hf.  Refusals are checked to write nothing.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")  # before gptqmodel is imported

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from qalora_hf import QALoraConfig, export_awq, export_gptq, get_qalora_model, merge_qalora  # noqa: E402
from qalora_hf.awq_export import (  # noqa: E402
    AwqExportError,
    awq_pack_layer,
    awq_sibling_repo_id,
    awq_unpack_layer,
    check_awq_config,
)
from qalora_hf.cli import main as cli_main  # noqa: E402
from qalora_hf.gptq_format import read_layer, write_layer  # noqa: E402
from qalora_hf.model import gptq_layers  # noqa: E402
from qalora_hf.testing.tiny import TINY_TEXTS, load_gptq, quantize_tiny, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _merge_like(model, seed: int):
    """Give every layer per-group zero-points as a merge does (z - t, clamped), with 0 and 15 in every layer.

    Codes are nudged too, so that every nibble position of qweight holds values from 0 to 15.
    """
    gen = torch.Generator().manual_seed(seed)
    for layer in gptq_layers(model).values():
        t = read_layer(layer)
        z = (t.z + torch.randint(-3, 4, t.z.shape, generator=gen)).clamp(0, 15)
        z[0, 0], z[-1, -1] = 0, 15
        q = t.q.clone()
        mask = torch.rand(q.shape, generator=gen) < 0.05
        q[mask] = torch.randint(0, 16, (int(mask.sum()),), generator=gen)
        q[0, :2] = torch.tensor([0, 15])
        write_layer(layer, q=q, z=z)
    return model


def _save_float(out: Path, hidden: int, intermediate: int, bias: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                      attention_bias=bias, mlp_bias=bias, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# Group size 32 on the shared tiny Llama (hidden 64 / intermediate 128, with biases); group size 128 on a tiny
# Llama whose every in_features is a multiple of 128 (hidden 128 / intermediate 256, no biases); group size 128 with
# a ragged last group (hidden 192 = 128 + 64, as SmolLM2's 576 = 4 x 128 + 64), written as AWQ group size 64.
SETUPS = {
    "g32": dict(group_size=32, awq_group_size=32, hidden=64, intermediate=128, bias=True),
    "g128": dict(group_size=128, awq_group_size=128, hidden=128, intermediate=256, bias=False),
    "g128-ragged": dict(group_size=128, awq_group_size=64, hidden=192, intermediate=384, bias=False),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, gptq_checkpoint):
    """{setup: {"gptq": dir, "awq": dir, "awq_from_dir": dir, "model": merged model}} for every SETUPS entry."""
    root = tmp_path_factory.mktemp("awq")
    tok = tiny_tokenizer()
    out = {}
    for key, setup in SETUPS.items():
        g = setup["group_size"]
        if key == "g32":
            base_dir = gptq_checkpoint(4, False, False, bias=True)
        else:
            base_dir = quantize_tiny(_save_float(root / f"float-{key}", setup["hidden"], setup["intermediate"], setup["bias"]),
                                     root / f"base-{key}", bits=4, group_size=g)
        model = _merge_like(load_gptq(base_dir, 4).eval(), seed=g)
        awq_dir = export_awq(model, root / f"awq-{key}", tokenizer=tok)  # first: on g128-ragged, export_awq's own split
        gptq_dir = export_gptq(model, root / f"gptq-{key}", tokenizer=tok)
        awq_from_dir = export_awq(gptq_dir, root / f"awq-from-dir-{key}")
        out[key] = {"gptq": gptq_dir, "awq": awq_dir, "awq_from_dir": awq_from_dir, "model": model}
    return out


FRESH = textwrap.dedent(r"""
    import json, sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig
    pairs, probe_path, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    ids = torch.load(probe_path, weights_only=True)
    result, tensors = {}, {}
    for g, (gptq_dir, awq_dir) in pairs.items():
        # What a user runs: stock from_pretrained, no quantization_config.
        gptq = AutoModelForCausalLM.from_pretrained(gptq_dir).eval()
        awq = AutoModelForCausalLM.from_pretrained(awq_dir).eval()
        # gptqmodel's reference kernels: GPTQ TorchLinear, AWQ AwqTorchLinear (dense dequantize_gemm + matmul).
        gptq_ref = AutoModelForCausalLM.from_pretrained(gptq_dir, quantization_config=GPTQConfig(bits=4, backend="torch")).eval()
        awq_ref = AutoModelForCausalLM.from_pretrained(awq_dir, quantization_config=AwqConfig(bits=4, backend="torch_awq"),
                                                       dtype=torch.float16).eval()
        kernels, unequal, layers = set(), [], 0
        for name, ref in gptq_ref.named_modules():
            if not hasattr(ref, "qweight"):
                continue
            layers += 1
            w_gptq = ref.dequantize_weight().detach()                        # fp16 [K, N]: s * (q - z), rounded once
            mod, mod_ref = awq.get_submodule(name), awq_ref.get_submodule(name)
            kernels.add(type(mod).__name__)
            w_awq = mod.awq_weight_dequantize(torch.device("cpu"), w_gptq.dtype) if hasattr(mod, "awq_weight_dequantize") else None
            x = torch.zeros(1, mod_ref.in_features, dtype=torch.float16)
            w_awq_ref = mod_ref._dequantize_weight_for_inference(x, dtype=torch.float16)
            ok = torch.equal(w_awq_ref, w_gptq) and (w_awq is None or torch.equal(w_awq, w_gptq))
            if not ok:
                unequal.append(name)
        with torch.no_grad():
            lg_gptq, lg_awq = gptq(ids).logits.float(), awq(ids).logits.float()
        result[g] = {"awq_kernels": sorted(kernels), "gptq_kernel": type(gptq.model.layers[0].mlp.up_proj).__name__,
                     "layers": layers, "unequal": unequal, "max_logit_diff": float((lg_gptq - lg_awq).abs().max()),
                     "max_logit": float(lg_gptq.abs().max())}
    result["qalora_hf_imported"] = sorted(m for m in sys.modules if m.startswith("qalora_hf"))
    json.dump(result, open(out_path, "w"))
""")


@pytest.fixture(scope="module")
def fresh(exports, tmp_path_factory):
    """One fresh process (no qalora_hf on its path) loads every GPTQ/AWQ pair with stock transformers."""
    root = tmp_path_factory.mktemp("awq-fresh")
    tok = tiny_tokenizer()
    ids = [tok(t)["input_ids"] for t in TINY_TEXTS[40:43]]
    n = min(len(x) for x in ids)
    torch.save(torch.tensor([x[:n] for x in ids]), root / "probe.pt")
    (root / "fresh.py").write_text(FRESH)
    pairs = {key: [str(e["gptq"]), str(e["awq"])] for key, e in exports.items()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GPTQMODEL_CPU_WORKERS="1", TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(root / "fresh.py"), json.dumps(pairs), str(root / "probe.pt"),
                          str(root / "out.json")], capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((root / "out.json").read_text())


# --------------------------------------------------------------------------------------------------
# The layout, against gptqmodel's own unpacking and dequantisation


def test_pack_matches_gptqmodel_dequantize_gemm():
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    gen = torch.Generator().manual_seed(0)
    k, n, g = 256, 48, 64
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // g, n), generator=gen)
    q[0, :8], z[0, :8] = torch.arange(8) * 2 + 1, torch.tensor([15, 0, 15, 0, 15, 0, 15, 0])
    s = (torch.rand(k // g, n, generator=gen) * 0.1 + 1e-3).half()
    t = awq_pack_layer(q, z, s)
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (k, n // 8)
    assert t["qzeros"].dtype == torch.int32 and tuple(t["qzeros"].shape) == (k // g, n // 8)
    assert t["scales"].dtype == torch.float16 and torch.equal(t["scales"], s)
    # AWQ's interleave: output o = 8w + j sits in nibble AWQ_ORDER.index(j) of word w.
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    word = sum(int(q[0, order[p]]) << (4 * p) for p in range(8))
    assert int(t["qweight"][0, 0]) & 0xFFFFFFFF == word
    q2, z2 = awq_unpack_layer(t["qweight"], t["qzeros"])
    assert torch.equal(q2, q) and torch.equal(z2, z)
    exact = (q - z.repeat_interleave(g, 0)).float() * s.float().repeat_interleave(g, 0)
    assert torch.equal(dequantize_gemm(t["qweight"], t["qzeros"], s.float(), 4, g), exact)


def test_pack_rejects_what_it_cannot_hold():
    q, z, s = torch.zeros(32, 8, dtype=torch.int64), torch.zeros(1, 8, dtype=torch.int64), torch.ones(1, 8)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        awq_pack_layer(q, z + 16, s)
    with pytest.raises(ValueError, match="multiple of 8"):
        awq_pack_layer(q[:, :6], z[:, :6], s[:, :6])
    with pytest.raises(ValueError, match="fp16"):
        awq_pack_layer(q, z, s * (1 + 1e-6))


@pytest.mark.parametrize("key", sorted(SETUPS))
def test_export_holds_the_gptq_integers(exports, key):
    e, g = exports[key], SETUPS[key]["awq_group_size"]
    qc = json.loads((e["awq"] / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}
    sd = load_file(e["awq"] / "model.safetensors")
    assert not any(k.endswith("g_idx") for k in sd)
    layers = gptq_layers(e["model"])
    assert layers
    ragged = 0
    for name, layer in layers.items():
        t = read_layer(layer)
        k, n = layer.in_features, layer.out_features
        ragged += k % SETUPS[key]["group_size"] != 0
        assert tuple(sd[f"{name}.qweight"].shape) == (k, n // 8) and tuple(sd[f"{name}.qzeros"].shape) == (k // g, n // 8)
        q, z = awq_unpack_layer(sd[f"{name}.qweight"], sd[f"{name}.qzeros"])
        awq_group = torch.arange(k) // g  # AWQ's group of each input channel; the GPTQ group of each AWQ group:
        gptq_group = t.g_idx.long()[torch.arange(0, k, g)]
        assert torch.equal(gptq_group[awq_group], t.g_idx.long()), name  # every AWQ group inside one GPTQ group
        assert torch.equal(q, t.q) and torch.equal(z, t.z[gptq_group]), name
        assert sd[f"{name}.scales"].dtype == torch.float16 and torch.equal(sd[f"{name}.scales"].float(), t.scales[gptq_group])
    assert (ragged > 0) == key.endswith("ragged")  # the ragged setup has ragged layers (and the others none)
    gptq_sd = load_file(e["gptq"] / "model.safetensors")
    for key, value in gptq_sd.items():  # every tensor that is not a packed integer is written unchanged
        if key.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(sd[key], value), key
    # from the GPTQ export directory (gptqmodel's own v1 -> v2 load): the same files
    sd_dir = load_file(e["awq_from_dir"] / "model.safetensors")
    assert sd_dir.keys() == sd.keys() and all(torch.equal(sd_dir[k], sd[k]) for k in sd)
    assert (e["awq_from_dir"] / "tokenizer.json").is_file() and (e["awq"] / "generation_config.json").is_file()
    assert not list(e["awq"].glob("*.bin")) and not list(e["awq"].glob("*.pt"))  # no pickles


@pytest.mark.parametrize("key", sorted(SETUPS))
def test_fresh_process_stock_load_matches_gptq(fresh, key):
    r = fresh[key]
    print(f"{key}: AWQ kernels {r['awq_kernels']}, GPTQ kernel {r['gptq_kernel']}, max|dlogit| {r['max_logit_diff']:.2e} "
          f"(max|logit| {r['max_logit']:.2f})")
    assert fresh["qalora_hf_imported"] == []
    assert r["layers"] == 14 and all("Awq" in k for k in r["awq_kernels"])
    assert r["unequal"] == []  # every layer's dequantised weight, bit for bit, through both AWQ kernels
    assert r["max_logit_diff"] <= 1e-3 and r["max_logit"] > 0.1


# --------------------------------------------------------------------------------------------------
# Refusals: before anything is written, naming what would export


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("case, match", [
    ("act-order", r"act-order.*export_gptq"),
    ("8-bit", r"8-bit.*4-bit only.*export_gptq"),
    ("2-bit", r"2-bit.*4-bit only.*export_gptq"),
])
def test_refuses_settings_awq_cannot_hold(case, match, gptq_checkpoint, tmp_path):
    bits, desc_act = {"act-order": (4, True), "8-bit": (8, False), "2-bit": (2, False)}[case]
    src = gptq_checkpoint(bits, desc_act, False)
    out = tmp_path / "awq"
    with pytest.raises(AwqExportError, match=match):
        export_awq(src, out)  # from the directory: refused from config.json, before loading
    assert _nothing_written(out)
    if case == "act-order":  # in memory, a permuted g_idx is refused even if the config were to say otherwise
        model = load_gptq(src, bits)
        model.config.quantization_config.desc_act = False
        with pytest.raises(AwqExportError, match=r"permuted g_idx.*export_gptq"):
            export_awq(model, out)
        assert _nothing_written(out)


@pytest.mark.parametrize("group_size", [16, -1, 256])
def test_refuses_group_sizes_awq_kernels_do_not_take(group_size):
    with pytest.raises(AwqExportError, match=rf"group_size={group_size}.*\[32, 64, 128\].*export_gptq"):
        check_awq_config({"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False})
    for g in (32, 64, 128):
        assert check_awq_config({"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": False}) == g


def test_refuses_adapters_and_float_models(load_tiny_gptq, tiny_float_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "awq"
    pm = get_qalora_model(load_tiny_gptq(4, False, False), QALoraConfig(r=4, lora_alpha=8))
    with pytest.raises(AwqExportError, match="merge them first"):
        export_awq(pm, out)
    with pytest.raises(AwqExportError, match="merge them first"):
        export_awq(pm.base_model.model, out)  # the unwrapped model still holds LoRA layers
    assert _nothing_written(out)
    merged, _ = merge_qalora(pm, strategy="round", progress=False)
    assert (export_awq(merged, out) / "model.safetensors").is_file()  # once merged, it exports

    out2 = tmp_path / "awq2"
    with pytest.raises(AwqExportError, match="float model.*Quantise it to GPTQ 4-bit"):
        export_awq(AutoModelForCausalLM.from_pretrained(tiny_float_dir), out2)
    with pytest.raises(AwqExportError, match="float model"):
        export_awq(tiny_float_dir, out2)
    with pytest.raises(FileExistsError):
        export_awq(merged, out)  # the export above is not overwritten without overwrite=True
    assert _nothing_written(out2)


# --------------------------------------------------------------------------------------------------
# CLI and Hub name


def test_cli_awq(exports, gptq_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli-awq"
    assert cli_main(["awq", str(exports["g32"]["gptq"]), "--output-dir", str(out)]) == 0
    sd, ref = load_file(out / "model.safetensors"), load_file(exports["g32"]["awq"] / "model.safetensors")
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert "awq" in capsys.readouterr().out

    bad = tmp_path / "cli-bad"
    assert cli_main(["awq", str(gptq_checkpoint(4, True, False)), "--output-dir", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "act-order" in err[0] and "export_gptq" in err[0]
    assert cli_main(["awq", str(exports["g32"]["gptq"]), "--output-dir", str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert _nothing_written(bad)


def test_awq_sibling_repo_id():
    assert awq_sibling_repo_id("me/smollm2-qalora-alpaca-gptq-4bit") == "me/smollm2-qalora-alpaca-AWQ"
    assert awq_sibling_repo_id("me/Model-GPTQ") == "me/Model-AWQ"
    assert awq_sibling_repo_id("me/Model-GPTQ-Int4") == "me/Model-AWQ"
    assert awq_sibling_repo_id("me/model") == "me/model-AWQ"


# --------------------------------------------------------------------------------------------------
# Cards


def test_cards_serve_it_and_awq_card():
    from qalora_hf.card import build_awq_model_card, build_model_card

    kwargs = dict(base_model="me/tiny-gptq", license="apache-2.0", datasets=["me/texts"], qalora_config={"r": 8},
                  training_args={"learning_rate": 1e-3}, bits=4, group_size=32,
                  merge_metrics={"strategy": "round", "loss_base": 2.0, "loss_trained": 1.5, "loss_exported": 1.55})
    gptq = build_model_card(repo_id="me/tiny-qalora-gptq-4bit", desc_act=False, **kwargs)
    text = str(gptq)
    serve = text[text.index("## Serve it"):text.index("## Training")]
    for needle in ("vllm serve me/tiny-qalora-AWQ", "awq_marlin", "gptq_gemm", "sglang.launch_server", "mlx_lm.generate",
                   "qalora-hf awq me/tiny-qalora-gptq-4bit", "unmeasured"):
        assert needle in serve, needle
    awq = build_awq_model_card(gptq, repo_id="me/tiny-qalora-AWQ", gptq_repo_id="me/tiny-qalora-gptq-4bit", group_size=32,
                               has_adapter=True)
    a = str(awq)
    assert "awq" in awq.data.tags and "gptq" not in awq.data.tags and awq.data.base_model == ["me/tiny-gptq"]
    assert 'from_pretrained("me/tiny-qalora-AWQ")' in a and "me/tiny-qalora-AWQ`, this repo" in a
    assert "## Merge fidelity" in a and "## Limitations" in a and "`adapter/`" in a  # the GPTQ card's sections, kept
    assert "If `me/tiny-qalora-AWQ` is not on the Hub" not in a
    # act-order: the card says why there is no AWQ export, and names no AWQ command
    act = str(build_model_card(repo_id="me/tiny-act", desc_act=True, **kwargs))
    act_serve = act[act.index("## Serve it"):act.index("## Training")]
    assert "no lossless AWQ export" in act_serve and "act-order" in act_serve and "AWQ export: kernel" not in act_serve


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_cli_awq_from_hub_repo_and_push_to_sibling(exports, hub, tmp_path):
    from huggingface_hub import hf_hub_download

    from qalora_hf import push_gptq_to_hub

    gptq_repo = "local-user/tiny-qalora-gptq-4bit"
    push_gptq_to_hub(exports["g32"]["gptq"], gptq_repo, backoff_s=0.01)
    awq_repo = awq_sibling_repo_id(gptq_repo)
    assert cli_main(["awq", gptq_repo, "--output-dir", str(tmp_path / "awq"), "--push-to-hub", awq_repo]) == 0
    config = json.loads(Path(hf_hub_download(awq_repo, "config.json")).read_text())
    assert config["quantization_config"]["quant_method"] == "awq"
    pushed = load_file(hf_hub_download(awq_repo, "model.safetensors"))
    ref = load_file(exports["g32"]["awq"] / "model.safetensors")
    assert pushed.keys() == ref.keys() and all(torch.equal(pushed[k], ref[k]) for k in ref)
