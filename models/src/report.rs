//! Plain-text tables of the catalog (what `inferlab models list|show` print).
//!
//! Rendering lives here, next to the numbers, so it can be snapshot-tested
//! without building the CLI; the CLI only prints the strings. Output is
//! deterministic: catalog order is sorted by name, numbers are formatted with
//! fixed precision, and no map iteration order reaches the text.

use crate::catalog::{self, ModelDescriptor};
use crate::{Dtype, HardwareSpec, ModelConfig, Result};

/// A column-aligned text table: text columns left-aligned, numeric columns
/// right-aligned, two spaces between columns, a dashed rule under the header.
pub struct Table {
    headers: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `cols`: (header, right-aligned?).
    pub fn new(cols: &[(&str, Align)]) -> Table {
        Table {
            headers: cols.iter().map(|(h, _)| h.to_string()).collect(),
            right: cols.iter().map(|(_, a)| *a == Align::Right).collect(),
            rows: Vec::new(),
        }
    }
    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.headers.len(), "table row width");
        self.rows.push(cells);
    }
    pub fn render(&self) -> String {
        let n = self.headers.len();
        let width: Vec<usize> = (0..n)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .chain([self.headers[c].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(c, s)| {
                    if self.right[c] {
                        format!("{s:>w$}", w = width[c])
                    } else {
                        format!("{s:<w$}", w = width[c])
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        let mut out = line(&self.headers);
        out.push('\n');
        let rule: Vec<String> = width.iter().map(|&w| "-".repeat(w)).collect();
        out.push_str(&rule.join("  "));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}
use Align::{Left, Right};

/// `1234567` -> `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A count with an SI suffix and 3 significant digits: 8.03B, 135M, 260K.
pub fn si(n: u64) -> String {
    if n < 1000 {
        return n.to_string();
    }
    let x = n as f64;
    let (v, suffix) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "B")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "K")
    } else {
        (x, "")
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{suffix}")
}

const GIB: f64 = (1u64 << 30) as f64;

fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / GIB)
}

/// The dtypes `show` reports weight bytes for.
pub const WEIGHT_DTYPES: [Dtype; 4] = [Dtype::F32, Dtype::Bf16, Dtype::Fp8, Dtype::Int4];
/// The dtypes `show` reports KV-cache bytes for.
pub const KV_DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::Fp8];

fn heads_text(c: &ModelConfig) -> String {
    let (q, kv) = (c.num_attention_heads, c.num_kv_heads());
    let kind = if kv == q {
        "MHA".to_string()
    } else if kv == 1 {
        "MQA".to_string()
    } else {
        format!("GQA {}:1", q / kv)
    };
    format!("{q}/{kv} {kind}")
}

/// `inferlab models list`: every model, then every GPU.
pub fn render_list() -> Result<String> {
    let mut t = Table::new(&[
        ("model", Left),
        ("type", Left),
        ("params", Right),
        ("active", Right),
        ("layers", Right),
        ("hidden", Right),
        ("heads q/kv", Left),
        ("head_dim", Right),
        ("vocab", Right),
        ("context", Right),
        ("bf16 GiB", Right),
        ("KV bf16 KiB/tok", Right),
    ]);
    for d in catalog::models()? {
        let c = &d.config;
        t.row(vec![
            d.meta.name.clone(),
            c.model_type.clone(),
            si(c.num_params()),
            si(c.active_params()),
            c.num_hidden_layers.to_string(),
            c.hidden_size.to_string(),
            heads_text(c),
            c.head_dim().to_string(),
            c.vocab_size.to_string(),
            c.max_position_embeddings.to_string(),
            gib(Dtype::Bf16.bytes_for(c.num_params())),
            format!("{:.1}", c.kv_bytes_per_token(Dtype::Bf16) as f64 / 1024.0),
        ]);
    }
    let mut g = Table::new(&[
        ("gpu", Left),
        ("memory GiB", Right),
        ("driver GiB", Right),
        ("HBM TB/s", Right),
        ("fp32 TFLOP/s", Right),
        ("bf16 TFLOP/s", Right),
        ("fp8 TFLOP/s", Right),
        ("int8 TOP/s", Right),
        ("SMs", Right),
        ("L2 MiB", Right),
        ("NVLink GB/s", Right),
    ]);
    for h in catalog::hardware()? {
        g.row(gpu_row(&h));
    }
    Ok(format!(
        "MODELS (params: all experts; active: per token; bf16 GiB: weights only)\n{}\nGPUS (dense peaks; driver GiB: total the CUDA driver reports, where measured)\n{}",
        t.render(),
        g.render()
    ))
}

fn gpu_row(h: &HardwareSpec) -> Vec<String> {
    let tf = |x: f64| format!("{:.1}", x / 1e12);
    vec![
        h.name.clone(),
        format!("{:.1}", h.memory_bytes as f64 / GIB),
        h.driver_total_bytes
            .map_or("-".into(), |b| format!("{:.2}", b as f64 / GIB)),
        format!("{:.2}", h.memory_bandwidth / 1e12),
        tf(h.peak_flops.fp32),
        tf(h.peak_flops.bf16),
        h.peak_flops.fp8.map_or("-".into(), tf),
        tf(h.peak_flops.int8),
        h.sm_count.to_string(),
        format!("{:.1}", h.l2_bytes as f64 / (1u64 << 20) as f64),
        format!("{:.0}", h.nvlink_bandwidth / 1e9),
    ]
}

