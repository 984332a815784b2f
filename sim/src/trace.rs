//! Request traces: one [`Request`] per row, read lazily.
//!
//! A trace is a stream of requests sorted by arrival. Readers are iterators
//! (`Iterator<Item = Result<Request>>`), so the engine pulls arrivals one at a
//! time and a 10-million-row trace replays in memory bounded by the number of
//! requests in flight, not by the file.
//!
//! ## Formats
//! *CSV* (any extension but `.jsonl`/`.json`), a header row, columns matched
//! case-insensitively, unknown columns ignored:
//!
//! | meaning            | accepted column names                              |
//! |--------------------|----------------------------------------------------|
//! | arrival            | `arrival_ns` (integer ns), `arrival_s` (float s), `TIMESTAMP` (wall clock `YYYY-MM-DD HH:MM:SS.fffffff`, made relative to the first row) |
//! | prompt tokens      | `prompt_tokens`, `ContextTokens`, `input_tokens`   |
//! | output tokens      | `output_tokens`, `GeneratedTokens`                 |
//! | shared-prefix id   | `prefix_id`, `session_id` (optional)               |
//! | shared-prefix len  | `prefix_tokens` (optional; default: whole prompt)  |
//!
//! The Azure LLM inference traces (`TIMESTAMP,ContextTokens,GeneratedTokens`)
//! read as they are. *JSONL*: one object per line with the same keys.
//!
//! ## Prefixes
//! Requests carrying the same `prefix_id` have identical tokens in their first
//! `prefix_tokens` positions (a system prompt, or the earlier turns of a
//! conversation); the prefix cache can hit on them. Token ids themselves are
//! synthetic ([`SyntheticTokens`]): traces carry lengths, not text.
//!
//! ## Bad input and ordering policy
//! A malformed row is an error naming the file, the line (1-based, header is
//! line 1) and the field. Negative arrivals are always an error. Arrivals that
//! decrease are an error by default ([`Unsorted::Reject`]); with
//! [`Unsorted::Sort`] the whole trace is read and stably sorted in memory (so
//! that mode is not streaming), and wall-clock traces are re-based on the
//! earliest row.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Row index in the source (0-based), kept through sorting.
    pub id: u64,
    /// Arrival, integer nanoseconds from the trace's origin.
    pub arrival_ns: u64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    /// Requests with the same id share their first `prefix_tokens` tokens.
    pub prefix_id: Option<u64>,
    pub prefix_tokens: u32,
}

/// What to do when arrival times decrease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Unsorted {
    /// Error naming the first out-of-order line (default; keeps streaming).
    #[default]
    Reject,
    /// Read everything, sort stably by arrival (not streaming).
    Sort,
}

impl std::str::FromStr for Unsorted {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reject" => Ok(Unsorted::Reject),
            "sort" => Ok(Unsorted::Sort),
            _ => Err(format!("unknown policy `{s}` (known: reject, sort)")),
        }
    }
}

/// Synthetic token ids for a request: position `i` of a shared prefix is a
/// function of `(prefix_id, i)`, any other position of `(request id, i)`.
/// This is what the prefix cache hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticTokens {
    pub prefix_key: u64,
    pub prefix_len: u64,
    pub own_key: u64,
}

impl SyntheticTokens {
    pub fn of(r: &Request) -> Self {
        match r.prefix_id {
            Some(p) => SyntheticTokens {
                prefix_key: p ^ 0x5eed_0000_0000_0000,
                prefix_len: r.prefix_tokens as u64,
                own_key: r.id,
            },
            None => SyntheticTokens {
                prefix_key: 0,
                prefix_len: 0,
                own_key: r.id,
            },
        }
    }
}

/// A token-id sequence that the block manager can hash without materializing.
pub trait TokenSeq {
    fn token(&self, pos: u64) -> u32;
}

impl TokenSeq for SyntheticTokens {
    #[inline]
    fn token(&self, pos: u64) -> u32 {
        let (key, salt) = if pos < self.prefix_len {
            (self.prefix_key, 0x9e37_79b9_7f4a_7c15)
        } else {
            (self.own_key, 0xd1b5_4a32_d192_ed03)
        };
        (crate::block_manager::mix64(key ^ salt, pos) >> 32) as u32
    }
}

