//! `bftfs-bench`: measures bftfs against baselines in one run. Figures are ratios measured in
//! the same run; see benchmarks/RESULTS.md for recorded results.

use clap::{Parser, Subcommand};

mod wrapper;

#[derive(Parser)]
#[command(name = "bftfs-bench", about = "Benchmarks for bftfs (ratios against baselines, measured in one run)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Cost of the file service's conformance wrapper per operation against the raw system
    /// calls it makes, and the cost of digest upkeep on 4 KiB writes.
    Wrapper(wrapper::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Wrapper(args) => wrapper::run(args),
    }
}
