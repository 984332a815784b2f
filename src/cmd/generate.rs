//! TODO(skeleton): to be written by its owner.
use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct GenerateArgs {}
pub fn generate(_a: GenerateArgs) -> Result<()> {
    bail!("not yet implemented")
}

#[derive(clap::Args)]
pub struct PerplexityArgs {}
pub fn perplexity(_a: PerplexityArgs) -> Result<()> {
    bail!("not yet implemented")
}
