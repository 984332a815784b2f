//! `inferlab bench ...`: each benchmark measures a peer in the same run and
//! prints the ratio. The argument types and bodies live with their jobs.
use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Subcommand)]
enum Which {
    /// Generation tokens/s on stories260K against llama2.c's run.c.
    Generate,
    /// GPTQ of a 4096x4096 layer and of a whole model.
    Gptq(super::quantize::BenchArgs),
    /// Replay of synthetic requests on one core.
    Replay,
}

pub fn run(a: Args) -> Result<()> {
    match a.which {
        Which::Gptq(g) => super::quantize::bench_gptq(g),
        Which::Generate | Which::Replay => bail!("not yet implemented"),
    }
}
