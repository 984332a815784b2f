#!/usr/bin/env bash
# The speculative-decoding acceptance sweep of docs/speculative.md, sharded:
# one (draft, temperature, k) configuration per process, single-threaded
# (RAYON_NUM_THREADS=1), `xargs -P $JOBS` processes at once. Each process
# writes `inferlab speculative run --json` and its printed table under
# OUT/parts/; at the end every printed table is concatenated into
# OUT/sweep.txt and scripts/spec_table.py builds OUT/table.md.
#
# Usage: scripts/spec_sweep.sh [OUT]          (default bench/results/spec-sweep)
# Environment (defaults in brackets):
#   MODEL       [.assets-cache/SmolLM2-135M-Instruct.Q4_1.gguf]
#   PROMPTS     [docs/speculative/prompts16.txt]  one prompt per line
#   MAX_TOKENS  [48]   new tokens per prompt
#   DRAFTS      ["layers:4 layers:8 layers:15 ngram"]
#   TEMPS       ["0 0.7 1.0"]
#   KS          ["1 2 3 4 5 6 7 8"]
#   SEED        [0]
#   JOBS        [$(nproc)]
#   BIN         [target/release/inferlab]  (built with cargo build --release)
# Configurations already finished (their JSON exists) are skipped, so an
# interrupted sweep resumes where it stopped.
set -euo pipefail

OUT=${1:-bench/results/spec-sweep}
MODEL=${MODEL:-.assets-cache/SmolLM2-135M-Instruct.Q4_1.gguf}
PROMPTS=${PROMPTS:-docs/speculative/prompts16.txt}
MAX_TOKENS=${MAX_TOKENS:-48}
DRAFTS=${DRAFTS:-"layers:4 layers:8 layers:15 ngram"}
TEMPS=${TEMPS:-"0 0.7 1.0"}
KS=${KS:-"1 2 3 4 5 6 7 8"}
SEED=${SEED:-0}
JOBS=${JOBS:-$(nproc)}
BIN=${BIN:-target/release/inferlab}

for f in "$MODEL" "$PROMPTS" "$BIN"; do
    [[ -e $f ]] || { echo "spec_sweep: $f: no such file" >&2; exit 1; }
done
mkdir -p "$OUT/parts"
export MODEL PROMPTS MAX_TOKENS SEED BIN OUT

# One configuration: $1 = draft (layers:N | ngram), $2 = T, $3 = k.
run_one() {
    local draft=$1 t=$2 k=$3
    local name="${draft/:/}-T${t}-k${k}"
    local json="$OUT/parts/$name.json"
    [[ -s $json ]] && return 0
    local flag
    case $draft in
        ngram) flag=(--draft ngram) ;;
        layers:*) flag=(--draft-layers "${draft#layers:}") ;;
        *) echo "spec_sweep: bad draft $draft" >&2; return 1 ;;
    esac
    local start=$SECONDS
    RAYON_NUM_THREADS=1 "$BIN" speculative run --target "$MODEL" "${flag[@]}" \
        --k "$k" --temperature "$t" --prompts "$PROMPTS" --max-tokens "$MAX_TOKENS" \
        --seed "$SEED" --json "$json.tmp" >"$OUT/parts/$name.txt" 2>"$OUT/parts/$name.err"
    echo "elapsed_s $((SECONDS - start))" >>"$OUT/parts/$name.txt"
    mv "$json.tmp" "$json"
    echo "done $name ($((SECONDS - start)) s)"
}
export -f run_one

start=$SECONDS
for d in $DRAFTS; do
    for t in $TEMPS; do
        for k in $KS; do
            echo "$d $t $k"
        done
    done
done | xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _

{
    echo "# inferlab speculative sweep: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $JOBS jobs, $((SECONDS - start)) s"
    echo "# model $MODEL, prompts $PROMPTS ($(grep -c . "$PROMPTS") prompts), $MAX_TOKENS new tokens, seed $SEED"
    for f in "$OUT"/parts/*.txt; do
        echo
        echo "## $(basename "$f" .txt)"
        cat "$f"
    done
} >"$OUT/sweep.txt"
python3 "$(dirname "$0")/spec_table.py" "$OUT"/parts/*.json >"$OUT/table.md"
echo "wrote $OUT/sweep.txt and $OUT/table.md"
