//! The roofline view of one step: the cost model's operators with their
//! FLOPs, bytes, arithmetic intensity, time and bound, as a table and as a
//! hand-written SVG chart (log-log axes, memory and compute roofs, the ridge,
//! one labelled point per operator).
//!
//! ```text
//!   FLOP/s ▲            peak ───────────────────
//!          │           ╱ ridge = peak / bandwidth
//!          │         ╱   · mlp_down (prefill)
//!          │       ╱ bandwidth × intensity
//!          │  · qkv_proj (decode)
//!          └──────────────────────────────────▶ FLOP / byte
//! ```
//! Points sit on the *effective* roofs (peak × compute_efficiency, bandwidth ×
//! memory_efficiency), drawn dashed under the datasheet roofs. Operators with
//! no FLOPs (embedding gather) or no bytes on HBM (all-reduce) stay in the
//! table but not on the chart.

use std::fmt::Write as _;

use serde::Serialize;

use crate::cost::{Bound, CostModel, OpCost};
use crate::plan::{SeqWork, StepCostModel, StepPlan};
use crate::{Error, Result};

/// Which kind of step the roofline describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Phase {
    /// `batch` sequences each decoding one token after `context` cached tokens.
    Decode,
    /// `batch` prompts of `context` tokens each, from an empty cache.
    Prefill,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Decode => "decode",
            Phase::Prefill => "prefill",
        }
    }
}

impl std::str::FromStr for Phase {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "decode" => Ok(Phase::Decode),
            "prefill" => Ok(Phase::Prefill),
            _ => Err(Error::invalid(
                "phase",
                format!("`{s}` (known: decode, prefill)"),
            )),
        }
    }
}

/// The step a roofline describes.
pub fn roofline_plan(phase: Phase, batch: u64, context: u64) -> Result<StepPlan> {
    if batch == 0 {
        return Err(Error::invalid("batch", "must be at least 1"));
    }
    if batch > 1 << 20 {
        return Err(Error::invalid(
            "batch",
            format!("{batch} is more than 2^20 sequences"),
        ));
    }
    let seq = match phase {
        Phase::Decode => SeqWork {
            new_tokens: 1,
            cached: context,
        },
        Phase::Prefill => {
            if context == 0 {
                return Err(Error::invalid(
                    "context",
                    "a prefill needs at least 1 token",
                ));
            }
            SeqWork {
                new_tokens: context,
                cached: 0,
            }
        }
    };
    let seqs = vec![seq; batch as usize];
    Ok(match phase {
        Phase::Decode => StepPlan {
            prefills: Vec::new(),
            decodes: seqs,
        },
        Phase::Prefill => StepPlan {
            prefills: seqs,
            decodes: Vec::new(),
        },
    })
}

/// A step's operators with the roofs they are measured against.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Roofline {
    pub title: String,
    pub hardware: String,
    /// Datasheet peak of the compute dtype, FLOP/s.
    pub peak_flops: f64,
    /// Datasheet memory bandwidth, bytes/s.
    pub bandwidth: f64,
    pub compute_efficiency: f64,
    pub memory_efficiency: f64,
    pub ops: Vec<OpCost>,
    /// The step's total time (rounded ns, launches and overheads included).
    pub step_ns: u64,
    pub launch_overhead_ns: u64,
}

impl Roofline {
    /// Intensity (FLOP/byte) where the datasheet roofs meet.
    pub fn ridge(&self) -> f64 {
        self.peak_flops / self.bandwidth
    }
}

/// Analyze one step with `cm`.
pub fn analyze(cm: &CostModel, plan: &StepPlan, title: impl Into<String>) -> Roofline {
    let cost = cm.step_cost(plan);
    Roofline {
        title: title.into(),
        hardware: cm.hardware().name.clone(),
        peak_flops: cm.peak_flops(),
        bandwidth: cm.hardware().memory_bandwidth,
        compute_efficiency: cm.options().compute_efficiency,
        memory_efficiency: cm.options().memory_efficiency,
        ops: cm.operators(plan),
        step_ns: cost.total_ns(),
        launch_overhead_ns: cost.launch_overhead_ns,
    }
}

