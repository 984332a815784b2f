//! `inferlab bench ...`: each benchmark measures a peer in the same run and
//! prints the ratio. The argument types and bodies live with their jobs.
use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Subcommand)]
enum Which {
    /// Generation tokens/s on stories260K against llama2.c's run.c.
    Generate(super::generate::BenchArgs),
    /// GPTQ of a 4096x4096 layer and of a whole model.
    Gptq(super::quantize::BenchArgs),
    /// Replay of synthetic requests on one core.
    Replay {
        /// Synthetic Azure-like requests to replay (goal: 1,000,000 in <= 10 s).
        #[arg(long, default_value_t = 1_000_000)]
        requests: u64,
        /// Step cost model.
        #[arg(long, value_enum, default_value_t = super::sim::CostArg::Roofline)]
        cost: super::sim::CostArg,
    },
}

pub fn run(a: Args) -> Result<()> {
    match a.which {
        Which::Generate(g) => super::generate::bench(g),
        Which::Gptq(g) => super::quantize::bench_gptq(g),
        Which::Replay { requests, cost } => super::sim::bench_replay(requests, cost),
    }
}
