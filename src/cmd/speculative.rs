//! `inferlab speculative`: the acceptance theory, the losslessness check on
//! probability tables, and draft-then-verify runs on real models.
//!
//! - `theory --alpha A --k K --cost-ratio C`: expected tokens per target pass,
//!   wall-time speedup, the best k, and a table over k.
//! - `check --target-probs P.npy --draft-probs Q.npy --samples N --seed S`:
//!   P `[k+1, V]`, Q `[k, V]` (f32 or f64 .npy); seeded steps of the reference
//!   rejection sampler against the analytic laws (per position and accepted
//!   count), with Pearson chi-square statistics and p-values.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use inferlab_reference::speculative::{lossless, theory, verify};
use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Expected tokens per pass, speedup and the best k for an acceptance rate.
    Theory(TheoryArgs),
    /// Check the rejection sampler on probability tables (chi-square vs the analytic law).
    Check(CheckArgs),
}

#[derive(clap::Args)]
pub struct TheoryArgs {
    /// Per-position acceptance probability α in [0, 1].
    #[arg(long)]
    alpha: f64,
    /// Draft tokens per target pass.
    #[arg(long)]
    k: u32,
    /// Cost of one draft step relative to one target pass (c ≥ 0).
    #[arg(long = "cost-ratio")]
    cost_ratio: f64,
    /// Largest k considered for the best k and the table.
    #[arg(long = "k-max", default_value_t = 16)]
    k_max: u32,
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Target probabilities, [k+1, V] (.npy, f32 or f64).
    #[arg(long = "target-probs")]
    target_probs: PathBuf,
    /// Draft probabilities, [k, V] (.npy, same dtype as the target).
    #[arg(long = "draft-probs")]
    draft_probs: PathBuf,
    /// Number of verification steps to sample.
    #[arg(long, default_value_t = 100_000)]
    samples: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        Sub::Theory(t) => theory_cmd(t),
        Sub::Check(c) => check_cmd(c),
    }
}

fn theory_cmd(a: TheoryArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&a.alpha) {
        bail!("--alpha {}: must be a probability in [0, 1]", a.alpha);
    }
    if !(a.cost_ratio >= 0.0) || !a.cost_ratio.is_finite() {
        bail!("--cost-ratio {}: must be a finite number ≥ 0", a.cost_ratio);
    }
    if a.k == 0 {
        bail!("--k 0: at least one draft token per pass is required (k ≥ 1)");
    }
    if a.k_max == 0 || a.k_max > 1024 {
        bail!("--k-max {}: must be in 1..=1024", a.k_max);
    }
    let e = theory::expected_tokens_per_pass(a.alpha, a.k);
    let s = theory::speedup(a.alpha, a.k, a.cost_ratio);
    let (bk, bs) = theory::best_k(a.alpha, a.cost_ratio, a.k_max);
    println!(
        "alpha = {}  k = {}  cost ratio c = {}",
        a.alpha, a.k, a.cost_ratio
    );
    println!("expected tokens per target pass: {e:.4}");
    println!("expected accepted drafts per pass: {:.4}", e - 1.0);
    println!("speedup (1 - a^(k+1)) / ((1 - a)(k c + 1)): {s:.4}");
    if bk == 0 {
        println!(
            "best k in 1..={}: none pays (speedup ≤ 1 for every k; do not speculate)",
            a.k_max
        );
    } else {
        println!("best k in 1..={}: {bk} (speedup {bs:.4})", a.k_max);
    }
    println!();
    println!("{:>4}  {:>14}  {:>8}", "k", "tokens/pass", "speedup");
    let top = a.k_max.max(a.k);
    for k in 1..=top {
        let mark = match (k == a.k, k == bk) {
            (true, true) => "  <- --k, best",
            (true, false) => "  <- --k",
            (false, true) => "  <- best",
            _ => "",
        };
        println!(
            "{k:>4}  {:>14.4}  {:>8.4}{mark}",
            theory::expected_tokens_per_pass(a.alpha, k),
            theory::speedup(a.alpha, k, a.cost_ratio)
        );
    }
    Ok(())
}

/// A probability table read from .npy as f32 or f64.
enum Table {
    F32(Array2<f32>),
    F64(Array2<f64>),
}

impl Table {
    fn read(path: &Path) -> Result<Table> {
        if !path.exists() {
            bail!("{}: no such file", path.display());
        }
        match ndarray_npy::read_npy::<_, Array2<f64>>(path) {
            Ok(a) => Ok(Table::F64(a)),
            Err(e64) => match ndarray_npy::read_npy::<_, Array2<f32>>(path) {
                Ok(a) => Ok(Table::F32(a)),
                Err(_) => bail!(
                    "{}: not a 2-D float32/float64 .npy array ({e64})",
                    path.display()
                ),
            },
        }
    }
    fn shape(&self) -> (usize, usize) {
        match self {
            Table::F32(a) => a.dim(),
            Table::F64(a) => a.dim(),
        }
    }
    fn dtype(&self) -> &'static str {
        match self {
            Table::F32(_) => "float32",
            Table::F64(_) => "float64",
        }
    }
}

