//! `inferlab speculative`: the acceptance theory, the losslessness check on
//! probability tables, and draft-then-verify runs on real models.
//!
//! - `theory --alpha A --k K --cost-ratio C`: expected tokens per target pass,
//!   wall-time speedup, the best k, and a table over k.
//! - `check --target-probs P.npy --draft-probs Q.npy --samples N --seed S`:
//!   P `[k+1, V]`, Q `[k, V]` (f32 or f64 .npy); seeded steps of the reference
//!   rejection sampler against the analytic laws (per position and accepted
//!   count), with Pearson chi-square statistics and p-values.
//! - `run --target MODEL [--draft MODEL | --draft-layers N | --draft ngram] --k K
//!   --temperature T --prompts FILE --max-tokens N --seed S`: speculative
//!   generation; per-position acceptance measured vs predicted from the
//!   per-position TV distances, tokens per target pass, passes saved, outputs.
//!   `--k`, `--temperature` and `--draft-layers` take comma-separated lists and
//!   `--draft` may repeat: every combination is run on one loaded model (the
//!   sweep in docs/speculative.md); `--json` writes all results. The table
//!   prints measured − predicted acceptance with its standard error.
//!   `--tree-branching 3,1,1` verifies a draft tree per pass (SpecInfer).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use inferlab_models::tokenizer::Tokenizer;
use inferlab_reference::model::{self, CacheKind};
use inferlab_reference::speculative::decode::{
    ModelProposer, NgramProposer, Proposer, SpecConfig, SpecStats, TreeShape, VerifyRule,
};
use inferlab_reference::speculative::verify::{Typical, Warp};
use inferlab_reference::speculative::{self, lossless, theory, verify};
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
    /// Draft-then-verify generation on a real model: acceptance vs the TV prediction.
    Run(RunArgs),
    /// Redraw the SVG of measured vs predicted acceptance from `run --json` files.
    Plot(PlotArgs),
    /// Law of the first generated tokens with vs without speculation, many seeds (chi-square).
    Compare(CompareArgs),
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
        Sub::Run(r) => run_cmd(r),
        Sub::Plot(p) => plot_cmd(p),
        Sub::Compare(c) => compare_cmd(c),
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

#[derive(clap::Args)]
pub struct RunArgs {
    /// Target model (.gguf or llama2.c .bin).
    #[arg(long)]
    target: PathBuf,
    /// Tokenizer of a llama2.c target (default: found beside it; GGUF embeds its own).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Draft: `ngram` (prompt lookup) or a model path with the target's tokenizer. May repeat.
    #[arg(long)]
    draft: Vec<String>,
    /// Self-speculative drafts: the target's first N layers (comma list).
    #[arg(long = "draft-layers", value_delimiter = ',')]
    draft_layers: Vec<usize>,
    /// Draft tokens per target pass (comma list).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "tree_branching"
    )]
    k: Vec<usize>,
    /// Tree speculation (SpecInfer) instead of a chain: children per node at
    /// each depth, e.g. `3,1,1` (three branches of depth 3) or `2,2`. At T > 0
    /// the children are i.i.d. draft samples (lossless), at T = 0 the draft's
    /// top tokens. The depth replaces --k (give one or the other). Model drafts only.
    #[arg(long = "tree-branching", conflicts_with = "k")]
    tree_branching: Option<String>,
    /// Sampling temperature(s) (comma list); 0 = greedy.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1.0])]
    temperature: Vec<f64>,
    #[arg(long = "top-k")]
    top_k: Option<usize>,
    #[arg(long = "top-p")]
    top_p: Option<f64>,
    /// Medusa typical acceptance (lossy) instead of rejection sampling.
    #[arg(long)]
    typical: bool,
    /// Text file, one prompt per non-empty line.
    #[arg(long)]
    prompts: PathBuf,
    #[arg(long = "max-tokens", default_value_t = 32)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "contiguous", value_parser = ["contiguous", "paged"])]
    cache: String,
    #[arg(long = "block-size", default_value_t = 16)]
    block_size: usize,
    /// Also write every configuration's statistics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write an SVG scatter of measured vs TV-predicted acceptance (one
    /// point per configuration, T > 0 filled, T = 0 hollow) here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print the generated texts.
    #[arg(long = "print-outputs")]
    print_outputs: bool,
}

