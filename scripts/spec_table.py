#!/usr/bin/env python3
"""Markdown table of a speculative-decoding sweep from `inferlab speculative
run --json` files (one or more configurations each; see scripts/spec_sweep.sh).

Per configuration: reached draft positions n, measured acceptance, the
TV-based prediction (mean beta over the same positions), their difference,
its standard error SE = sqrt(sum beta_i (1 - beta_i)) / n (printed by the
run), the difference in SEs, and tokens per target pass measured vs
predicted. Per temperature: mean difference, mean |difference|, the mean
|difference| expected from sampling noise alone if the prediction is
unbiased (sqrt(2/pi) * SE per row, averaged), mean z^2 (about 1 when the
differences are noise of the stated size), and the pooled measured vs
predicted acceptance with its SE.

Usage: spec_table.py FILE.json... > table.md   (Python 3 standard library only)
"""
import json
import math
import sys


def load(paths):
    rows = []
    for p in paths:
        try:
            with open(p) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"spec_table: {p}: {e}")
        if not isinstance(data, list):
            sys.exit(f"spec_table: {p}: expected a JSON list of run results")
        for i, r in enumerate(data):
            for key in ("draft", "temperature", "k", "acceptance", "predicted_acceptance",
                        "tokens_per_pass", "predicted_tokens_per_pass", "per_position_reached"):
                if key not in r:
                    sys.exit(f"spec_table: {p}: entry {i} has no field `{key}`")
            if "acceptance_diff_se" not in r:
                sys.exit(f"spec_table: {p}: entry {i} has no field `acceptance_diff_se` "
                         "(written by an older inferlab; rerun)")
            rows.append(r)
    return rows


def draft_key(d):
    if d.startswith("layers:"):
        return (0, int(d.split(":", 1)[1]), d)
    return (1, 0, d)


def main(paths):
    if not paths:
        sys.exit(__doc__)
    rows = load(paths)
    rows.sort(key=lambda r: (draft_key(r["draft"]), r["temperature"], r["k"]))
    out = []
    out.append("| draft | T | k | reached | accept | TV-pred | diff | SE | diff/SE | tok/pass | pred tok/pass |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    by_t = {}
    for r in rows:
        n = sum(r["per_position_reached"])
        diff = r["acceptance"] - r["predicted_acceptance"]
        se = r["acceptance_diff_se"]
        z = diff / se if se > 0 else float("nan") if diff != 0 else 0.0
        zs = "—" if math.isnan(z) else f"{z:+.2f}"
        out.append(
            f"| {r['draft']} | {r['temperature']:.1f} | {r['k']} | {n} | {r['acceptance']:.4f} "
            f"| {r['predicted_acceptance']:.4f} | {diff:+.4f} | {se:.4f} | {zs} "
            f"| {r['tokens_per_pass']:.3f} | {r['predicted_tokens_per_pass']:.3f} |"
        )
        by_t.setdefault(r["temperature"], []).append((r, n, diff, se, z))
    summary = [
        "| T | configs | reached | mean diff | mean abs diff | noise-only mean abs diff | mean z² | pooled accept | pooled TV-pred | pooled SE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted(by_t):
        g = by_t[t]
        n_tot = sum(x[1] for x in g)
        c = len(g)
        mean_d = sum(x[2] for x in g) / c
        mean_abs = sum(abs(x[2]) for x in g) / c
        noise = sum(math.sqrt(2 / math.pi) * x[3] for x in g) / c
        zz = [x[4] ** 2 for x in g if not math.isnan(x[4])]
        mean_z2 = f"{sum(zz) / len(zz):.2f}" if zz else "—"
        acc = sum(x[0]["acceptance"] * x[1] for x in g) / max(n_tot, 1)
        pred = sum(x[0]["predicted_acceptance"] * x[1] for x in g) / max(n_tot, 1)
        # Pooled SE: sqrt(sum over configs of (SE_c n_c)^2) / N.
        pse = math.sqrt(sum((x[3] * x[1]) ** 2 for x in g)) / max(n_tot, 1)
        summary.append(
            f"| {t:.1f} | {c} | {n_tot} | {mean_d:+.4f} | {mean_abs:.4f} | {noise:.4f} | {mean_z2} "
            f"| {acc:.4f} | {pred:.4f} | {pse:.4f} |"
        )
    print("\n".join(summary))
    print()
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
