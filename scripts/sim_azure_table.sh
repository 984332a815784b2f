#!/usr/bin/env bash
# Regenerates the paged-vs-contiguous and continuous-vs-static tables of
# docs/simulator.md from the Azure LLM conversation trace (2023).
# Usage: scripts/sim_azure_table.sh [path/to/inferlab]   (needs jq)
set -euo pipefail
BIN=${1:-target/release/inferlab}
TRACE=${INFERLAB_ASSETS:-$(dirname "$0")/../../shared/assets}/../traces/azure-llm-2023-conv.csv
[ -f "$TRACE" ] || { echo "missing $TRACE" >&2; exit 1; }
row() { # label, speedup, extra args...
  local label=$1 speed=$2; shift 2
  "$BIN" replay --trace "$TRACE" --speedup "$speed" --json "$@" | jq -r --arg l "$label" --arg s "$speed" \
    '"| \($l) | \($s)x | \(.requests.completed) | \(.requests.rejected_longer_than_model + .requests.rejected_longer_than_kv) | \(.throughput.requests_per_s) | \(.throughput.output_tokens_per_s) | \(.latency.ttft_ms.p50) / \(.latency.ttft_ms.p99) | \(.latency.tpot_ms.p50) / \(.latency.tpot_ms.p99) | \(.latency.e2e_ms.p50) / \(.latency.e2e_ms.p99) | \(.batch.mean_running) | \(.batch.max_running) | \(.kv.mean_utilization * 100 | . * 100 | round / 100)% | \(.kv.mean_waste_fraction * 100 | . * 100 | round / 100)% | \(.preemption.preemptions) |"'
}
echo "| configuration | arrivals | completed | rejected | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | E2E p50 / p99 ms | mean batch | max batch | KV used | KV waste | preemptions |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for speed in 1 3 4; do
  row "paged, continuous" $speed
  row "contiguous (reserve max_model_len), continuous" $speed --kv contiguous
  row "contiguous (reserve prompt + 1024), continuous" $speed --kv contiguous --contiguous-reserve 1024
  row "paged, static (HF generate)" $speed --scheduler static
done