/// The per-operator table (fixed-width text, deterministic).
pub fn render_table(r: &Roofline) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", r.title);
    let _ = writeln!(
        s,
        "{}: peak {:.1} TFLOP/s x {:.2}, bandwidth {:.0} GB/s x {:.2}, ridge {:.1} FLOP/B",
        r.hardware,
        r.peak_flops / 1e12,
        r.compute_efficiency,
        r.bandwidth / 1e9,
        r.memory_efficiency,
        r.ridge()
    );
    let _ = writeln!(
        s,
        "{:<14} {:>12} {:>12} {:>10} {:>11} {:>7} {:>6}  {}",
        "operator", "GFLOP", "MB", "FLOP/B", "time us", "kernels", "share", "bound"
    );
    let total: f64 = r.ops.iter().map(|o| o.time_ns).sum();
    for o in &r.ops {
        let _ = writeln!(
            s,
            "{:<14} {:>12.3} {:>12.3} {:>10.2} {:>11.2} {:>7} {:>5.1}%  {}",
            o.name,
            (o.flops + o.aux_ops) / 1e9,
            o.bytes / 1e6,
            o.intensity(),
            o.time_ns / 1e3,
            o.kernels,
            if total > 0.0 {
                100.0 * o.time_ns / total
            } else {
                0.0
            },
            o.bound.name()
        );
    }
    let _ = writeln!(
        s,
        "{:<14} {:>12.3} {:>12.3} {:>10} {:>11.2}",
        "operators",
        r.ops.iter().map(|o| o.flops + o.aux_ops).sum::<f64>() / 1e9,
        r.ops.iter().map(|o| o.bytes).sum::<f64>() / 1e6,
        "",
        total / 1e3
    );
    let _ = writeln!(
        s,
        "{:<14} {:>49.2}",
        "launches",
        r.launch_overhead_ns as f64 / 1e3
    );
    let _ = writeln!(s, "{:<14} {:>49.2}", "step", r.step_ns as f64 / 1e3);
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The roofline chart as a standalone SVG document.
pub fn render_svg(r: &Roofline) -> String {
    const W: f64 = 760.0;
    const H: f64 = 500.0;
    const L: f64 = 80.0; // left margin
    const R: f64 = 170.0; // right margin (legend)
    const T: f64 = 50.0;
    const B: f64 = 60.0;
    let pts: Vec<(&OpCost, f64, f64)> = r
        .ops
        .iter()
        .filter(|o| {
            o.bound != Bound::Network
                && o.flops + o.aux_ops > 0.0
                && o.bytes > 0.0
                && o.time_ns > 0.0
        })
        .map(|o| (o, o.intensity(), (o.flops + o.aux_ops) / (o.time_ns * 1e-9)))
        .collect();
    let ridge = r.ridge();
    let lo_x = pts
        .iter()
        .map(|p| p.1)
        .fold(ridge / 100.0, f64::min)
        .log10()
        .floor();
    let hi_x = pts
        .iter()
        .map(|p| p.1)
        .fold(ridge * 10.0, f64::max)
        .log10()
        .ceil();
    let hi_y = r.peak_flops.log10().ceil();
    let lo_y = pts
        .iter()
        .map(|p| p.2)
        .fold(r.bandwidth * 10f64.powf(lo_x), f64::min)
        .log10()
        .floor();
    let px = |x: f64| L + (x.log10() - lo_x) / (hi_x - lo_x) * (W - L - R);
    let py = |y: f64| H - B - (y.log10() - lo_y) / (hi_y - lo_y) * (H - T - B);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="24" font-size="14" text-anchor="middle">{}</text>"#,
        (W - R + L) / 2.0,
        xml_escape(&r.title)
    );
    // Grid and axis labels at each decade.
    for e in lo_x as i64..=hi_x as i64 {
        let x = px(10f64.powi(e as i32));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">1e{e}</text>"##,
            H - B,
            H - B + 16.0
        );
    }
    for e in lo_y as i64..=hi_y as i64 {
        let y = py(10f64.powi(e as i32));
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">1e{e}</text>"##,
            W - R,
            L - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{L}" y="{T}" width="{:.1}" height="{:.1}" fill="none" stroke="black"/>"#,
        W - L - R,
        H - T - B
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">arithmetic intensity (FLOP/byte)</text>"#,
        (W - R + L) / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">FLOP/s</text>"#,
        (H - B + T) / 2.0
    );
    // Roofs: datasheet solid, effective dashed.
    let x0 = 10f64.powf(lo_x);
    let x1 = 10f64.powf(hi_x);
    for (peak, bw, style) in [
        (r.peak_flops, r.bandwidth, ""),
        (
            r.peak_flops * r.compute_efficiency,
            r.bandwidth * r.memory_efficiency,
            r#" stroke-dasharray="6 4""#,
        ),
    ] {
        let knee = peak / bw;
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f4e9c" stroke-width="2"{style} points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}"/>"##,
            px(x0),
            py((x0 * bw).max(10f64.powf(lo_y))),
            px(knee),
            py(peak),
            px(x1),
            py(peak)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{:.1}" y1="{T}" x2="{:.1}" y2="{:.1}" stroke="#999" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}" fill="#555">ridge {:.0} FLOP/B</text>"##,
        px(ridge),
        px(ridge),
        H - B,
        px(ridge) + 4.0,
        T + 14.0,
        ridge
    );
    // One point per operator, labelled; legend on the right.
    // Points are numbered (operators of equal intensity overlap); the legend
    // names them.
    let color = |b: Bound| match b {
        Bound::Compute => "#c0392b",
        _ => "#27ae60",
    };
    for (i, (o, x, y)) in pts.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            px(*x),
            py(*y),
            color(o.bound),
            px(*x) + 5.0 + (i % 4) as f64 * 9.0,
            py(*y) - 6.0,
            i + 1
        );
    }
    let lx = W - R + 12.0;
    let mut legend = vec![
        ("#1f4e9c", "datasheet roof (solid)".to_string()),
        ("#1f4e9c", "effective roof (dashed)".to_string()),
        ("#c0392b", "compute-bound".to_string()),
        ("#27ae60", "memory-bound".to_string()),
        ("#fff", format!("step {:.1} us", r.step_ns as f64 / 1e3)),
    ];
    for (i, (o, _, _)) in pts.iter().enumerate() {
        legend.push((color(o.bound), format!("{} {}", i + 1, o.name)));
    }
    for (i, (c, text)) in legend.iter().enumerate() {
        let y = T + 16.0 * i as f64 + 10.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{c}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            y - 9.0,
            lx + 14.0,
            y,
            xml_escape(text)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::CostOptions;
    use crate::test_models::*;

    #[test]
    fn roofline_hardware_catalog_loads_and_is_sane() {
        let all = inferlab_models::catalog::hardware().unwrap();
        let names: Vec<&str> = all.iter().map(|h| h.name.as_str()).collect();
        for want in [
            "A100-SXM4-40GB",
            "A100-SXM4-80GB",
            "H100-PCIe-80GB",
            "H100-SXM5-80GB",
            "H200-SXM-141GB",
            "L40S",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for h in &all {
            let p = &h.peak_flops;
            // Memory between 16 GiB and 256 GiB; bandwidth 0.5-10 TB/s.
            assert!(
                (16u64 << 30..=256u64 << 30).contains(&h.memory_bytes),
                "{}",
                h.name
            );
            assert!((5e11..1e13).contains(&h.memory_bandwidth), "{}", h.name);
            // Every GPU computes far more than it reads: ridge > 10 FLOP/B.
            assert!(p.bf16 / h.memory_bandwidth > 10.0, "{}", h.name);
            // Tensor-core ordering: fp32 ≤ tf32 < bf16 = fp16 < int8 (= fp8 where present).
            assert!(p.fp32 <= p.tf32 && p.tf32 < p.bf16, "{}", h.name);
            assert_eq!(p.bf16, p.fp16, "{}", h.name);
            if let Some(f8) = p.fp8 {
                assert_eq!(f8, p.int8, "{}", h.name);
            }
            // Each step down in width doubles the rate. Datasheets round to the
            // TFLOP (H100 PCIe: TF32 756/2 = 378 vs BF16 1513/2 = 756.5) and the
            // L40S sheet lists BF16 dense as 362.05 beside 733 sparse (1.2%),
            // hence 2%.
            let near = |a: f64, b: f64| (a / b - 1.0).abs() < 0.02;
            assert!(near(p.int8, 2.0 * p.bf16), "{}", h.name);
            assert!(near(p.tf32 * 2.0, p.bf16), "{}", h.name);
            assert!(h.sm_count >= 100 && h.sm_count <= 160, "{}", h.name);
            assert!(
                (32u64 << 20..=128u64 << 20).contains(&h.l2_bytes),
                "{}",
                h.name
            );
            assert!(
                h.pcie_bandwidth > 0.0 && h.nvlink_bandwidth >= 0.0,
                "{}",
                h.name
            );
            assert!(h.nvlink_bandwidth == 0.0 || h.nvlink_bandwidth > h.pcie_bandwidth);
            // The driver reports a little less than the datasheet capacity
            // (ECC and reserved memory): within 5%.
            let usable = h.usable_memory_bytes();
            assert!(
                usable <= h.memory_bytes && usable as f64 > 0.95 * h.memory_bytes as f64,
                "{}",
                h.name
            );
        }
    }

    #[test]
    fn roofline_plan_shapes_and_errors() {
        let p = roofline_plan(Phase::Decode, 3, 100).unwrap();
        assert_eq!((p.decodes.len(), p.num_tokens()), (3, 3));
        let p = roofline_plan(Phase::Prefill, 2, 100).unwrap();
        assert_eq!((p.prefills.len(), p.num_tokens()), (2, 200));
        assert!(roofline_plan(Phase::Decode, 0, 1).is_err());
        assert!(roofline_plan(Phase::Prefill, 1, 0).is_err());
        assert!("sideways".parse::<Phase>().is_err());
    }

    #[test]
    fn roofline_svg_is_well_formed_and_labels_every_point() {
        let cm =
            CostModel::new(&llama3_8b(), &gpu("H100-SXM5-80GB"), CostOptions::default()).unwrap();
        let plan = roofline_plan(Phase::Decode, 8, 1024).unwrap();
        let r = analyze(&cm, &plan, "llama <3> & co");
        let svg = render_svg(&r);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("llama &lt;3&gt; &amp; co"));
        let plotted = r
            .ops
            .iter()
            .filter(|o| o.flops > 0.0 && o.bound != Bound::Network)
            .count();
        assert_eq!(svg.matches("<circle").count(), plotted);
        for o in r.ops.iter().filter(|o| o.flops > 0.0) {
            assert!(svg.contains(&format!(" {}</text>", o.name)), "{}", o.name);
        }
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Same inputs, same bytes.
        assert_eq!(svg, render_svg(&analyze(&cm, &plan, "llama <3> & co")));
    }
}
