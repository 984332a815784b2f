#!/usr/bin/env bash
# Full-corpus perplexity sharded over processes (one thread each), then summed.
#
#   scripts/perplexity_sharded.sh BIN MODEL TEXT CONTEXT TOTAL_WINDOWS JOBS OUTDIR [extra perplexity flags]
#
# Window w is scored by exactly one shard (--skip-windows/--max-windows), each
# window from an empty cache, so the shards' NLL sums and token counts add up to
# the single-process figures exactly (tests/generate_cli.rs checks additivity).
# Prints the per-shard lines and the total; OUTDIR keeps each shard's output.
set -euo pipefail
bin=$1 model=$2 text=$3 ctx=$4 total=$5 jobs=$6 out=$7
shift 7
mkdir -p "$out"
per=$(( (total + jobs - 1) / jobs ))
pids=()
for ((s = 0; s < jobs; s++)); do
  skip=$(( s * per ))
  [ "$skip" -ge "$total" ] && break
  n=$(( total - skip < per ? total - skip : per ))
  RAYON_NUM_THREADS=1 "$bin" perplexity --model "$model" --text "$text" --context "$ctx" \
    --skip-windows "$skip" --max-windows "$n" "$@" > "$out/shard-$s.txt" 2>&1 &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ "$fail" = 0 ] || { echo "a shard failed:"; tail -n 3 "$out"/shard-*.txt; exit 1; }
python3 - "$out" <<'PY'
import glob, math, re, sys
nll = 0.0; tok = 0; win = 0
for f in sorted(glob.glob(sys.argv[1] + "/shard-*.txt"), key=lambda p: int(re.findall(r"(\d+)\.txt$", p)[0])):
    s = open(f).read()
    n = float(re.search(r"^sum NLL (\S+)$", s, re.M).group(1))
    t = int(re.search(r"^tokens scored (\d+)$", s, re.M).group(1))
    w = int(re.search(r"windows (\d+) \(from window (\d+)\)", s).group(1))
    print(f"{f.split('/')[-1]}: windows {w} tokens {t} sum NLL {n:.9f}")
    nll += n; tok += t; win += w
print(f"TOTAL windows {win} tokens scored {tok} sum NLL {nll:.9f} mean NLL {nll/tok:.6f} perplexity {math.exp(nll/tok):.4f}")
PY
