//! TODO(skeleton): to be written by its owner.
use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct MemoryArgs {}
pub fn memory(_a: MemoryArgs) -> Result<()> {
    bail!("not yet implemented")
}

#[derive(clap::Args)]
pub struct RooflineArgs {}
pub fn roofline(_a: RooflineArgs) -> Result<()> {
    bail!("not yet implemented")
}