fn check_cmd(a: CheckArgs) -> Result<()> {
    let p = Table::read(&a.target_probs)?;
    let q = Table::read(&a.draft_probs)?;
    let (pk, pv) = p.shape();
    let (qk, qv) = q.shape();
    let (tp, dp) = (a.target_probs.display(), a.draft_probs.display());
    if qk == 0 {
        bail!("{dp}: the draft has 0 rows (k = 0); k ≥ 1 draft positions are required");
    }
    if pv != qv {
        bail!("vocabulary sizes differ: {tp} has V = {pv}, {dp} has V = {qv}");
    }
    if pk != qk + 1 {
        bail!(
            "{tp}: expected k+1 = {} rows for the k = {qk} rows of {dp}, got {pk}",
            qk + 1
        );
    }
    if a.samples == 0 {
        bail!("--samples 0: at least one sample is required");
    }
    // Validate each file on its own so the error names it.
    let validate = |t: &Table, path: &Path, what: &str| -> Result<()> {
        let r = match t {
            Table::F32(x) => verify::validate_rows(what, x.view()),
            Table::F64(x) => verify::validate_rows(what, x.view()),
        };
        r.with_context(|| format!("{}", path.display()))
    };
    validate(&p, &a.target_probs, "target probabilities")?;
    validate(&q, &a.draft_probs, "draft probabilities")?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let report = match (&p, &q) {
        (Table::F32(x), Table::F32(y)) => {
            lossless::check_sampling(x.view(), y.view(), a.samples, &mut rng)?
        }
        (Table::F64(x), Table::F64(y)) => {
            lossless::check_sampling(x.view(), y.view(), a.samples, &mut rng)?
        }
        _ => bail!(
            "dtypes differ: {tp} is {}, {dp} is {}; verification runs in one precision",
            p.dtype(),
            q.dtype()
        ),
    };
    print_report(&report, a.samples, a.seed, qk, pv, p.dtype());
    Ok(())
}

fn print_report(r: &lossless::CheckReport, n: u64, seed: u64, k: usize, v: usize, dtype: &str) {
    println!("speculative check: k = {k}, V = {v}, {dtype}, {n} steps, seed {seed}");
    println!(
        "per-position acceptance beta_i = sum min(p_i, q_i): [{}]",
        r.beta
            .iter()
            .map(|b| format!("{b:.6}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "expected tokens per pass: {:.4}",
        theory::expected_tokens_per_pass_vec(&r.beta)
    );
    for i in 0..=k {
        let reached: u64 = r.counts[i].iter().sum();
        let kind = if i < k {
            "accepted draft or corrected token"
        } else {
            "bonus token"
        };
        println!();
        println!("position {i} ({kind}): reached in {reached} steps");
        // The tokens shown: all for small V, else the 16 most probable (analytic).
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| {
            r.analytic[i][b]
                .total_cmp(&r.analytic[i][a])
                .then(a.cmp(&b))
        });
        let shown = if v <= 32 { v } else { 16 };
        let mut idx: Vec<usize> = order[..shown].to_vec();
        idx.sort();
        println!(
            "{:>8}  {:>12}  {:>12}  {:>10}",
            "token", "analytic", "expected", "observed"
        );
        for &t in &idx {
            println!(
                "{t:>8}  {:>12.6}  {:>12.1}  {:>10}",
                r.analytic[i][t],
                r.analytic[i][t] * reached as f64,
                r.counts[i][t]
            );
        }
        if shown < v {
            let rest_p: f64 = order[shown..].iter().map(|&t| r.analytic[i][t]).sum();
            let rest_c: u64 = order[shown..].iter().map(|&t| r.counts[i][t]).sum();
            println!(
                "{:>8}  {rest_p:>12.6}  {:>12.1}  {rest_c:>10}",
                "others",
                rest_p * reached as f64
            );
        }
        let c = &r.chi_square[i];
        println!(
            "chi-square = {:.4}  df = {}  p-value = {:.6}",
            c.statistic, c.df, c.p_value
        );
    }
    println!();
    println!("accepted drafts per step:");
    println!(
        "{:>8}  {:>12}  {:>12}  {:>10}",
        "accepted", "analytic", "expected", "observed"
    );
    for (j, (&pa, &c)) in r
        .accepted_analytic
        .iter()
        .zip(&r.accepted_counts)
        .enumerate()
    {
        println!("{j:>8}  {pa:>12.6}  {:>12.1}  {c:>10}", pa * n as f64);
    }
    let c = &r.accepted_chi_square;
    println!(
        "chi-square = {:.4}  df = {}  p-value = {:.6}",
        c.statistic, c.df, c.p_value
    );
}
