"""Where qalora-hf keeps what it computes once (GPTQ-quantised bases) and what the demo fetches."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "QALORA_HF_CACHE"


def default_cache_dir() -> Path:
    """``$QALORA_HF_CACHE`` if set, else ``~/.cache/qalora-hf``.

    Layout: ``gptq/<model>-gptq<bits>-g<group>-<fingerprint>/`` (quantised bases, :mod:`qalora_hf.quantize`);
    the demo adds ``models/`` and ``data/`` (``demo/fetch.py``).
    """
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qalora-hf"
