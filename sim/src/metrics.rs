//! Latency and utilization accounting, in bounded memory.
//!
//! Per-token and per-request latencies go into [`LogHistogram`]s (log-linear
//! buckets: exact below 1024 ns, then 512 buckets per octave, so a quantile is
//! within 0.2 % of the exact order statistic); means are exact (integer sums).
//! Utilization and batch size go into time-weighted running sums (exact) and a
//! [`Series`] for plots that halves its resolution when it grows past a fixed
//! number of points. Nothing grows with the trace length, so a 10-million-row
//! replay fits in memory.

use serde::Serialize;

const SUB_BITS: u32 = 10;
const HALF: u64 = 1 << (SUB_BITS - 1);

/// A log-linear histogram of non-negative integers (nanoseconds).
#[derive(Debug, Clone, Default)]
pub struct LogHistogram {
    counts: Vec<u64>,
    n: u64,
    sum: u128,
    max: u64,
}

impl LogHistogram {
    #[inline]
    fn index(v: u64) -> usize {
        if v < (1 << SUB_BITS) {
            v as usize
        } else {
            let msb = 63 - v.leading_zeros();
            let shift = msb - (SUB_BITS - 1);
            let top = v >> shift; // in [512, 1024)
            ((1u64 << SUB_BITS) + (shift as u64 - 1) * HALF + (top - HALF)) as usize
        }
    }

    /// Smallest value of bucket `i` and its width.
    fn bucket(i: usize) -> (u64, u64) {
        let i = i as u64;
        if i < (1 << SUB_BITS) {
            (i, 1)
        } else {
            let j = i - (1 << SUB_BITS);
            let shift = j / HALF + 1;
            let top = j % HALF + HALF;
            (top << shift, 1 << shift)
        }
    }

    #[inline]
    pub fn record(&mut self, v: u64) {
        self.record_n(v, 1);
    }

    /// Record `v` `n` times.
    #[inline]
    pub fn record_n(&mut self, v: u64, n: u64) {
        if n == 0 {
            return;
        }
        let i = Self::index(v);
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += n;
        self.n += n;
        self.sum += v as u128 * n as u128;
        self.max = self.max.max(v);
    }

    pub fn count(&self) -> u64 {
        self.n
    }
    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum as f64 / self.n as f64
        }
    }
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Nearest-rank quantile, reported as the midpoint of its bucket (exact
    /// below 1024), capped by the true maximum.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut cum = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            cum += c;
            if cum >= rank {
                let (lo, w) = Self::bucket(i);
                return (lo + (w - 1) / 2).min(self.max);
            }
        }
        self.max
    }

    /// `(value, cumulative fraction)` at each non-empty bucket, for CDF plots.
    pub fn cdf(&self) -> Vec<(u64, f64)> {
        let mut out = Vec::new();
        let mut cum = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 {
                cum += c;
                let (lo, w) = Self::bucket(i);
                out.push(((lo + (w - 1) / 2).min(self.max), cum as f64 / self.n as f64));
            }
        }
        out
    }
}

/// A time series for plots: time-weighted averages over windows that double
/// in width whenever there are more than `cap` of them.
#[derive(Debug, Clone)]
pub struct Series {
    cap: usize,
    width_ns: u64,
    /// (window index, integral of value·dt, integral of dt)
    windows: Vec<(u64, f64, f64)>,
    /// Start (ns) of the last window's span: `windows.last().0 · width_ns`.
    last_lo: u64,
}

impl Series {
    pub fn new(cap: usize, initial_width_ns: u64) -> Self {
        Series {
            cap,
            width_ns: initial_width_ns.max(1),
            windows: Vec::new(),
            last_lo: 0,
        }
    }