impl TokenSeq for [u32] {
    fn token(&self, pos: u64) -> u32 {
        self[pos as usize]
    }
}

impl TokenSeq for Vec<u32> {
    fn token(&self, pos: u64) -> u32 {
        self[pos as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeCol {
    Ns,
    Seconds,
    WallClock,
}

#[derive(Debug, Clone, Copy)]
struct Columns {
    time: (usize, TimeCol),
    prompt: usize,
    output: usize,
    prefix_id: Option<usize>,
    prefix_tokens: Option<usize>,
}

fn find_col(headers: &[String], names: &[&str]) -> Option<usize> {
    headers
        .iter()
        .position(|h| names.iter().any(|n| h.trim().eq_ignore_ascii_case(n)))
}

fn columns(path: &Path, headers: &[String]) -> Result<Columns> {
    let fmt = |reason: String| Error::TraceFormat {
        path: path.to_path_buf(),
        reason,
    };
    let time = if let Some(i) = find_col(headers, &["arrival_ns"]) {
        (i, TimeCol::Ns)
    } else if let Some(i) = find_col(headers, &["arrival_s", "arrival", "timestamp_s"]) {
        (i, TimeCol::Seconds)
    } else if let Some(i) = find_col(headers, &["TIMESTAMP"]) {
        (i, TimeCol::WallClock)
    } else {
        return Err(fmt(format!(
            "no arrival column (want one of arrival_ns, arrival_s, TIMESTAMP; header is {headers:?})"
        )));
    };
    let prompt = find_col(headers, &["prompt_tokens", "ContextTokens", "input_tokens"])
        .ok_or_else(|| {
            fmt(format!(
                "no prompt-length column (prompt_tokens or ContextTokens; header is {headers:?})"
            ))
        })?;
    let output = find_col(headers, &["output_tokens", "GeneratedTokens"]).ok_or_else(|| {
        fmt(format!(
            "no output-length column (output_tokens or GeneratedTokens; header is {headers:?})"
        ))
    })?;
    Ok(Columns {
        time,
        prompt,
        output,
        prefix_id: find_col(headers, &["prefix_id", "session_id"]),
        prefix_tokens: find_col(headers, &["prefix_tokens"]),
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `YYYY-MM-DD HH:MM:SS[.f{1,9}]` (or with `T`) to ns since the Unix epoch.
pub fn parse_wall_clock(s: &str) -> Result<i128, String> {
    let s = s.trim();
    let bad = || format!("`{s}` is not a wall-clock time YYYY-MM-DD HH:MM:SS[.fffffff]");
    let (date, time) = s
        .split_once(' ')
        .or_else(|| s.split_once('T'))
        .ok_or_else(bad)?;
    let mut dp = date.split('-');
    let num = |x: Option<&str>| -> Result<i64, String> {
        let x = x.ok_or_else(bad)?;
        if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        x.parse::<i64>().map_err(|_| bad())
    };
    let (y, mo, d) = (num(dp.next())?, num(dp.next())?, num(dp.next())?);
    if dp.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let (hms, frac) = match time.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (time, None),
    };
    let mut tp = hms.split(':');
    let (h, mi, se) = (num(tp.next())?, num(tp.next())?, num(tp.next())?);
    if tp.next().is_some() || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let mut ns: i128 = 0;
    if let Some(f) = frac {
        if f.is_empty() || f.len() > 9 || !f.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        ns = f.parse::<i128>().map_err(|_| bad())? * 10i128.pow(9 - f.len() as u32);
    }
    let secs = days_from_civil(y, mo, d) as i128 * 86400 + (h * 3600 + mi * 60 + se) as i128;
    Ok(secs * 1_000_000_000 + ns)
}

/// Seconds (decimal text) to integer ns, rounded to nearest; rejects NaN/inf.
fn parse_seconds(s: &str) -> Result<i128, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !v.is_finite() {
        return Err(format!("`{s}` is not a finite number of seconds"));
    }
    if v.abs() > 1e10 {
        return Err(format!("`{s}` seconds is out of range"));
    }
    Ok((v * 1e9).round() as i128)
}

/// The raw fields of one row before validation.
struct RawRow<'a> {
    time: Option<&'a str>,
    time_ns_int: Option<i128>,
    prompt: Option<u64>,
    output: Option<u64>,
    prefix_id: Option<u64>,
    prefix_tokens: Option<u64>,
}

/// Shared state of both readers: origin for wall clocks, order checks.
struct RowChecker {
    path: PathBuf,
    origin_ns: Option<i128>,
    previous_ns: i128,
    policy: Unsorted,
    next_id: u64,
    /// The last row's arrival before clamping (for re-basing when sorting).
    last_raw_ns: i128,
    wall_clock: bool,
}

impl RowChecker {
    fn row_err(&self, line: u64, field: &str, reason: impl Into<String>) -> Error {
        Error::TraceRow {
            path: self.path.clone(),
            line,
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn count(&self, line: u64, field: &str, v: Option<&str>) -> Result<u64> {
        let v = v
            .ok_or_else(|| self.row_err(line, field, "missing"))?
            .trim();
        v.parse::<u64>()
            .map_err(|_| self.row_err(line, field, format!("`{v}` is not a non-negative integer")))
    }

    /// `time_kind` decides how `raw.time` is read; produces the request.
    fn finish(&mut self, line: u64, time_kind: TimeCol, raw: RawRow<'_>) -> Result<Request> {
        let t: i128 = match (raw.time_ns_int, time_kind) {
            (Some(t), _) => t,
            (None, kind) => {
                let s = raw
                    .time
                    .ok_or_else(|| self.row_err(line, "arrival", "missing"))?;
                match kind {
                    TimeCol::Ns => s.trim().parse::<i128>().map_err(|_| {
                        self.row_err(line, "arrival_ns", format!("`{s}` is not an integer"))
                    })?,
                    TimeCol::Seconds => {
                        parse_seconds(s).map_err(|e| self.row_err(line, "arrival_s", e))?
                    }
                    TimeCol::WallClock => {
                        let abs =
                            parse_wall_clock(s).map_err(|e| self.row_err(line, "TIMESTAMP", e))?;
                        let origin = *self.origin_ns.get_or_insert(abs);
                        abs - origin
                    }
                }
            }
        };
        if t < 0 && time_kind != TimeCol::WallClock {
            return Err(self.row_err(line, "arrival", format!("negative arrival {t} ns")));
        }
        if t < self.previous_ns && self.policy == Unsorted::Reject {
            return Err(Error::Unsorted {
                path: self.path.clone(),
                line,
                arrival_ns: t,
                previous_ns: self.previous_ns,
            });
        }
        self.previous_ns = self.previous_ns.max(t);
        let prompt = raw
            .prompt
            .ok_or_else(|| self.row_err(line, "prompt_tokens", "missing"))?;
        let output = raw
            .output
            .ok_or_else(|| self.row_err(line, "output_tokens", "missing"))?;
        if prompt == 0 || prompt > u32::MAX as u64 {
            return Err(self.row_err(
                line,
                "prompt_tokens",
                format!("{prompt} is not in 1..=2^32-1"),
            ));
        }
        if output == 0 || output > u32::MAX as u64 {
            return Err(self.row_err(
                line,
                "output_tokens",
                format!("{output} is not in 1..=2^32-1"),
            ));
        }
        let prefix_tokens = match (raw.prefix_id, raw.prefix_tokens) {
            (_, Some(p)) if p > prompt => {
                return Err(self.row_err(
                    line,
                    "prefix_tokens",
                    format!("{p} is longer than the prompt ({prompt})"),
                ))
            }
            (Some(_), Some(p)) => p as u32,
            (Some(_), None) => prompt as u32,
            (None, _) => 0,
        };
        let id = self.next_id;
        self.next_id += 1;
        self.last_raw_ns = t;
        self.wall_clock = time_kind == TimeCol::WallClock;
        Ok(Request {
            id,
            // Wall-clock rows earlier than the first one are negative here;
            // only the Sort policy lets them through, and it re-bases them.
            arrival_ns: t.max(0) as u64,
            prompt_tokens: prompt as u32,
            output_tokens: output as u32,
            prefix_id: raw.prefix_id,
            prefix_tokens,
        })
    }
}

/// Streaming CSV reader.
pub struct CsvTrace {
    rdr: csv::Reader<BufReader<File>>,
    cols: Columns,
    record: csv::StringRecord,
    check: RowChecker,
    done: bool,
}

impl Iterator for CsvTrace {
    type Item = Result<Request>;
    fn next(&mut self) -> Option<Result<Request>> {
        if self.done {
            return None;
        }
        let r = self.next_row();
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }
}

impl CsvTrace {
    fn next_row(&mut self) -> Option<Result<Request>> {
        match self.rdr.read_record(&mut self.record) {
            Ok(false) => None,
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                Some(Err(self.check.row_err(line, "row", e.to_string())))
            }
            Ok(true) => {
                let line = self.record.position().map(|p| p.line()).unwrap_or(0);
                let c = self.cols;
                let rec = &self.record;
                let get = |i: usize| rec.get(i);
                let parsed = (|| {
                    let prompt = self.check.count(line, "prompt_tokens", get(c.prompt))?;
                    let output = self.check.count(line, "output_tokens", get(c.output))?;
                    let opt = |i: Option<usize>, name: &str| -> Result<Option<u64>> {
                        match i.and_then(get) {
                            None => Ok(None),
                            Some(s) if s.trim().is_empty() => Ok(None),
                            Some(s) => self.check.count(line, name, Some(s)).map(Some),
                        }
                    };
                    let prefix_id = opt(c.prefix_id, "prefix_id")?;
                    let prefix_tokens = opt(c.prefix_tokens, "prefix_tokens")?;
                    Ok::<_, Error>((prompt, output, prefix_id, prefix_tokens))
                })();
                let (prompt, output, prefix_id, prefix_tokens) = match parsed {
                    Ok(v) => v,
                    Err(e) => return Some(Err(e)),
                };
                let time = get(c.time.0).map(|s| s.to_string());
                Some(self.check.finish(
                    line,
                    c.time.1,
                    RawRow {
                        time: time.as_deref(),
                        time_ns_int: None,
                        prompt: Some(prompt),
                        output: Some(output),
                        prefix_id,
                        prefix_tokens,
                    },
                ))
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    arrival_ns: Option<i64>,
    #[serde(alias = "arrival")]
    arrival_s: Option<f64>,
    #[serde(alias = "TIMESTAMP")]
    timestamp: Option<String>,
    #[serde(alias = "ContextTokens", alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(alias = "GeneratedTokens")]
    output_tokens: Option<u64>,
    #[serde(alias = "session_id")]
    prefix_id: Option<u64>,
    prefix_tokens: Option<u64>,
}

/// Streaming JSONL reader (one object per line; blank lines skipped).
pub struct JsonlTrace {
    lines: std::io::Lines<BufReader<File>>,
    line: u64,
    check: RowChecker,
    done: bool,
}

impl Iterator for JsonlTrace {
    type Item = Result<Request>;
    fn next(&mut self) -> Option<Result<Request>> {
        if self.done {
            return None;
        }
        let r = self.next_row();
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }
}

impl JsonlTrace {
    fn next_row(&mut self) -> Option<Result<Request>> {
        loop {
            let text = match self.lines.next()? {
                Ok(t) => t,
                Err(source) => {
                    return Some(Err(Error::Io {
                        path: self.check.path.clone(),
                        source,
                    }))
                }
            };
            self.line += 1;
            if text.trim().is_empty() {
                continue;
            }
            let line = self.line;
            let row: JsonRow = match serde_json::from_str(&text) {
                Ok(r) => r,
                Err(e) => return Some(Err(self.check.row_err(line, "json", e.to_string()))),
            };
            let (kind, int, s) = if let Some(ns) = row.arrival_ns {
                (TimeCol::Ns, Some(ns as i128), None)
            } else if let Some(sec) = row.arrival_s {
                match parse_seconds(&sec.to_string()) {
                    Ok(ns) => (TimeCol::Seconds, Some(ns), None),
                    Err(e) => return Some(Err(self.check.row_err(line, "arrival_s", e))),
                }
            } else if let Some(ts) = row.timestamp.clone() {
                (TimeCol::WallClock, None, Some(ts))
            } else {
                return Some(Err(self.check.row_err(
                    line,
                    "arrival",
                    "missing (want arrival_ns, arrival_s or TIMESTAMP)",
                )));
            };
            return Some(self.check.finish(
                line,
                kind,
                RawRow {
                    time: s.as_deref(),
                    time_ns_int: int,
                    prompt: row.prompt_tokens,
                    output: row.output_tokens,
                    prefix_id: row.prefix_id,
                    prefix_tokens: row.prefix_tokens,
                },
            ));
        }
    }
}

/// A trace being read: streaming CSV or JSONL, or a sorted in-memory copy.
pub enum TraceIter {
    Csv(Box<CsvTrace>),
    Jsonl(JsonlTrace),
    Sorted(std::vec::IntoIter<Request>),
}

impl Iterator for TraceIter {
    type Item = Result<Request>;
    fn next(&mut self) -> Option<Result<Request>> {
        match self {
            TraceIter::Csv(t) => t.next(),
            TraceIter::Jsonl(t) => t.next(),
            TraceIter::Sorted(t) => t.next().map(Ok),
        }
    }
}

/// Open a trace file; see the module doc for formats and the ordering policy.
pub fn open(path: &Path, policy: Unsorted) -> Result<TraceIter> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let check = RowChecker {
        path: path.to_path_buf(),
        origin_ns: None,
        previous_ns: i128::MIN,
        policy,
        next_id: 0,
        last_raw_ns: 0,
        wall_clock: false,
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let streaming = if ext == "jsonl" || ext == "json" {
        TraceIter::Jsonl(JsonlTrace {
            lines: BufReader::new(file).lines(),
            line: 0,
            check,
            done: false,
        })
    } else {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(BufReader::with_capacity(1 << 16, file));
        let headers: Vec<String> = rdr
            .headers()
            .map_err(|e| Error::TraceFormat {
                path: path.to_path_buf(),
                reason: format!("cannot read the header: {e}"),
            })?
            .iter()
            .map(|s| s.to_string())
            .collect();
        let cols = columns(path, &headers)?;
        TraceIter::Csv(Box::new(CsvTrace {
            rdr,
            cols,
            record: csv::StringRecord::new(),
            check,
            done: false,
        }))
    };
    match policy {
        Unsorted::Reject => Ok(streaming),
        Unsorted::Sort => {
            let mut it = streaming;
            let mut all = Vec::new();
            while let Some(r) = it.next() {
                let r = r?;
                let (raw, wall) = match &it {
                    TraceIter::Csv(c) => (c.check.last_raw_ns, c.check.wall_clock),
                    TraceIter::Jsonl(j) => (j.check.last_raw_ns, j.check.wall_clock),
                    TraceIter::Sorted(_) => unreachable!("streaming readers only"),
                };
                all.push((raw, wall, r));
            }
            // wall clocks are relative to the earliest row once sorted
            let min = all.iter().map(|x| x.0).min().unwrap_or(0);
            let mut all: Vec<Request> = all
                .into_iter()
                .map(|(raw, wall, mut r)| {
                    r.arrival_ns = if wall { (raw - min) as u64 } else { raw as u64 };
                    r
                })
                .collect();
            all.sort_by_key(|r| r.arrival_ns);
            Ok(TraceIter::Sorted(all.into_iter()))
        }
    }
}

/// Summary statistics of a trace (`inferlab trace stats`).
#[derive(Debug, Clone, Serialize)]
pub struct TraceStats {
    pub requests: u64,
    pub duration_s: f64,
    pub rate_per_s: f64,
    /// Coefficient of variation of inter-arrival gaps (1 for Poisson).
    pub interarrival_cv: f64,
    pub prompt: LengthStats,
    pub output: LengthStats,
    pub with_prefix: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LengthStats {
    pub mean: f64,
    pub median: u32,
    pub p99: u32,
    pub min: u32,
    pub max: u32,
    pub total: u64,
}

fn length_stats(v: &mut [u32]) -> LengthStats {
    v.sort_unstable();
    let n = v.len();
    let total: u64 = v.iter().map(|&x| x as u64).sum();
    let q = |p: f64| -> u32 {
        if n == 0 {
            0
        } else {
            // nearest rank
            v[(((p * n as f64).ceil() as usize).max(1) - 1).min(n - 1)]
        }
    };
    let median = if n == 0 {
        0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        // lower median of an even count, as an integer token count
        ((v[n / 2 - 1] as u64 + v[n / 2] as u64) / 2) as u32
    };
    LengthStats {
        mean: crate::report::round(total as f64 / n.max(1) as f64, 2),
        median,
        p99: q(0.99),
        min: v.first().copied().unwrap_or(0),
        max: v.last().copied().unwrap_or(0),
        total,
    }
}

impl TraceStats {
    pub fn compute(trace: impl Iterator<Item = Result<Request>>) -> Result<TraceStats> {
        let (mut prompts, mut outputs) = (Vec::new(), Vec::new());
        let (mut first, mut last, mut prev) = (None, 0u64, None::<u64>);
        let (mut n, mut with_prefix) = (0u64, 0u64);
        let (mut s1, mut s2) = (0f64, 0f64);
        for r in trace {
            let r = r?;
            n += 1;
            first.get_or_insert(r.arrival_ns);
            last = r.arrival_ns;
            if let Some(p) = prev {
                let g = r.arrival_ns.saturating_sub(p) as f64 * 1e-9;
                s1 += g;
                s2 += g * g;
            }
            prev = Some(r.arrival_ns);
            prompts.push(r.prompt_tokens);
            outputs.push(r.output_tokens);
            with_prefix += r.prefix_id.is_some() as u64;
        }
        let dur = (last - first.unwrap_or(0)) as f64 * 1e-9;
        let gaps = n.saturating_sub(1) as f64;
        let cv = if gaps >= 2.0 && s1 > 0.0 {
            let mean = s1 / gaps;
            let var = (s2 / gaps - mean * mean).max(0.0);
            var.sqrt() / mean
        } else {
            0.0
        };
        Ok(TraceStats {
            requests: n,
            duration_s: crate::report::round(dur, 3),
            rate_per_s: crate::report::round(if dur > 0.0 { gaps / dur } else { 0.0 }, 4),
            interarrival_cv: crate::report::round(cv, 4),
            prompt: length_stats(&mut prompts),
            output: length_stats(&mut outputs),
            with_prefix,
        })
    }
}

/// Write requests as CSV (`arrival_ns,prompt_tokens,output_tokens[,prefix_id,prefix_tokens]`)
/// to a temporary file beside `path`, then rename it into place.
pub fn write_csv(path: &Path, requests: impl Iterator<Item = Result<Request>>) -> Result<u64> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("trace")
    ));
    let mut n = 0u64;
    let res = (|| {
        let mut w = std::io::BufWriter::new(File::create(&tmp).map_err(io)?);
        writeln!(
            w,
            "arrival_ns,prompt_tokens,output_tokens,prefix_id,prefix_tokens"
        )
        .map_err(io)?;
        for r in requests {
            let r = r?;
            match r.prefix_id {
                Some(p) => writeln!(
                    w,
                    "{},{},{},{},{}",
                    r.arrival_ns, r.prompt_tokens, r.output_tokens, p, r.prefix_tokens
                ),
                None => writeln!(
                    w,
                    "{},{},{},,",
                    r.arrival_ns, r.prompt_tokens, r.output_tokens
                ),
            }
            .map_err(io)?;
            n += 1;
        }
        w.flush().map_err(io)?;
        Ok(())
    })();
    match res {
        Ok(()) => {
            std::fs::rename(&tmp, path).map_err(io)?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
