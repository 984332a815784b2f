//! TODO(skeleton): to be written by its owner.
use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct ReplayArgs {}
pub fn replay(_a: ReplayArgs) -> Result<()> {
    bail!("not yet implemented")
}

#[derive(clap::Args)]
pub struct TraceArgs {}
pub fn trace(_a: TraceArgs) -> Result<()> {
    bail!("not yet implemented")
}