    #[inline]
    pub fn record(&mut self, t_ns: u64, dt_ns: u64, value: f64) {
        // steps are short next to a window: skip the division while `t_ns`
        // stays in the last window's span (the same index, so exact)
        let w = match self.windows.last() {
            Some(last) if t_ns >= self.last_lo && t_ns - self.last_lo < self.width_ns => last.0,
            _ => {
                let w = t_ns / self.width_ns;
                self.last_lo = w * self.width_ns;
                w
            }
        };
        let dt = dt_ns as f64;
        match self.windows.last_mut() {
            Some(last) if last.0 == w => {
                last.1 += value * dt;
                last.2 += dt;
            }
            _ => {
                self.windows.push((w, value * dt, dt));
                if self.windows.len() > self.cap {
                    self.coarsen();
                }
            }
        }
    }

    /// [`Self::record`]'s slow twin: the window index by division every time.
    pub fn record_direct(&mut self, t_ns: u64, dt_ns: u64, value: f64) {
        let w = t_ns / self.width_ns;
        self.last_lo = w * self.width_ns;
        let dt = dt_ns as f64;
        match self.windows.last_mut() {
            Some(last) if last.0 == w => {
                last.1 += value * dt;
                last.2 += dt;
            }
            _ => {
                self.windows.push((w, value * dt, dt));
                if self.windows.len() > self.cap {
                    self.coarsen();
                }
            }
        }
    }

    fn coarsen(&mut self) {
        self.width_ns *= 2;
        let mut out: Vec<(u64, f64, f64)> = Vec::with_capacity(self.windows.len() / 2 + 1);
        for &(w, a, d) in &self.windows {
            let w2 = w / 2;
            match out.last_mut() {
                Some(last) if last.0 == w2 => {
                    last.1 += a;
                    last.2 += d;
                }
                _ => out.push((w2, a, d)),
            }
        }
        self.windows = out;
        self.last_lo = self.windows.last().map_or(0, |l| l.0 * self.width_ns);
    }

    /// `(window midpoint in s, average value)`.
    pub fn points(&self) -> Vec<(f64, f64)> {
        self.windows
            .iter()
            .filter(|w| w.2 > 0.0)
            .map(|&(w, a, d)| ((w as f64 + 0.5) * self.width_ns as f64 * 1e-9, a / d))
            .collect()
    }
}

/// Service-level objectives for goodput.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_ms: f64,
    pub tpot_ms: f64,
}

impl Default for Slo {
    fn default() -> Self {
        Slo {
            ttft_ms: 2000.0,
            tpot_ms: 100.0,
        }
    }
}

/// Everything the engine and scheduler count during a replay.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub slo: Slo,
    pub ttft: LogHistogram,
    pub tpot: LogHistogram,
    pub itl: LogHistogram,
    pub e2e: LogHistogram,
    pub queue: LogHistogram,
    pub arrived: u64,
    pub completed: u64,
    pub rejected_longer_than_model: u64,
    pub rejected_longer_than_kv: u64,
    pub within_slo: u64,
    pub tokens_out: u64,
    pub prompt_tokens_done: u64,
    /// Tokens run through the model (prefill chunks, decodes, recomputation, padding).
    pub tokens_computed: u64,
    pub steps: u64,
    pub busy_ns: u64,
    pub last_finish_ns: u64,
    pub preemptions: u64,
    pub swap_out_blocks: u64,
    pub swap_in_blocks: u64,
    pub swap_ns: u64,
    pub max_running: u64,
    pub max_used_blocks: u64,
    /// Time-weighted integrals over busy time: Σ value · step duration.
    pub int_running: f64,
    pub int_used_blocks: f64,
    pub int_waste: f64,
    pub int_tokens_per_step: f64,
    pub prefix_hit_blocks: u64,
    pub prefix_query_blocks: u64,
    pub evictions: u64,
    pub kv_series: Series,
    pub batch_series: Series,
}

