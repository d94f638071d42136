"""Shared helpers of the benchmarks in bench/: paths, tiny debug models, interleaved subprocess workers,
metadata, markdown tables, PASS/FAIL targets, JSON results.

Every benchmark runs each variant in its own spawned subprocess (a *worker*), so peak RSS
(``ru_maxrss``) is per variant and one variant's allocations or torch.compile caches cannot pollute
another.  Workers are started and warmed up one at a time; the timed repeats are then interleaved
across them (round 1: A B C ..., round 2: A B C ..., ...), only one worker computing at any moment.
The reported time is the median over the rounds.

Nothing here imports torch at module level: environment variables such as ``TORCHDYNAMO_DISABLE``
must be set before torch is imported in a worker.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

BENCH_ENV = {
    "GPTQMODEL_CPU_WORKERS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # inductor compiles in-process (no compile-worker pool): less CPU noise, and the first-step cost is
    # charged to the worker that pays it.
    "TORCHINDUCTOR_COMPILE_THREADS": "1",
}


def setup_env() -> None:
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)


# --------------------------------------------------------------------------------------------------
# Models


def cache_root() -> Path:
    from qalora_hf.cache import default_cache_dir

    return default_cache_dir()


def default_float_dir() -> Path:
    return cache_root() / "models" / "SmolLM2-135M-Instruct"


def default_gptq_dir() -> Optional[Path]:
    """The first ``SmolLM2-135M-Instruct-gptq4-g32-*`` dir with a config.json in the GPTQ cache."""
    hits = sorted(p.parent for p in (cache_root() / "gptq").glob("SmolLM2-135M-Instruct-gptq4-g32-*/config.json"))
    return hits[0] if hits else None


def tiny_models(root: Path = RESULTS / "tiny") -> tuple[Path, Path]:
    """(float dir, GPTQ 4-bit g32 dir) of the 2-layer random test Llama, built once under ``root``."""
    from qalora_hf.testing.tiny import quantize_tiny, save_tiny_float_model

    f, q = root / "float", root / "gptq4-g32"
    if not (f / "config.json").is_file():
        save_tiny_float_model(f)
    if not (q / "config.json").is_file():
        quantize_tiny(f, q, bits=4, group_size=32)
    return f, q


def add_model_args(ap) -> None:
    ap.add_argument("--float-model", default=None, help="float fp32 checkpoint dir (default: cached SmolLM2-135M-Instruct)")
    ap.add_argument("--gptq-model", default=None, help="GPTQ 4-bit g32 dir (default: cached SmolLM2-135M-Instruct-gptq4-g32-*)")
    ap.add_argument("--tiny", action="store_true", help="debug on the 2-layer random tiny Llama (built under bench/results/tiny)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON output (default: bench/results/<bench>.json)")


def resolve_models(args) -> tuple[str, str]:
    if args.tiny:
        f, q = tiny_models()
        return str(f), str(q)
    f = Path(args.float_model) if args.float_model else default_float_dir()
    q = Path(args.gptq_model) if args.gptq_model else default_gptq_dir()
    if q is None or not (q / "config.json").is_file():
        sys.exit("no GPTQ base found: pass --gptq-model (e.g. ~/.cache/qalora-hf/gptq/SmolLM2-135M-Instruct-gptq4-g32-*) or --tiny")
    if not (f / "config.json").is_file():
        sys.exit(f"no float model at {f}: pass --float-model or --tiny")
    return str(f), str(q)


def prompt_ids(tokenizer, n_tokens: int, batch: int, seed: int):
    """[batch, n_tokens] token ids of real text (the Alpaca demo data if cached, else the tiny texts), seeded."""
    import random

    import torch

    data = cache_root() / "data" / "alpaca_en_demo.json"
    if data.is_file():
        from qalora_hf.data import read_rows, row_to_text

        texts = [row_to_text(r) for r in read_rows(data)]
    else:
        from qalora_hf.testing.tiny import TINY_TEXTS

        texts = list(TINY_TEXTS)
    rng = random.Random(seed)
    out = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < n_tokens:
            ids += tokenizer(rng.choice(texts) + "\n", add_special_tokens=False)["input_ids"]
        out.append(ids[:n_tokens])
    return torch.tensor(out, dtype=torch.long)


def calibration_texts(n: int) -> list[str]:
    data = cache_root() / "data" / "alpaca_en_demo.json"
    if data.is_file():
        from qalora_hf.data import read_rows, row_to_text

        return [row_to_text(r) for r in read_rows(data)[:n]]
    from qalora_hf.testing.tiny import TINY_TEXTS

    return (TINY_TEXTS * (n // len(TINY_TEXTS) + 1))[:n]


def quant_kernels(model) -> str:
    """Class names of the GPTQ kernels in ``model`` (e.g. 'TorchLinear')."""
    from qalora_hf.gptq import gptq_layers

    return ",".join(sorted({type(m).__name__ for m in gptq_layers(model).values()})) or "-"


def trainable_params(model) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Metadata and memory


def peak_rss_mb() -> float:
    """``ru_maxrss`` of this process in MiB (Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # noqa: BLE001
        return float("nan")


def runtime_rss_mb() -> float:
    """Current RSS after importing the whole stack (torch, transformers, peft, gptqmodel, qalora_hf), before any model."""
    import gptqmodel  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import qalora_hf.merge  # noqa: F401
    import qalora_hf.model  # noqa: F401

    return current_rss_mb()


def metadata(args, **extra) -> dict:
    import torch

    vers = {}
    for mod in ("torch", "transformers", "peft", "gptqmodel", "optimum"):
        try:
            vers[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            vers[mod] = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch_threads": args.threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": load,
        "seed": args.seed,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": vers,
        "env": {k: os.environ.get(k) for k in (*BENCH_ENV, "TORCHDYNAMO_DISABLE", "OMP_NUM_THREADS")},
        **extra,
    }


def set_threads(threads: Optional[int]) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------------
# Interleaved subprocess workers


class Unavailable(Exception):
    """Raised by a variant factory when the variant cannot run; the message is reported as its result."""


def _worker_main(conn, factory: Callable, spec: dict) -> None:
    """Subprocess body: build the variant (``factory(spec)`` -> object with ``info`` dict and ``step()``),
    then answer 'step' / 'stop' commands from the parent."""
    try:
        sys.stdout = sys.stderr  # library chatter must not interleave with the parent's tables
        set_threads(spec.get("threads"))
        t = time.perf_counter()
        variant = factory(spec)
        info = dict(getattr(variant, "info", {}))
        info.setdefault("setup_s", time.perf_counter() - t)
        info["rss_after_setup_mb"] = current_rss_mb()
        conn.send({"ready": info})
    except Exception as e:  # noqa: BLE001
        conn.send({"error": f"{type(e).__name__}: {e}", "where": "setup", "traceback": traceback.format_exc(limit=6), "peak_rss_mb": peak_rss_mb()})
        return
    while True:
        cmd = conn.recv()
        if cmd == "step":
            try:
                conn.send({"ok": variant.step()})
            except Exception as e:  # noqa: BLE001
                conn.send({"error": f"{type(e).__name__}: {e}", "where": "step", "traceback": traceback.format_exc(limit=6)})
                return
        else:
            final = dict(getattr(variant, "final", lambda: {})())
            final["peak_rss_mb"] = peak_rss_mb()
            final["rss_end_mb"] = current_rss_mb()
            conn.send({"final": final})
            return


def run_interleaved(variants: dict[str, dict], factory: Callable, repeats: int, log=print) -> dict[str, dict]:
    """Start one spawned worker per variant (sequentially; each warms up in its factory), then run
    ``repeats`` interleaved rounds of one ``step()`` per live worker, then collect peak RSS.

    ``variants``: name -> spec dict (picklable; ``spec['env']`` is applied to the worker's environment).
    Returns name -> {"info", "steps": [dict per round], "final"} or {"error", "where", ...}.
    """
    ctx = mp.get_context("spawn")
    workers, out = {}, {}
    for name, spec in variants.items():
        parent, child = ctx.Pipe()
        saved = {k: os.environ.get(k) for k in spec.get("env", {})}
        os.environ.update(spec.get("env", {}))
        try:
            p = ctx.Process(target=_worker_main, args=(child, factory, spec), name=f"bench-{name}", daemon=True)
            p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        t = time.perf_counter()
        msg = _recv(parent, p)
        if "error" in msg:
            log(f"  {name}: setup failed: {msg['error']}")
            out[name] = msg
            p.join(30)
            continue
        log(f"  {name}: ready in {time.perf_counter() - t:.1f}s  {_short(msg['ready'])}")
        workers[name] = (p, parent)
        out[name] = {"info": msg["ready"], "steps": []}
    for rnd in range(repeats):
        for name, (p, conn) in list(workers.items()):
            conn.send("step")
            msg = _recv(conn, p)
            if "error" in msg:
                log(f"  {name}: step failed: {msg['error']}")
                out[name].update(msg)
                workers.pop(name)
                p.join(30)
                continue
            out[name]["steps"].append(msg["ok"])
        log(f"  round {rnd + 1}/{repeats}: " + ", ".join(f"{n} {_short(out[n]['steps'][-1])}" for n in workers))
    for name, (p, conn) in workers.items():
        conn.send("stop")
        out[name]["final"] = _recv(conn, p)["final"]
        p.join(60)
    return out


def _recv(conn, proc):
    while not conn.poll(1.0):
        if not proc.is_alive():
            return {"error": f"worker exited with code {proc.exitcode}", "where": "crash"}
    try:
        return conn.recv()
    except EOFError:
        return {"error": f"worker closed the pipe (exit code {proc.exitcode})", "where": "crash"}


def _short(d: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items() if not isinstance(v, (dict, list)))


def median_of(steps: list[dict], key: str) -> Optional[float]:
    vals = [s[key] for s in steps if s.get(key) is not None]
    return statistics.median(vals) if vals else None


# --------------------------------------------------------------------------------------------------
# Output


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def target(label: str, value: Optional[float], op: str, threshold: float, unit: str = "x") -> dict:
    """One target row: ``value op threshold`` -> PASS / FAIL / n/a (value missing)."""
    if value is None:
        verdict = "n/a"
    elif op == "<=":
        verdict = "PASS" if value <= threshold else "FAIL"
    else:
        verdict = "PASS" if value >= threshold else "FAIL"
    return {"target": label, "value": value, "op": op, "threshold": threshold, "unit": unit, "verdict": verdict}


def targets_table(targets: list[dict]) -> str:
    rows = [[t["target"], "" if t["value"] is None else f"{t['value']:.2f}{t['unit']}", f"{t['op']} {t['threshold']}{t['unit']}", t["verdict"]] for t in targets]
    return markdown_table(["target", "measured", "goal", "verdict"], rows)


def write_results(bench: str, args, payload: dict, markdown: str) -> Path:
    """Write ``bench/results/<bench>.json`` (or ``args.out``) and the markdown next to it as ``.md``."""
    out = Path(args.out) if getattr(args, "out", None) else RESULTS / f"{bench}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown + "\n")
    return out
