//! Trace readers and synthetic generators: formats, bad input, ordering policy.

use std::io::Write;
use std::path::PathBuf;

use inferlab_sim::synth::{Arrivals, LengthDist, Lengths, SynthSpec};
use inferlab_sim::trace::{self, parse_wall_clock, Request, TraceStats, Unsorted};
use inferlab_sim::Error;

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    p
}

fn read(p: &PathBuf, policy: Unsorted) -> Result<Vec<Request>, Error> {
    trace::open(p, policy)?.collect()
}

#[test]
fn azure_columns_and_wall_clock() {
    let d = tempfile::tempdir().unwrap();
    let p = file(
        &d,
        "az.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n2023-11-17 00:00:00.0000001,5,6\n",
    );
    let v = read(&p, Unsorted::Reject).unwrap();
    assert_eq!(v.len(), 3);
    assert_eq!(
        (v[0].arrival_ns, v[0].prompt_tokens, v[0].output_tokens),
        (0, 374, 44)
    );
    // 50.9951690 - 46.6805900 = 4.3145790 s exactly, in integer ns
    assert_eq!(v[1].arrival_ns, 4_314_579_000);
    // across midnight: 24:00:00.0000001 - 18:15:46.6805900
    assert_eq!(
        v[2].arrival_ns,
        (5 * 3600 + 44 * 60 + 13) * 1_000_000_000 + 319_410_100
    );
    assert_eq!(
        parse_wall_clock("1970-01-01 00:00:01.5").unwrap(),
        1_500_000_000
    );
    assert_eq!(
        parse_wall_clock("2000-03-01 00:00:00").unwrap()
            - parse_wall_clock("2000-02-28 00:00:00").unwrap(),
        2 * 86_400 * 1_000_000_000,
        "2000 is a leap year"
    );
}

/// One line per malformed case: (file text, expected line, expected field).
#[test]
fn malformed_rows_name_file_line_and_field() {
    let d = tempfile::tempdir().unwrap();
    let check = |name: &str, text: &str, line: u64, field: &str| {
        let p = file(&d, name, text);
        let e = read(&p, Unsorted::Reject).expect_err(name);
        let msg = e.to_string();
        assert!(msg.contains(&p.display().to_string()), "{name}: {msg}");
        match e {
            Error::TraceRow {
                line: l, field: f, ..
            } => {
                assert_eq!((l, f.as_str()), (line, field), "{name}: {msg}")
            }
            other => panic!("{name}: unexpected {other}"),
        }
    };
    check(
        "a.csv",
        "arrival_ns,prompt_tokens,output_tokens\n0,5,5\n10,x,5\n",
        3,
        "prompt_tokens",
    );
    check(
        "b.csv",
        "arrival_ns,prompt_tokens,output_tokens\n0,5,5\n10,5,-1\n",
        3,
        "output_tokens",
    );
    check(
        "c.csv",
        "arrival_ns,prompt_tokens,output_tokens\n0,5,5\n5,5,5\n7,0,5\n",
        4,
        "prompt_tokens",
    );
    check(
        "d.csv",
        "arrival_ns,prompt_tokens,output_tokens\n0,5,5\n10,5\n",
        3,
        "row",
    );
    check(
        "e.csv",
        "arrival_s,prompt_tokens,output_tokens\n0.5,5,5\nNaN,5,5\n",
        3,
        "arrival_s",
    );
    check(
        "f.csv",
        "arrival_ns,prompt_tokens,output_tokens\n-4,5,5\n",
        2,
        "arrival",
    );
    check("g.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,1,1\n2023-13-16 18:15:46.68,1,1\n", 3, "TIMESTAMP");
    check(
        "h.csv",
        "arrival_ns,prompt_tokens,output_tokens,prefix_id,prefix_tokens\n0,5,5,1,9\n",
        2,
        "prefix_tokens",
    );
    check("i.jsonl", "{\"arrival_ns\":0,\"prompt_tokens\":3,\"output_tokens\":2}\n\n{\"arrival_ns\":1,\"prompt_tokens\":3}\n", 3, "output_tokens");
    check("j.jsonl", "{\"arrival_ns\":0,\"prompt_tokens\":3,\"output_tokens\":2}\n{\"arrival_ns\":1,\"prompt_tokns\":3,\"output_tokens\":2}\n", 2, "json");
    check(
        "k.csv",
        "arrival_ns,prompt_tokens,output_tokens\n0,5,5\n1,5,99999999999\n",
        3,
        "output_tokens",
    );
}

