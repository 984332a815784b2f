//! Hand-written SVG line charts (no plotting dependency): latency CDFs, KV
//! usage over time and batch size over time. Coordinates are printed with
//! fixed decimals so the files are byte-stable.

use std::fmt::Write;

use crate::metrics::Metrics;

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub series: Vec<(&'a str, Vec<(f64, f64)>)>,
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut v = Vec::new();
    while t <= hi + step * 1e-9 {
        v.push(t);
        t += step;
    }
    v
}

fn fmt_num(x: f64) -> String {
    if x != 0.0 && (x.abs() >= 1e5 || x.abs() < 1e-2) {
        format!("{x:.0e}")
    } else if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

impl Chart<'_> {
    pub fn svg(&self) -> String {
        let (w, h, ml, mr, mt, mb) = (720.0, 440.0, 70.0, 170.0, 40.0, 50.0);
        let tx = |x: f64| if self.log_x { x.max(1e-9).log10() } else { x };
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.1.iter().copied())
            .collect();
        let (mut x0, mut x1, mut y0, mut y1) =
            (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, f64::NEG_INFINITY);
        for &(x, y) in &pts {
            x0 = x0.min(tx(x));
            x1 = x1.max(tx(x));
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if !x0.is_finite() {
            (x0, x1, y1) = (0.0, 1.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        if y1 <= y0 {
            y1 = y0 + 1.0;
        }
        let pw = w - ml - mr;
        let ph = h - mt - mb;
        let sx = |x: f64| ml + (tx(x) - x0) / (x1 - x0) * pw;
        let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            ml + pw / 2.0,
            self.title
        );
        let _ = writeln!(
            s,
            r#"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        for t in nice_ticks(y0, y1, 5) {
            let y = sy(t);
            let _ = writeln!(
                s,
                r##"<line x1="{ml}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                ml + pw,
                ml - 5.0,
                y + 4.0,
                fmt_num(t)
            );
        }
        for t in nice_ticks(x0, x1, 6) {
            let x = ml + (t - x0) / (x1 - x0) * pw;
            let label = if self.log_x {
                fmt_num(10f64.powf(t))
            } else {
                fmt_num(t)
            };
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{mt}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
                mt + ph,
                mt + ph + 16.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            ml + pw / 2.0,
            h - 10.0,
            self.x_label
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            mt + ph / 2.0,
            mt + ph / 2.0,
            self.y_label
        );
        for (i, (name, data)) in self.series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let mut d = String::new();
            for (j, &(x, y)) in data.iter().enumerate() {
                let _ = write!(
                    d,
                    "{}{:.1},{:.1}",
                    if j == 0 { "M" } else { " L" },
                    sx(x),
                    sy(y)
                );
            }
            let _ = writeln!(
                s,
                r#"<path d="{d}" fill="none" stroke="{c}" stroke-width="1.6"/>"#
            );
            let ly = mt + 14.0 + 18.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
                ml + pw + 10.0,
                ml + pw + 30.0,
                ml + pw + 35.0,
                ly + 4.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// Thin a point list to at most `n` points (keeps the first and last).
fn thin(v: Vec<(f64, f64)>, n: usize) -> Vec<(f64, f64)> {
    if v.len() <= n {
        return v;
    }
    let step = v.len().div_ceil(n);
    let last = *v.last().unwrap();
    let mut out: Vec<_> = v.into_iter().step_by(step).collect();
    if out.last() != Some(&last) {
        out.push(last);
    }
    out
}

/// The three standard plots: `(file name, svg)`.
pub fn standard_plots(m: &Metrics) -> Vec<(&'static str, String)> {
    let cdf = |h: &crate::metrics::LogHistogram| {
        thin(
            h.cdf()
                .into_iter()
                .map(|(v, p)| (v as f64 * 1e-6, p))
                .collect(),
            400,
        )
    };
    let lat = Chart {
        title: "Latency CDFs",
        x_label: "latency (ms, log scale)",
        y_label: "fraction of requests / tokens",
        log_x: true,
        series: vec![
            ("TTFT", cdf(&m.ttft)),
            ("TPOT", cdf(&m.tpot)),
            ("ITL", cdf(&m.itl)),
            ("E2E", cdf(&m.e2e)),
        ],
    };
    let kv = Chart {
        title: "KV cache usage over time",
        x_label: "time (s)",
        y_label: "fraction of KV blocks in use",
        log_x: false,
        series: vec![("KV used", m.kv_series.points())],
    };
    let batch = Chart {
        title: "Batch size over time",
        x_label: "time (s)",
        y_label: "requests in the step",
        log_x: false,
        series: vec![("running", m.batch_series.points())],
    };
    vec![
        ("latency_cdf.svg", lat.svg()),
        ("kv_usage.svg", kv.svg()),
        ("batch_size.svg", batch.svg()),
    ]
}
