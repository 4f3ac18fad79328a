//! Wrapper micro-benchmark (owned by the file-service work).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("the wrapper benchmark is not written yet")
}
