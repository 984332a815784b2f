//! TODO(skeleton): to be written by its owner.
use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct Args {}
pub fn run(_a: Args) -> Result<()> {
    bail!("not yet implemented")
}
