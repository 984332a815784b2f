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
    Generate(super::generate::BenchArgs),
    /// GPTQ of a 4096x4096 layer and of a whole model.
    Gptq,
    /// Replay of synthetic requests on one core.
    Replay,
}

pub fn run(a: Args) -> Result<()> {
    match a.which {
        Which::Generate(g) => super::generate::bench(g),
        Which::Gptq | Which::Replay => bail!("not yet implemented"),
    }
}
