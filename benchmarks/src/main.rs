//! `bftfs-bench`: measures bftfs against baselines in one run. Figures are ratios measured in
//! the same run; see benchmarks/RESULTS.md for recorded results.

use clap::{Parser, Subcommand};

mod chaos;
mod micro;
mod postmark;
mod replay;
mod report;
mod seqwrite;
mod wrapper;

#[derive(Parser)]
#[command(
    name = "bftfs-bench",
    about = "Benchmarks for bftfs (ratios against baselines, measured in one run)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Cost of the file service's conformance wrapper per operation against the raw system
    /// calls it makes, and the cost of digest upkeep on 4 KiB writes.
    Wrapper(wrapper::Args),
    /// Protocol micro-benchmark: null-operation throughput and latency with n=4 (f=1) against
    /// the same service unreplicated (n=1) over loopback TCP, rounds interleaved.
    Micro(micro::Args),
    /// Replay an NFSv3 trace (Ellard's nfsdump text format; plain, .zst or .gz) against one or
    /// more mounted directories: ops/s, latency per procedure, agreement with the trace.
    Replay(replay::Args),
    /// PostMark (Debian's postmark) against bftfs (f=1), bftfs --f 0, tmpfs, a local directory,
    /// bindfs and GlusterFS in one session, rounds interleaved: transactions/s, files
    /// created/s, total time, ratios to a baseline; CSV, JSON and a PNG chart in --out.
    Postmark(postmark::Args),
    /// A large file written in 1 MiB writes with a final fsync (dd conv=fsync) on bftfs in
    /// both write modes and baselines in one session, rounds interleaved: MB/s and ratios.
    Seqwrite(seqwrite::Args),
    /// Fault run: a verifying workload and PostMark on a mounted f=1 cluster while replicas
    /// (the primary too) are killed and cut off in turn; figures in --out.
    Chaos(chaos::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Wrapper(args) => wrapper::run(args),
        Command::Micro(args) => micro::run(args),
        Command::Replay(args) => replay::run(args),
        Command::Postmark(args) => postmark::run(args),
        Command::Seqwrite(args) => seqwrite::run(args),
        Command::Chaos(args) => chaos::run(args),
    }
}
