//! `inferlab`: the command line. One subcommand per job; each lives in
//! `src/cmd/<job>.rs` with its own clap `Args`. This is the only crate that
//! prints, parses flags or uses `anyhow`; the libraries return typed errors.

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "inferlab",
    version,
    about = "Exact CPU oracle, GPU path and deterministic simulator for LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a request trace through the serving simulator (default: a built-in Azure-like trace).
    Replay(cmd::sim::ReplayArgs),
    /// Inspect or synthesize request traces.
    Trace(cmd::sim::TraceArgs),
    /// GPU memory breakdown, KV blocks and maximum tokens in flight.
    Memory(cmd::roofline::MemoryArgs),
    /// Per-operator roofline table (and chart) for one decode or prefill step.
    Roofline(cmd::roofline::RooflineArgs),
    /// The model and hardware catalogs.
    Models(cmd::models::Args),
    /// Exact attention on .npy inputs (the oracle other test suites call).
    Attention(cmd::attention::Args),
    /// Generate text from a checkpoint.
    Generate(cmd::generate::GenerateArgs),
    /// Perplexity of a checkpoint on a text file.
    Perplexity(cmd::generate::PerplexityArgs),
    /// Quantize a layer or a whole model (RTN, GPTQ, AWQ).
    Quantize(cmd::quantize::Args),
    /// Speculative decoding: theory, losslessness check, runs on real models.
    Speculative(cmd::speculative::Args),
    /// GPU kernels: checks against the reference and benchmarks.
    Gpu(cmd::gpu::Args),
    /// Benchmarks that print a ratio against a peer measured in the same run.
    Bench(cmd::bench::Args),
}

/// Keep freed memory for reuse instead of returning it to the kernel.
///
/// The numeric jobs allocate and free arrays of tens of megabytes per layer;
/// glibc's defaults hand blocks that large back to the kernel (mmap/munmap,
/// heap trimming), so each new one pays a page fault per 4 KiB page (12 % of a
/// whole-model quantization's CPU time, measured with perf). Raising the mmap
/// and trim thresholds keeps them in the heap. Memory use is unchanged at its
/// peak; only the return of freed memory to the OS is deferred to exit.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_TOP_PAD: i32 = -2;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes glibc's allocation policy; it is called
    // before any other thread exists. A rejected value (return 0) is harmless.
    // 32 MiB is the largest mmap threshold glibc accepts on 64-bit (half its
    // HEAP_MAX_SIZE); it rejected the 1 GiB asked for before, silently.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
        mallopt(M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Replay(a) => cmd::sim::replay(a),
        Command::Trace(a) => cmd::sim::trace(a),
        Command::Memory(a) => cmd::roofline::memory(a),
        Command::Roofline(a) => cmd::roofline::roofline(a),
        Command::Models(a) => cmd::models::run(a),
        Command::Attention(a) => cmd::attention::run(a),
        Command::Generate(a) => cmd::generate::generate(a),
        Command::Perplexity(a) => cmd::generate::perplexity(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Speculative(a) => cmd::speculative::run(a),
        Command::Gpu(a) => cmd::gpu::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
