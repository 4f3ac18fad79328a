//! `bftfs-replica`: runs one replica of the bftfs file service (the same daemon as
//! `bftfs replica`; see `replica::daemon`).

use clap::Parser;
use replica::daemon::Cli;

fn main() {
    let cli = Cli::parse();
    let verbosity = i8::try_from(i16::from(cli.verbose) - i16::from(cli.quiet)).unwrap_or(0);
    if let Err(e) = replica::logging::init(verbosity, cli.log_file.as_deref(), &[]) {
        eprintln!("bftfs-replica: {e}");
        std::process::exit(1);
    }
    if let Err(e) = replica::daemon::run(cli.replica) {
        eprintln!("bftfs-replica: {e:#}");
        std::process::exit(1);
    }
}