/// The tokenizer of a model file: embedded (GGUF) or beside it / `tok` (llama2.c).
fn load_tokenizer(path: &Path, tok: Option<&Path>) -> Result<Box<dyn Tokenizer>> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    Ok(
        match (tok, inferlab_models::tokenizer::embedded_in(path)?) {
            (None, Some(t)) => t,
            (tok, _) => model::load_tokenizer(path, tok)?,
        },
    )
}

fn load_weights(path: &Path, t: &dyn Tokenizer) -> Result<model::Llama> {
    let ck = model::load_checkpoint(path).with_context(|| format!("loading {}", path.display()))?;
    let m = model::Llama::from_checkpoint(&ck)?;
    if t.vocab_size() > m.config.vocab {
        bail!(
            "{}: tokenizer has {} tokens but the model's vocabulary is {}",
            path.display(),
            t.vocab_size(),
            m.config.vocab
        );
    }
    Ok(m)
}

enum DraftSpec {
    Ngram,
    Layers(usize),
    Model(PathBuf),
}

impl DraftSpec {
    fn label(&self) -> String {
        match self {
            DraftSpec::Ngram => "ngram".into(),
            DraftSpec::Layers(n) => format!("layers:{n}"),
            DraftSpec::Model(p) => format!("model:{}", p.display()),
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RunResult {
    draft: String,
    k: usize,
    temperature: f64,
    prompts: usize,
    passes: u64,
    tokens: u64,
    step_tokens: u64,
    proposed: u64,
    acceptance: f64,
    predicted_acceptance: f64,
    /// Standard error of acceptance − predicted_acceptance (sqrt(Σβ(1−β))/n).
    #[serde(default)]
    acceptance_diff_se: f64,
    /// Tree branching (`None`: a chain of k drafts).
    #[serde(default)]
    tree: Option<String>,
    tokens_per_pass: f64,
    predicted_tokens_per_pass: f64,
    passes_saved: i64,
    per_position_reached: Vec<u64>,
    /// `None` where no step reached the position.
    per_position_acceptance: Vec<Option<f64>>,
    per_position_predicted: Vec<Option<f64>>,
    outputs: Vec<String>,
}

fn run_cmd(a: RunArgs) -> Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    let mut drafts: Vec<DraftSpec> = Vec::new();
    for d in &a.draft {
        if d == "ngram" {
            drafts.push(DraftSpec::Ngram);
        } else {
            drafts.push(DraftSpec::Model(PathBuf::from(d)));
        }
    }
    drafts.extend(a.draft_layers.iter().map(|&n| DraftSpec::Layers(n)));
    if drafts.is_empty() {
        bail!("no draft: give --draft MODEL, --draft ngram or --draft-layers N");
    }
    if let Some(&k) = a.k.iter().find(|&&k| k == 0) {
        bail!("--k {k}: at least one draft token per pass is required (k ≥ 1)");
    }
    let tree = match &a.tree_branching {
        Some(spec) => {
            Some(TreeShape::parse(spec).with_context(|| format!("--tree-branching {spec}"))?)
        }
        None => None,
    };
    let ks: Vec<usize> = match &tree {
        Some(t) => vec![t.depth()],
        None => a.k.clone(),
    };
    if tree.is_some() && a.typical {
        bail!("--typical: typical acceptance is not defined for trees (drop --tree-branching)");
    }
    if tree.is_some() && a.draft.iter().any(|d| d == "ngram") {
        bail!("--draft ngram: n-gram drafts cannot propose trees (use a model draft with --tree-branching)");
    }
    for &t in &a.temperature {
        if !(t >= 0.0 && t.is_finite()) {
            bail!("--temperature {t}: must be a finite number ≥ 0");
        }
    }
    let cache = match a.cache.as_str() {
        "paged" => {
            if a.block_size == 0 {
                bail!("--block-size 0: must be ≥ 1");
            }
            CacheKind::Paged {
                block_size: a.block_size,
            }
        }
        _ => CacheKind::Contiguous,
    };
    let text = std::fs::read_to_string(&a.prompts)
        .with_context(|| format!("{}: cannot read prompts", a.prompts.display()))?;
    let prompt_texts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if prompt_texts.is_empty() {
        bail!(
            "{}: no prompts (one per non-empty line)",
            a.prompts.display()
        );
    }
    let tok = load_tokenizer(&a.target, a.tokenizer.as_deref())?;
    let target = load_weights(&a.target, tok.as_ref())?;
    for d in &drafts {
        if let DraftSpec::Layers(n) = d {
            if *n == 0 || *n > target.config.n_layers {
                bail!(
                    "--draft-layers {n}: must be in 1..={} ({} has {} layers)",
                    target.config.n_layers,
                    a.target.display(),
                    target.config.n_layers
                );
            }
        }
    }
    // Separate draft models, loaded once; their tokenizer must be the target's.
    let mut draft_models: Vec<Option<model::Llama>> = Vec::new();
    for d in &drafts {
        if let DraftSpec::Model(p) = d {
            // The tokenizer is checked before the weights are loaded.
            let t = load_tokenizer(p, None)?;
            speculative::decode::same_tokenizer(tok.as_ref(), t.as_ref()).with_context(|| {
                format!("draft {} vs target {}", p.display(), a.target.display())
            })?;
            let m = load_weights(p, t.as_ref())?;
            if m.config.vocab != target.config.vocab {
                bail!(
                    "draft {}: vocabulary {} differs from the target's {}",
                    p.display(),
                    m.config.vocab,
                    target.config.vocab
                );
            }
            draft_models.push(Some(m));
        } else {
            draft_models.push(None);
        }
    }
    let prompts: Vec<Vec<u32>> = prompt_texts
        .iter()
        .map(|t| tok.bos().into_iter().chain(tok.encode(t)).collect())
        .collect();
    let stops: Vec<u32> = tok.eos().into_iter().collect();
    let total = (drafts.len() * ks.len() * a.temperature.len() * prompts.len()) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("template"),
    );
    let mut results = Vec::new();
    for (d, dm) in drafts.iter().zip(&draft_models) {
        for &temperature in &a.temperature {
            for &k in &ks {
                bar.set_message(format!("{} T={temperature} k={k}", d.label()));
                let cfg = SpecConfig {
                    k,
                    warp: Warp {
                        temperature,
                        top_k: a.top_k,
                        top_p: a.top_p,
                    },
                    max_new_tokens: a.max_tokens,
                    stop_tokens: stops.clone(),
                    rule: if a.typical {
                        VerifyRule::Typical(Typical::default())
                    } else {
                        VerifyRule::Lossless
                    },
                    cache,
                };
                let mut stats = SpecStats::default();
                let mut outputs = Vec::new();
                for (i, p) in prompts.iter().enumerate() {
                    // One stream per (seed, prompt): runs are comparable across configs.
                    let mut rng = ChaCha8Rng::seed_from_u64(a.seed.wrapping_add(i as u64));
                    let mut proposer: Box<dyn Proposer + '_> = match (d, dm) {
                        (DraftSpec::Ngram, _) => Box::new(NgramProposer::new(target.config.vocab)),
                        (DraftSpec::Layers(n), _) => {
                            Box::new(ModelProposer::layers(&target, cache, *n)?)
                        }
                        (DraftSpec::Model(p), Some(m)) => {
                            Box::new(ModelProposer::model(m, cache, &p.display().to_string())?)
                        }
                        (DraftSpec::Model(_), None) => {
                            unreachable!("draft models are loaded above")
                        }
                    };
                    let (out, st) = match &tree {
                        Some(shape) => speculative::decode::speculative_generate_tree(
                            &target,
                            proposer.as_mut(),
                            p,
                            &cfg,
                            shape,
                            &mut rng,
                        )?,
                        None => speculative::decode::speculative_generate(
                            &target,
                            proposer.as_mut(),
                            p,
                            &cfg,
                            &mut rng,
                        )?,
                    };
                    stats.merge(&st);
                    outputs.push(tok.decode(&out));
                    bar.inc(1);
                }
                let per_acc = stats
                    .reached
                    .iter()
                    .zip(&stats.accepted)
                    .map(|(&r, &c)| (r > 0).then(|| c as f64 / r as f64))
                    .collect();
                let per_pred = stats
                    .reached
                    .iter()
                    .zip(&stats.beta_sum)
                    .map(|(&r, &b)| (r > 0).then(|| b / r as f64))
                    .collect();
                results.push(RunResult {
                    draft: d.label(),
                    k,
                    temperature,
                    prompts: prompts.len(),
                    passes: stats.passes,
                    tokens: stats.tokens,
                    step_tokens: stats.step_tokens,
                    proposed: stats.proposed,
                    acceptance: stats.acceptance(),
                    predicted_acceptance: stats.predicted_acceptance(),
                    acceptance_diff_se: stats.acceptance_diff_se(),
                    tree: a.tree_branching.clone(),
                    tokens_per_pass: stats.tokens_per_pass(),
                    predicted_tokens_per_pass: stats.predicted_tokens_per_pass(),
                    passes_saved: stats.tokens as i64 - stats.passes as i64,
                    per_position_reached: stats.reached.clone(),
                    per_position_acceptance: per_acc,
                    per_position_predicted: per_pred,
                    outputs,
                });
            }
        }
    }
    bar.finish_and_clear();
    println!(
        "target {} ({} layers, vocab {}), {} prompts, max {} new tokens, seed {}, cache {}",
        a.target.display(),
        target.config.n_layers,
        target.config.vocab,
        prompts.len(),
        a.max_tokens,
        a.seed,
        a.cache
    );
    println!();
    if let Some(t) = &a.tree_branching {
        println!(
            "tree branching {t} (k = depth; prediction: SpecInfer 1 - prod(1 - beta_j) per node)"
        );
    }
    println!(
        "{:<12} {:>5} {:>3} {:>7} {:>7} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>7}",
        "draft",
        "T",
        "k",
        "tokens",
        "passes",
        "accept",
        "TV-pred",
        "diff",
        "SE(diff)",
        "tok/pass",
        "pred",
        "saved"
    );
    for r in &results {
        println!(
            "{:<12} {:>5} {:>3} {:>7} {:>7} {:>9.4} {:>9.4} {:>+9.4} {:>8.4} {:>7.3} {:>7.3} {:>7}",
            r.draft,
            r.temperature,
            r.k,
            r.tokens,
            r.passes,
            r.acceptance,
            r.predicted_acceptance,
            r.acceptance - r.predicted_acceptance,
            r.acceptance_diff_se,
            r.tokens_per_pass,
            r.predicted_tokens_per_pass,
            r.passes_saved
        );
    }
    println!("SE(diff) = sqrt(sum beta_i (1 - beta_i)) / n over the n reached draft positions");
    for r in &results {
        println!();
        println!(
            "{} T={} k={}: per-position acceptance (measured / TV-predicted, reached)",
            r.draft, r.temperature, r.k
        );
        for (i, ((m, p), n)) in r
            .per_position_acceptance
            .iter()
            .zip(&r.per_position_predicted)
            .zip(&r.per_position_reached)
            .enumerate()
        {
            match (m, p) {
                (Some(m), Some(p)) => {
                    println!("  position {:>2}: {m:>7.4} / {p:>7.4}  ({n})", i + 1)
                }
                _ => println!("  position {:>2}: not reached", i + 1),
            }
        }
        if a.print_outputs {
            for (i, o) in r.outputs.iter().enumerate() {
                println!("  output {i}: {o:?}");
            }
        }
    }
    if let Some(path) = &a.svg {
        write_atomic(path, &acceptance_svg(&results))?;
    }
    if let Some(path) = &a.json {
        write_atomic(path, &serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Measured vs TV-predicted acceptance, one point per configuration (radius
/// grows with the number of reached draft positions), and the line y = x.
fn acceptance_svg(results: &[RunResult]) -> String {
    let (w, h, m) = (480.0, 480.0, 50.0);
    let sx = |x: f64| m + x * (w - 2.0 * m);
    let sy = |y: f64| h - m - y * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    s += &format!(
        "<rect x=\"{m}\" y=\"{m}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>\n",
        w - 2.0 * m,
        h - 2.0 * m
    );
    s += &format!(
        "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"gray\" stroke-dasharray=\"4\"/>\n",
        sx(0.0),
        sy(0.0),
        sx(1.0),
        sy(1.0)
    );
    for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{t}</text>\n",
            sx(t),
            h - m + 16.0
        );
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{t}</text>\n",
            m - 6.0,
            sy(t) + 4.0
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">TV-predicted acceptance (mean β)</text>\n",
        w / 2.0,
        h - 12.0
    );
    s += &format!(
        "<text x=\"14\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {})\">measured acceptance</text>\n",
        h / 2.0,
        h / 2.0
    );
    for r in results {
        let n: u64 = r.per_position_reached.iter().sum();
        if n == 0 {
            continue;
        }
        let rad = 2.0 + (n as f64).sqrt().min(12.0);
        let fill = if r.temperature > 0.0 {
            "steelblue"
        } else {
            "none"
        };
        s += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"{rad:.1}\" fill=\"{fill}\" fill-opacity=\"0.5\" stroke=\"steelblue\"><title>{} T={} k={} reached {n}</title></circle>\n",
            sx(r.predicted_acceptance),
            sy(r.acceptance),
            r.draft,
            r.temperature,
            r.k
        );
    }
    s += "</svg>\n";
    s
}

#[derive(clap::Args)]
pub struct PlotArgs {
    /// JSON files written by `speculative run --json`.
    #[arg(long, required = true)]
    json: Vec<PathBuf>,
    #[arg(long)]
    svg: PathBuf,
}

fn plot_cmd(a: PlotArgs) -> Result<()> {
    let mut all: Vec<RunResult> = Vec::new();
    for p in &a.json {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
        let mut r: Vec<RunResult> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a `speculative run --json` file", p.display()))?;
        all.append(&mut r);
    }
    write_atomic(&a.svg, &acceptance_svg(&all))
}

#[derive(clap::Args)]
pub struct CompareArgs {
    /// Target model (.gguf or llama2.c .bin).
    #[arg(long)]
    target: PathBuf,
    /// Tokenizer of a llama2.c target (default: found beside it; GGUF embeds its own).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Draft model with the target's tokenizer (or use --draft-layers).
    #[arg(long, conflicts_with = "draft_layers")]
    draft: Option<PathBuf>,
    /// Self-speculative draft: the target's first N layers.
    #[arg(long = "draft-layers")]
    draft_layers: Option<usize>,
    /// Draft tokens per target pass.
    #[arg(long, required_unless_present = "tree_branching")]
    k: Option<usize>,
    /// Tree speculation instead of a chain (children per node at each depth, e.g. 3,1,1).
    #[arg(long = "tree-branching", conflicts_with = "k")]
    tree_branching: Option<String>,
    /// Sampling temperature (> 0).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long = "top-k")]
    top_k: Option<usize>,
    #[arg(long = "top-p")]
    top_p: Option<f64>,
    /// Prompt text (BOS is prepended).
    #[arg(long)]
    prompt: String,
    /// Seeds per arm: speculative runs use seeds 0..N, plain runs N..2N
    /// (independent samples), both offset by --seed.
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generated tokens compared (the joint law of the first N tokens).
    #[arg(long, default_value_t = 2)]
    tokens: usize,
    /// Categories printed (most frequent first).
    #[arg(long, default_value_t = 15)]
    show: usize,
}

/// `speculative compare`: the joint law of the first `--tokens` generated
/// tokens with speculation vs plain sampling (chi-square homogeneity), and
/// the first token with speculation vs its exact law (one softmax; chi-square
/// goodness of fit). The prompt's KV caches are built once and cloned per seed.
fn compare_cmd(a: CompareArgs) -> Result<()> {
    use inferlab_reference::speculative::decode::{
        speculative_generate_tree_with, speculative_generate_with, Verifier,
    };
    use rand::Rng;
    use rayon::prelude::*;
    if !(a.temperature > 0.0 && a.temperature.is_finite()) {
        bail!(
            "--temperature {}: must be > 0 (at 0 both arms are greedy and identical)",
            a.temperature
        );
    }
    if a.seeds == 0 {
        bail!("--seeds 0: at least one seed is required");
    }
    if a.tokens == 0 {
        bail!("--tokens 0: at least one token is compared");
    }
    if a.k == Some(0) {
        bail!("--k 0: at least one draft token per pass is required (k ≥ 1)");
    }
    let tree = match &a.tree_branching {
        Some(spec) => {
            Some(TreeShape::parse(spec).with_context(|| format!("--tree-branching {spec}"))?)
        }
        None => None,
    };
    let warp = Warp {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    warp.validate()?;
    let tok = load_tokenizer(&a.target, a.tokenizer.as_deref())?;
    let target = load_weights(&a.target, tok.as_ref())?;
    let draft_model = match (&a.draft, a.draft_layers) {
        (Some(p), _) => {
            let t = load_tokenizer(p, None)?;
            speculative::decode::same_tokenizer(tok.as_ref(), t.as_ref()).with_context(|| {
                format!("draft {} vs target {}", p.display(), a.target.display())
            })?;
            let m = load_weights(p, t.as_ref())?;
            if m.config.vocab != target.config.vocab {
                bail!(
                    "draft {}: vocabulary {} differs from the target's {}",
                    p.display(),
                    m.config.vocab,
                    target.config.vocab
                );
            }
            Some(m)
        }
        (None, Some(n)) => {
            if n == 0 || n > target.config.n_layers {
                bail!(
                    "--draft-layers {n}: must be in 1..={} ({} has {} layers)",
                    target.config.n_layers,
                    a.target.display(),
                    target.config.n_layers
                );
            }
            None
        }
        (None, None) => bail!("no draft: give --draft MODEL or --draft-layers N"),
    };
    let prompt: Vec<u32> = tok.bos().into_iter().chain(tok.encode(&a.prompt)).collect();
    if prompt.is_empty() {
        bail!("--prompt: empty and the tokenizer has no BOS");
    }
    if prompt.len() + a.tokens + 64 > target.config.max_seq_len {
        bail!(
            "--prompt + --tokens: {} + {} tokens leave no room in the context of {}",
            prompt.len(),
            a.tokens,
            target.config.max_seq_len
        );
    }
    let cache = CacheKind::Contiguous;
    let head = &prompt[..prompt.len() - 1];
    let mut ver0 = Verifier::new(&target, cache)?;
    ver0.prefill(head)?;
    let mut d0 = match &draft_model {
        Some(m) => ModelProposer::model(m, cache, "draft")?,
        None => ModelProposer::layers(&target, cache, a.draft_layers.expect("checked"))?,
    };
    d0.prefill(head)?;
    let cfg = SpecConfig {
        k: a.k.unwrap_or(1),
        warp: warp.clone(),
        max_new_tokens: a.tokens,
        stop_tokens: vec![],
        rule: VerifyRule::Lossless,
        cache,
    };
    // Exact law of the first token: one softmax of the prompt's last row.
    let mut c = ver0.clone();
    let l0 = c.score(&prompt, &[])?;
    let p1 = warp.probs_from_logits(l0.row(0).as_slice().expect("contiguous"));

    let t0 = std::time::Instant::now();
    let spec: Vec<(Vec<u32>, SpecStats)> = (0..a.seeds)
        .into_par_iter()
        .map(|i| -> Result<(Vec<u32>, SpecStats)> {
            let mut rng = ChaCha8Rng::seed_from_u64(a.seed.wrapping_add(i));
            let (mut d, mut v) = (d0.clone(), ver0.clone());
            let r = match &tree {
                Some(t) => speculative_generate_tree_with(
                    &target, &mut v, &mut d, &prompt, &cfg, t, &mut rng,
                )?,
                None => {
                    speculative_generate_with(&target, &mut v, &mut d, &prompt, &cfg, &mut rng)?
                }
            };
            Ok(r)
        })
        .collect::<Result<_>>()?;
    let t_spec = t0.elapsed().as_secs_f64();
    let t0 = std::time::Instant::now();
    let plain: Vec<Vec<u32>> = (0..a.seeds)
        .into_par_iter()
        .map(|i| -> Result<Vec<u32>> {
            let mut rng = ChaCha8Rng::seed_from_u64(a.seed.wrapping_add(a.seeds + i));
            let mut v = ver0.clone();
            let mut ctx = prompt.clone();
            let mut out = Vec::new();
            for _ in 0..a.tokens {
                let l = v.score(&ctx, &[])?;
                let w = warp.probs_from_logits(l.row(0).as_slice().expect("contiguous"));
                let y = verify::sample_inverse_cdf(
                    ndarray::ArrayView1::from(&w[..]),
                    rng.random::<f64>(),
                )
                .expect("warped row has mass") as u32;
                out.push(y);
                ctx.push(y);
            }
            Ok(out)
        })
        .collect::<Result<_>>()?;
    let t_plain = t0.elapsed().as_secs_f64();

    let mut stats = SpecStats::default();
    let mut joint: std::collections::BTreeMap<Vec<u32>, (u64, u64)> = Default::default();
    let mut first = vec![0u64; target.config.vocab];
    for (out, st) in &spec {
        stats.merge(st);
        joint.entry(out.clone()).or_default().0 += 1;
        first[out[0] as usize] += 1;
    }
    let mut first_plain = vec![0u64; target.config.vocab];
    for out in &plain {
        joint.entry(out.clone()).or_default().1 += 1;
        first_plain[out[0] as usize] += 1;
    }
    let keys: Vec<&Vec<u32>> = joint.keys().collect();
    let sa: Vec<u64> = joint.values().map(|v| v.0).collect();
    let sb: Vec<u64> = joint.values().map(|v| v.1).collect();
    let hom = lossless::chi_square_homogeneity(&sa, &sb)?;
    let gof = lossless::chi_square_gof(&first, &p1)?;
    let gof_plain = lossless::chi_square_gof(&first_plain, &p1)?;

    let draft_label = match (&a.draft, a.draft_layers) {
        (Some(p), _) => p.display().to_string(),
        (_, Some(n)) => format!("first {n} of {} layers", target.config.n_layers),
        _ => unreachable!("checked above"),
    };
    let shape = match &a.tree_branching {
        Some(t) => format!("tree {t}"),
        None => format!("k = {}", cfg.k),
    };
    println!(
        "target {}, draft {draft_label}, {shape}, T = {}, prompt {:?} ({} tokens), {} seeds per arm (seed {})",
        a.target.display(),
        a.temperature,
        a.prompt,
        prompt.len(),
        a.seeds,
        a.seed
    );
    println!(
        "speculative: {:.1}s, acceptance {:.4} (TV-predicted {:.4}), tokens/pass {:.3}; plain: {:.1}s",
        t_spec,
        stats.acceptance(),
        stats.predicted_acceptance(),
        stats.tokens_per_pass(),
        t_plain
    );
    println!();
    println!("first {} tokens (most frequent {}):", a.tokens, a.show);
    println!("{:>8} {:>8} {:>10}  tokens", "spec", "plain", "exact p(y1)");
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(sa[i] + sb[i]), i));
    for &i in order.iter().take(a.show) {
        let text: Vec<String> = keys[i]
            .iter()
            .map(|&t| format!("{:?}", tok.decode(&[t])))
            .collect();
        let exact = if a.tokens == 1 {
            format!("{:>10.5}", p1[keys[i][0] as usize])
        } else {
            format!("{:>10}", "")
        };
        println!("{:>8} {:>8} {exact}  {}", sa[i], sb[i], text.join(" "));
    }
    println!("{} distinct sequences", keys.len());
    println!();
    println!(
        "homogeneity (speculative vs plain, first {} tokens jointly): chi-square = {:.4}, dof = {}, p-value = {:.6} ({} bins)",
        a.tokens, hom.statistic, hom.df, hom.p_value, hom.bins
    );
    println!(
        "first token vs exact softmax, speculative: chi-square = {:.4}, dof = {}, p-value = {:.6}",
        gof.statistic, gof.df, gof.p_value
    );
    println!(
        "first token vs exact softmax, plain (control): chi-square = {:.4}, dof = {}, p-value = {:.6}",
        gof_plain.statistic, gof_plain.df, gof_plain.p_value
    );
    println!(
        "pooling: a category is a bin when its expected count is >= 5 (both samples for homogeneity); the rest form one bin, merged into the smallest bin if its expected count is < 5"
    );
    Ok(())
}
