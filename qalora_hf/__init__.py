"""qalora-hf: QA-LoRA (Xu et al. 2023, arXiv 2309.14717) on GPTQ models in the Hugging Face stack."""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "QALoraConfig": "config",
    "QALoraSFTConfig": "sft_config",
    "get_qalora_model": "model",
    "load_qalora_adapter": "model",
    "merge_qalora": "merge",
    "MergeReport": "merge",
    "merge_measure_export": "pipeline",
    "export_gptq": "export",
    "export_gguf": "gguf_export",
    "export_awq": "awq_export",
    "push_gptq_to_hub": "hub",
    "QALoraTrainer": "trainer",
    "QALoraMergeCallback": "callbacks",
    "QuantizeConfig": "quantize",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):  # lazy: `import qalora_hf` (e.g. for qalora_hf.cache) does not import torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qalora_hf' has no attribute {name!r}")