#[test]
fn missing_columns_are_a_format_error() {
    let d = tempfile::tempdir().unwrap();
    let p = file(&d, "x.csv", "when,prompt_tokens,output_tokens\n0,1,1\n");
    assert!(matches!(
        trace::open(&p, Unsorted::Reject).err(),
        Some(Error::TraceFormat { .. })
    ));
    let missing = d.path().join("nope.csv");
    assert!(matches!(
        trace::open(&missing, Unsorted::Reject).err(),
        Some(Error::Io { .. })
    ));
}

#[test]
fn decreasing_timestamps_reject_by_default_or_sort() {
    let d = tempfile::tempdir().unwrap();
    let p = file(
        &d,
        "u.csv",
        "arrival_s,prompt_tokens,output_tokens\n1.0,1,1\n3.0,2,2\n2.0,3,3\n",
    );
    match read(&p, Unsorted::Reject) {
        Err(Error::Unsorted {
            line,
            arrival_ns,
            previous_ns,
            ..
        }) => {
            assert_eq!(
                (line, arrival_ns, previous_ns),
                (4, 2_000_000_000, 3_000_000_000)
            )
        }
        other => panic!("expected Unsorted, got {other:?}"),
    }
    let v = read(&p, Unsorted::Sort).unwrap();
    let got: Vec<(u64, u64)> = v.iter().map(|r| (r.arrival_ns, r.id)).collect();
    assert_eq!(
        got,
        vec![(1_000_000_000, 0), (2_000_000_000, 2), (3_000_000_000, 1)]
    );
    // wall clock with a row before the first: sorting re-bases on the earliest row
    let w = file(&d, "w.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-01-01 00:00:02,1,1\n2023-01-01 00:00:01,2,2\n");
    assert!(matches!(
        read(&w, Unsorted::Reject),
        Err(Error::Unsorted { line: 3, .. })
    ));
    let v = read(&w, Unsorted::Sort).unwrap();
    assert_eq!(
        (v[0].arrival_ns, v[0].prompt_tokens, v[1].arrival_ns),
        (0, 2, 1_000_000_000)
    );
}

#[test]
fn jsonl_and_csv_agree_and_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let spec = SynthSpec::azure_conv_like(50, 3);
    let out = d.path().join("t.csv");
    assert_eq!(trace::write_csv(&out, spec.iter().unwrap()).unwrap(), 50);
    let back = read(&out, Unsorted::Reject).unwrap();
    let orig: Vec<Request> = spec.iter().unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(back, orig);
    let mut jl = String::new();
    for r in &orig {
        jl += &format!(
            "{{\"arrival_ns\":{},\"ContextTokens\":{},\"GeneratedTokens\":{}}}\n",
            r.arrival_ns, r.prompt_tokens, r.output_tokens
        );
    }
    let pj = file(&d, "t.jsonl", &jl);
    assert_eq!(read(&pj, Unsorted::Reject).unwrap(), orig);
}

#[test]
fn synth_is_seeded_and_matches_its_distributions() {
    let a: Vec<Request> = SynthSpec::azure_conv_like(20_000, 1)
        .iter()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let b: Vec<Request> = SynthSpec::azure_conv_like(20_000, 1)
        .iter()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let c: Vec<Request> = SynthSpec::azure_conv_like(20_000, 2)
        .iter()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let st = TraceStats::compute(a.into_iter().map(Ok)).unwrap();
    // Sample statistics of n = 20,000 draws, 4 standard errors each: a
    // lognormal mean has relative SE sqrt(exp(σ²)−1)/sqrt(n) (0.38 % for
    // prompts, σ = 0.499; 1.04 % for outputs, σ = 1.071), a median
    // σ·sqrt(π/2)/sqrt(n) (0.44 %, 0.95 %), the rate cv/sqrt(n) (0.77 %), the
    // gap CV about 1.3 % (gamma kurtosis 3 + 6·cv²). Output lengths are
    // clipped at 1000; the generator's unclipped mean is set so the clipped
    // mean is the trace's 211.
    let close = |x: f64, want: f64, rel: f64, what: &str| {
        assert!((x / want - 1.0).abs() < rel, "{what}: {x} vs {want}")
    };
    close(st.prompt.mean, 1155.0, 0.0152, "prompt mean");
    close(st.prompt.median as f64, 1020.0, 0.0176, "prompt median");
    close(st.output.mean, 211.0, 0.0416, "output mean");
    close(st.output.median as f64, 129.0, 0.038, "output median");
    close(st.rate_per_s, 5.5, 0.031, "rate");
    close(
        st.interarrival_cv,
        inferlab_sim::synth::AZURE_CONV_INTERARRIVAL_CV,
        0.05,
        "cv",
    );
}