impl Metrics {
    pub fn new(slo: Slo) -> Self {
        Metrics {
            slo,
            ttft: LogHistogram::default(),
            tpot: LogHistogram::default(),
            itl: LogHistogram::default(),
            e2e: LogHistogram::default(),
            queue: LogHistogram::default(),
            arrived: 0,
            completed: 0,
            rejected_longer_than_model: 0,
            rejected_longer_than_kv: 0,
            within_slo: 0,
            tokens_out: 0,
            prompt_tokens_done: 0,
            tokens_computed: 0,
            steps: 0,
            busy_ns: 0,
            last_finish_ns: 0,
            preemptions: 0,
            swap_out_blocks: 0,
            swap_in_blocks: 0,
            swap_ns: 0,
            max_running: 0,
            max_used_blocks: 0,
            int_running: 0.0,
            int_used_blocks: 0.0,
            int_waste: 0.0,
            int_tokens_per_step: 0.0,
            prefix_hit_blocks: 0,
            prefix_query_blocks: 0,
            evictions: 0,
            kv_series: Series::new(1000, 100_000_000),
            batch_series: Series::new(1000, 100_000_000),
        }
    }

    #[inline]
    pub fn record_first_token(&mut self, ttft_ns: u64) {
        self.ttft.record(ttft_ns);
    }
    #[inline]
    pub fn record_itl(&mut self, ns: u64) {
        self.itl.record(ns);
    }

    /// A request completed at `now_ns`.
    pub fn record_finish(
        &mut self,
        now_ns: u64,
        e2e_ns: u64,
        _decode_ns: u64,
        tpot_ns: Option<u64>,
        prompt: u32,
        ttft_ns: u64,
    ) {
        self.completed += 1;
        self.e2e.record(e2e_ns);
        if let Some(t) = tpot_ns {
            self.tpot.record(t);
        }
        self.prompt_tokens_done += prompt as u64;
        self.last_finish_ns = self.last_finish_ns.max(now_ns);
        let ok_ttft = ttft_ns as f64 <= self.slo.ttft_ms * 1e6;
        let ok_tpot = tpot_ns.is_none_or(|t| t as f64 <= self.slo.tpot_ms * 1e6);
        if ok_ttft && ok_tpot {
            self.within_slo += 1;
        }
    }

    /// One engine step of `dt_ns` starting at `t_ns`.
    #[inline]
    pub fn record_step(
        &mut self,
        t_ns: u64,
        dt_ns: u64,
        running: u64,
        tokens: u64,
        used_blocks: u64,
        total_blocks: u64,
        waste: f64,
    ) {
        self.steps += 1;
        self.busy_ns += dt_ns;
        self.max_running = self.max_running.max(running);
        self.max_used_blocks = self.max_used_blocks.max(used_blocks);
        let dt = dt_ns as f64;
        self.int_running += running as f64 * dt;
        self.int_used_blocks += used_blocks as f64 * dt;
        self.int_waste += waste * dt;
        self.int_tokens_per_step += tokens as f64;
        self.kv_series
            .record(t_ns, dt_ns, used_blocks as f64 / total_blocks.max(1) as f64);
        self.batch_series.record(t_ns, dt_ns, running as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_record_matches_direct() {
        // Random step lengths from far below to far above the window width,
        // with idle gaps, through many coarsenings: same windows either way.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for cap in [1usize, 2, 7, 50] {
            let (mut fast, mut slow) = (Series::new(cap, 1000), Series::new(cap, 1000));
            let mut t = 0u64;
            for _ in 0..20_000 {
                let dt = match rng.random_range(0..10) {
                    0 => rng.random_range(1..100_000),
                    _ => rng.random_range(1..300),
                };
                if rng.random_range(0..50) == 0 {
                    t += rng.random_range(0..1_000_000); // idle
                }
                let v = rng.random_range(0.0..10.0);
                fast.record(t, dt, v);
                slow.record_direct(t, dt, v);
                t += dt;
            }
            assert_eq!(fast.width_ns, slow.width_ns, "cap {cap}");
            assert_eq!(fast.windows, slow.windows, "cap {cap}");
            assert!(fast.width_ns > 1000, "cap {cap}: coarsened");
        }
    }
}
