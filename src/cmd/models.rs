//! `inferlab models list` and `inferlab models show NAME`: the model and GPU
//! catalogs as plain-text tables (rendered by `inferlab_models::report`, so
//! the same text is snapshot-tested under `golden/`).
use anyhow::Result;
use inferlab_models::{catalog, report};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Every catalog model (parameters, shape, bf16 size, KV bytes/token) and GPU.
    List,
    /// One model: shape, parameters (active for MoE), bytes per dtype, KV cache.
    Show {
        /// Catalog name (see `list`) or a path to a descriptor TOML.
        name: String,
    },
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        Sub::List => print!("{}", report::render_list()?),
        Sub::Show { name } => print!("{}", report::render_show(&catalog::model(&name)?)),
    }
    Ok(())
}