#[test]
fn synth_fixed_uniform_resample_and_bad_specs() {
    let spec = |arrivals, lengths| SynthSpec {
        requests: 1000,
        arrivals,
        lengths,
        seed: 0,
    };
    let fixed = spec(
        Arrivals::Fixed { rate: 4.0 },
        Lengths::Independent {
            prompt: LengthDist::Fixed(7),
            output: LengthDist::Uniform { lo: 2, hi: 5 },
        },
    );
    let v: Vec<Request> = fixed.iter().unwrap().collect::<Result<_, _>>().unwrap();
    assert!(v
        .iter()
        .enumerate()
        .all(|(i, r)| r.arrival_ns == i as u64 * 250_000_000 && r.prompt_tokens == 7));
    assert!(v.iter().all(|r| (2..=5).contains(&r.output_tokens)));
    assert!((2..=5).all(|k| v.iter().any(|r| r.output_tokens == k)));
    let rs = spec(
        Arrivals::Poisson { rate: 1.0 },
        Lengths::Resample(vec![(10, 1), (20, 2)]),
    );
    assert!(rs.iter().unwrap().all(|r| matches!(
        r,
        Ok(Request {
            prompt_tokens: 10,
            output_tokens: 1,
            ..
        } | Request {
            prompt_tokens: 20,
            output_tokens: 2,
            ..
        })
    )));
    for bad in [
        spec(
            Arrivals::Poisson { rate: 0.0 },
            Lengths::Resample(vec![(1, 1)]),
        ),
        spec(
            Arrivals::Gamma {
                rate: 1.0,
                cv: f64::NAN,
            },
            Lengths::Resample(vec![(1, 1)]),
        ),
        spec(Arrivals::Fixed { rate: 1.0 }, Lengths::Resample(vec![])),
        spec(
            Arrivals::Fixed { rate: 1.0 },
            Lengths::Independent {
                prompt: LengthDist::Fixed(0),
                output: LengthDist::Fixed(1),
            },
        ),
        spec(
            Arrivals::Fixed { rate: 1.0 },
            Lengths::Independent {
                prompt: LengthDist::LogNormal {
                    mean: 1.0,
                    median: 2.0,
                    min: 1,
                    max: 9,
                },
                output: LengthDist::Fixed(1),
            },
        ),
    ] {
        assert!(
            matches!(bad.iter().err(), Some(Error::InvalidArgument { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn azure_conversation_trace_reads_whole() {
    let Some(p) = inferlab_models::assets::require(
        inferlab_models::assets::azure_conv_trace(),
        "azure_conversation_trace_reads_whole",
    ) else {
        return;
    };
    let st = TraceStats::compute(trace::open(&p, Unsorted::Reject).unwrap()).unwrap();
    // shared/traces/README.md: context mean 1155, median 1020, max 14050; generated mean 211, median 129, max 1000
    assert_eq!(st.requests, 19366);
    assert_eq!(
        (
            st.prompt.median,
            st.prompt.max,
            st.output.median,
            st.output.max
        ),
        (1020, 14050, 129, 1000)
    );
    assert_eq!(
        (st.prompt.mean.round(), st.output.mean.round()),
        (1155.0, 211.0)
    );
    assert_eq!(
        st.interarrival_cv,
        inferlab_sim::synth::AZURE_CONV_INTERARRIVAL_CV
    );
}
