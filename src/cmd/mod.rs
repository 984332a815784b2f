//! One module per job. Each owns its clap arguments and its printing.

pub mod attention;
pub mod bench;
pub mod generate;
pub mod gpu;
pub mod models;
pub mod quantize;
pub mod roofline;
pub mod sim;
pub mod speculative;
