"""qalora-hf: QA-LoRA (Xu et al. 2023, arXiv 2309.14717) on GPTQ models in the Hugging Face stack."""

__version__ = "0.1.0"