/// `inferlab models show NAME`: shape, counts, bytes per dtype, KV cache.
pub fn render_show(d: &ModelDescriptor) -> String {
    let c = &d.config;
    let mut out = String::new();
    out.push_str(&d.meta.name);
    if let Some(id) = &d.meta.hf_id {
        out.push_str(&format!("  ({id})"));
    }
    out.push('\n');
    out.push_str(&format!("source: {}\n\n", d.meta.source));

    let mut s = Table::new(&[("field", Left), ("value", Left)]);
    let mut kv = |k: &str, v: String| s.row(vec![k.into(), v]);
    kv("model_type", c.model_type.clone());
    kv("layers", c.num_hidden_layers.to_string());
    kv("hidden_size", c.hidden_size.to_string());
    kv("intermediate_size", c.intermediate_size.to_string());
    kv("heads (query/KV)", heads_text(c));
    kv("head_dim", c.head_dim().to_string());
    kv("vocab_size", c.vocab_size.to_string());
    kv("context", c.max_position_embeddings.to_string());
    kv(
        "sliding_window",
        c.sliding_window.map_or("-".into(), |w| w.to_string()),
    );
    kv("rope_theta", format!("{}", c.rope_theta));
    kv(
        "norm",
        format!(
            "{} (eps {:e}){}",
            if c.norm_type.as_deref() == Some("layer") {
                "LayerNorm"
            } else {
                "RMSNorm"
            },
            c.rms_norm_eps,
            if c.parallel_attn.unwrap_or(false) {
                ", parallel attention+MLP"
            } else {
                ""
            }
        ),
    );
    kv(
        "mlp",
        format!(
            "{} ({})",
            match c.mlp_kind() {
                crate::config::MlpKind::Gated => "gated: gate/up/down",
                crate::config::MlpKind::Plain => "plain: up/down",
            },
            c.hidden_act
        ),
    );
    kv(
        "experts",
        if c.num_experts() > 1 {
            format!(
                "{} per layer, {} per token",
                c.num_experts(),
                c.experts_per_token()
            )
        } else {
            "-".into()
        },
    );
    kv(
        "attention bias",
        if c.attention_bias.unwrap_or(false) {
            "q/k/v".into()
        } else {
            "none".into()
        },
    );
    kv(
        "tied embeddings",
        if c.tie_word_embeddings {
            "yes".into()
        } else {
            "no".into()
        },
    );
    kv(
        "parameters",
        format!("{} ({})", thousands(c.num_params()), si(c.num_params())),
    );
    kv(
        "active parameters",
        format!(
            "{} ({})",
            thousands(c.active_params()),
            si(c.active_params())
        ),
    );
    kv("published", format!("{:e}", d.meta.published_params));
    out.push_str(&s.render());

    out.push_str("\nweights (parameters x dtype; int4 without scales or zero points)\n");
    let mut w = Table::new(&[("dtype", Left), ("bytes", Right), ("GiB", Right)]);
    for dt in WEIGHT_DTYPES {
        let b = dt.bytes_for(c.num_params());
        w.row(vec![dt.name().into(), thousands(b), gib(b)]);
    }
    out.push_str(&w.render());

    out.push_str(&format!(
        "\nKV cache (2 x {} layers x {} KV heads x {} head_dim per token)\n",
        c.num_hidden_layers,
        c.num_kv_heads(),
        c.head_dim()
    ));
    let mut k = Table::new(&[
        ("dtype", Left),
        ("bytes/token", Right),
        ("MiB per 1k tokens", Right),
        (
            &format!("GiB at context {}", c.max_position_embeddings),
            Right,
        ),
    ]);
    for dt in KV_DTYPES {
        let b = c.kv_bytes_per_token(dt);
        k.row(vec![
            dt.name().into(),
            thousands(b),
            format!("{:.2}", (b * 1000) as f64 / (1u64 << 20) as f64),
            gib(b * c.max_position_embeddings),
        ]);
    }
    out.push_str(&k.render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        let check = |n: u64, t: &str, s: &str| {
            assert_eq!(thousands(n), t);
            assert_eq!(si(n), s);
        };
        check(0, "0", "0");
        check(999, "999", "999");
        check(260_032, "260,032", "260K");
        check(134_515_008, "134,515,008", "135M");
        check(8_030_261_248, "8,030,261,248", "8.03B");
        check(405_853_388_800, "405,853,388,800", "406B");
    }

    #[test]
    fn table_aligns() {
        let mut t = Table::new(&[("a", Left), ("num", Right)]);
        t.row(vec!["long name".into(), "1".into()]);
        t.row(vec!["x".into(), "12345".into()]);
        assert_eq!(
            t.render(),
            "a            num\n---------  -----\nlong name      1\nx          12345\n"
        );
    }

    fn golden<F: FnOnce()>(f: F) {
        insta::with_settings!({
            snapshot_path => concat!(env!("CARGO_MANIFEST_DIR"), "/../golden"),
            prepend_module_to_snapshot => false,
        }, { f() });
    }

    #[test]
    fn snapshot_list() {
        golden(|| insta::assert_snapshot!("models_list", render_list().unwrap()));
    }

    #[test]
    fn snapshot_show_llama_3_8b() {
        let d = catalog::model("llama-3-8b").unwrap();
        golden(|| insta::assert_snapshot!("models_show_llama-3-8b", render_show(&d)));
    }
}
