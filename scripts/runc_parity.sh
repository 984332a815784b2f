#!/usr/bin/env bash
# Greedy token-for-token parity of `inferlab generate` with llama2.c's run.c on
# stories260K.
#
#   scripts/runc_parity.sh PATH/run.c [STEPS]      (STEPS default 512 = context)
#
# run.c is NOT part of this repository: the user supplies its source, this
# script builds it with `gcc -O3 -lm` in a temporary directory (a version with
# n_kv_heads support is needed: stories260K has 8 heads over 4 KV heads, e.g.
# karpathy/llama2.c @ bd182289c596fa6059eb7b3b7c8ccd04b5c90fc3).
#
# Step counts are aligned: run.c's `-n STEPS` runs one forward per position
# 0..STEPS (BOS at 0, the prompt's tokens forced after it) and prints the
# token each forward yields; inferlab's prompt carries the BOS, so the same
# sequence is `--max-tokens STEPS+1-prompt_len`.
#
# run.c prints no token ids, so parity is checked two ways:
#  * tokens: our ids (`--print-ids`: prompt, then generated) rendered the way
#    run.c renders them must equal run.c's stdout byte for byte. run.c's
#    rendering: BOS itself is not printed, the first piece after BOS loses a
#    leading space, a `<0xHH>` byte piece prints its byte only when the C
#    locale calls it printable or whitespace (so bytes >= 0x80 of non-ASCII
#    text are dropped), every other piece prints as is; a "\n" at the end.
#  * text: run.c's stdout must end with our continuation as we print it
#    (UTF-8 decoded); where this fails but the token check passes, the only
#    difference is run.c's rendering of byte tokens.
# Needs ./target/release/inferlab (cargo build --release) and python3.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 PATH/run.c [STEPS]" >&2
    exit 2
fi
src=$1
steps=${2:-512}
root=$(cd "$(dirname "$0")/.." && pwd)
assets=${INFERLAB_ASSETS:-$root/../shared/assets}
model=$assets/models/stories260K/stories260K.bin
tok=$assets/models/stories260K/tok512.bin
inferlab=$root/target/release/inferlab
for f in "$src" "$model" "$tok" "$inferlab"; do
    [ -e "$f" ] || { echo "missing: $f" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -O3 -o "$work/run" "$src" -lm

long="Once upon a time, in a small village near a big forest, there lived a little boy named Tim. Tim had a red ball and a dog named Max. Every day, Tim and Max went to the park to play. They ran, they jumped, and they laughed. One sunny morning, Tim saw a bird with a hurt wing under a tree. He wanted to help the bird, so he"
prompts=(
    ""
    "Once upon a time"
    "The cat sat on the mat."
    "Hello, world! How are you?"
    "\"Let's go!\" said Tom; Sue said: (no) - 'maybe'..."
    "café"
    "naïve über 東京 🙂"
    "  two leading spaces, trailing  "
    $'Line one.\nLine two.'
    "In 2024, 3 + 4 = 7 and 10% of 50 is 5."
    "$long"
)

echo "# runc_parity: inferlab generate vs llama2.c run.c, greedy (temperature 0), stories260K"
echo "# run.c source: $src (sha256 $(sha256sum "$src" | cut -c1-16)...), gcc -O3 -lm"
echo "# steps $steps (run.c -n; positions incl. BOS); date $(date -u +%FT%TZ)"
echo "# columns: prompt | prompt tokens incl. BOS (ours) | generated (ours) | token parity | text parity | note"
pass=0
n=0
for p in "${prompts[@]}"; do
    n=$((n + 1))
    rc_args=()
    [ -n "$p" ] && rc_args=(-i "$p")   # empty prompt = no -i (run.c then starts from BOS alone)
    "$work/run" "$model" -t 0 -n "$steps" "${rc_args[@]}" -z "$tok" >"$work/rc.out" 2>"$work/rc.err"
    # prompt length (incl. BOS) from a 1-token run, then the aligned run
    "$inferlab" generate --model "$model" --tokenizer "$tok" --prompt "$p" --max-tokens 1 --print-ids \
        >/dev/null 2>"$work/len.err"
    plen=$(python3 -c 'import re,sys; print(len(re.search(r"\[ids prompt: ([^;]*);", open(sys.argv[1]).read()).group(1).split()))' "$work/len.err")
    if [ "$plen" -gt $((steps + 1)) ]; then
        # run.c would print only the first STEPS prompt tokens, generating nothing
        echo "'${p:0:37}...' | $plen | 0 | SKIP | SKIP | prompt longer than steps $steps"
        n=$((n - 1))
        continue
    fi
    "$inferlab" generate --model "$model" --tokenizer "$tok" --prompt "$p" \
        --max-tokens $((steps + 1 - plen)) --print-ids >"$work/ours.out" 2>"$work/ours.err"
    if python3 - "$tok" "$work" "$p" <<'PY'; then pass=$((pass + 1)); fi
import re, struct, sys

tok_path, work, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
raw = open(tok_path, "rb").read()
off = 4  # max_token_length
vocab = []
while off < len(raw):
    _score, n = struct.unpack_from("<fi", raw, off)
    off += 8
    vocab.append(raw[off:off + n])
    off += n

err = open(f"{work}/ours.err").read()
m = re.search(r"\[ids prompt: ([^;]*); generated: ([^\]]*)\]", err)
pids = [int(x) for x in m.group(1).split()]
gids = [int(x) for x in m.group(2).split()]
stop = re.search(r"stop: ([^,]*),", err).group(1)

def printable_or_space(b):
    return 0x20 <= b <= 0x7E or 0x09 <= b <= 0x0D

def render(ids):
    out = bytearray()
    prev = 1
    for t in ids:
        piece = vocab[t]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        hx = re.match(rb"<0x([0-9A-Fa-f]{1,2})", piece)
        if hx:
            b = int(hx.group(1), 16)
            if printable_or_space(b):
                out.append(b)
        else:
            out += piece
        prev = t
    return bytes(out) + b"\n"

rc = open(f"{work}/rc.out", "rb").read()
ours_text = open(f"{work}/ours.out", "rb").read()
mine = render(pids[1:] + gids)
tok_ok = mine == rc
text_ok = rc.endswith(ours_text)
note = f"stop {stop}"
if not tok_ok:
    i = next((k for k in range(min(len(mine), len(rc))) if mine[k] != rc[k]), min(len(mine), len(rc)))
    note += f"; first byte difference at {i}: run.c {rc[max(0,i-20):i+20]!r} vs ours-rendered {mine[max(0,i-20):i+20]!r}"
if tok_ok and not text_ok:
    dropped = sorted({b for b in ours_text if b >= 0x80})
    note += (f"; text differs only in rendering: run.c drops non-printable byte tokens "
             f"({len(dropped)} distinct bytes >= 0x80 in our UTF-8 text)")
short = prompt if len(prompt) <= 40 else prompt[:37] + "..."
print(f"{short!r} | {len(pids)} | {len(gids)} | {'SAME' if tok_ok else 'DIFF'} | "
      f"{'SAME' if text_ok else 'DIFF'} | {note}")
sys.exit(0 if tok_ok else 1)
PY
done
echo "token parity: $pass/$n prompts compared"
[ "$pass" -eq "$n" ]
