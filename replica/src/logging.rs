//! Log output of the `bftfs` and `bftfs-replica` programs: where it goes (stderr or a file
//! given with `--log-file`), how much (`-v`/`-q`, else RUST_LOG, else `info`), and colour
//! only on a terminal, so that log files hold plain text that grep and journald read as is.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::Path;
use tracing_subscriber::EnvFilter;

/// The level for a count of `-v` (positive) and `-q` (negative) flags around `info`.
fn level(verbosity: i8) -> &'static str {
    match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    }
}

/// The filter directives for `-v`/`-q` (`quiet_crates` one step quieter, unless at trace,
/// and never louder than warn unless asked for with -vv).
fn directives(verbosity: i8, quiet_crates: &[&str]) -> String {
    let quieter = if verbosity >= 2 {
        level(verbosity)
    } else {
        level(verbosity.saturating_sub(1).min(-1))
    };
    let mut f = level(verbosity).to_string();
    for c in quiet_crates {
        f.push_str(&format!(",{c}={quieter}"));
    }
    f
}

/// The filter: `-v`/`-q` when given, else RUST_LOG, else `info` with `quiet_crates` at warn.
fn filter(verbosity: i8, quiet_crates: &[&str]) -> EnvFilter {
    if verbosity != 0 {
        return EnvFilter::new(directives(verbosity, quiet_crates));
    }
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(directives(0, quiet_crates)))
}

/// Sets up logging for the process: to `log_file` (appended, created with mode 0600 if
/// missing, never coloured) or to stderr (coloured only when it is a terminal).
pub fn init(verbosity: i8, log_file: Option<&Path>, quiet_crates: &[&str]) -> std::io::Result<()> {
    let filter = filter(verbosity, quiet_crates);
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("--log-file {}: {e}", path.display()))
                })?;
            builder
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .init();
        }
        None => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_from_flags() {
        assert_eq!(directives(0, &["fuser"]), "info,fuser=warn");
        assert_eq!(directives(1, &["fuser"]), "debug,fuser=warn");
        assert_eq!(directives(2, &["fuser"]), "trace,fuser=trace");
        assert_eq!(directives(-1, &["fuser"]), "warn,fuser=error");
        assert_eq!(directives(-3, &["a", "b"]), "error,a=error,b=error");
    }
}
