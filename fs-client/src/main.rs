//! The `bftfs` command.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fs_client::options::{MountOptions, OPTIONS_HELP};
use fs_client::up::UpArgs;
use fs_client::{keygen, mounting, up};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// bftfs: a Byzantine-fault-tolerant network file system.
///
/// `bftfs up DIR` mounts a file system at DIR, served by a cluster started on this machine;
/// `bftfs down DIR` stops it. State persists across down/up of the same mount point.
/// Logs go to stderr (or --log-file); choose their level with -v/-q or RUST_LOG (e.g.
/// RUST_LOG=debug).
#[derive(Parser, Debug)]
#[command(name = "bftfs", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// More log detail (-v debug, -vv trace); overrides RUST_LOG.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Less log detail (-q warnings and errors only, -qq errors only); overrides RUST_LOG.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    quiet: u8,
    /// Append the log to FILE (plain text, no colours) instead of writing it to stderr; a
    /// background process of --detach logs there too.
    #[arg(long, global = true, value_name = "FILE")]
    log_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a local cluster (3f+1 replicas on 127.0.0.1) and mount it at MOUNTPOINT.
    ///
    /// Prints where the data lives and how to stop. Without --detach it stays in the
    /// foreground, and Ctrl-C unmounts and stops cleanly. --f 0 serves the mount from one
    /// in-process file service, with no replication.
    Up {
        /// An empty directory to mount on.
        mountpoint: PathBuf,
        /// Number of Byzantine faults to tolerate: the cluster has 3f+1 replicas.
        #[arg(long, default_value_t = 1)]
        f: u32,
        /// Where the cluster keeps its state [default: a directory named after the mount point
        /// under $XDG_DATA_HOME/bftfs or ~/.local/share/bftfs].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Run in the background; return once the mount answers.
        #[arg(long)]
        detach: bool,
        /// Order on the commit path only (no speculative execution; batches run once
        /// committed). Stored in the cluster config, so it holds until the next `up`.
        #[arg(long)]
        no_fast_path: bool,
        #[arg(short = 'o', value_name = "OPTIONS", help = OPTIONS_HELP)]
        options: Vec<String>,
        /// Make replica ID misbehave on purpose, for fault tests (repeatable): MODE is mute,
        /// slow[:MS], lie, equivocate, bad-auth[:PERCENT], wrong-checkpoint or
        /// corrupt-state[:SECONDS[:TIMES]]. Needs a build with `--features byzantine`.
        #[arg(long = "byzantine", value_name = "ID:MODE")]
        byzantine: Vec<String>,
        /// Serve metrics in the Prometheus text format: replica i at
        /// http://127.0.0.1:(PORT+i)/metrics, the mount on the next port after the replicas'
        /// (PORT+3f+1; PORT with --f 0). Off by default.
        #[arg(long, value_name = "PORT")]
        metrics_port: Option<u16>,
        /// Internal: the background process started by --detach.
        #[arg(long, hide = true)]
        foreground_child: bool,
    },
    /// Unmount MOUNTPOINT and stop the cluster that `bftfs up` started for it.
    Down { mountpoint: PathBuf },
    /// Mount a cluster described by CONFIG (for clusters spread over machines).
    Mount {
        /// Cluster config written by `bftfs keygen`.
        config: PathBuf,
        /// An empty directory to mount on.
        mountpoint: PathBuf,
        #[arg(short = 'o', value_name = "OPTIONS", help = OPTIONS_HELP)]
        options: Vec<String>,
        /// Run in the background; return once the mount answers.
        #[arg(long)]
        detach: bool,
        /// This client's secrets file (also `-o client=FILE`) [default: the first
        /// client-<id>.json next to CONFIG that no other mount is using].
        #[arg(long, value_name = "FILE")]
        client: Option<PathBuf>,
        /// Serve this mount's metrics in the Prometheus text format at
        /// http://HOST:PORT/metrics (also `-o metrics=HOST:PORT`): call times by operation
        /// kind, how calls completed, what this client saw of each replica.
        #[arg(long, value_name = "HOST:PORT")]
        metrics: Option<String>,
        /// Internal: the background process started by --detach.
        #[arg(long, hide = true)]
        foreground_child: bool,
    },
    /// Make `mount -t bftfs` and fstab work: link /sbin/mount.bftfs to this program.
    ///
    /// mount(8) then runs it as `mount.bftfs CLUSTER.json MOUNTPOINT -o OPTIONS`, and it
    /// returns once the file system is mounted, served by a background bftfs process
    /// (`umount MOUNTPOINT` stops it). The same by hand: `ln -s $(command -v bftfs)
    /// /sbin/mount.bftfs`. For example:
    ///
    ///   mount -t bftfs /etc/bftfs/cluster.json /mnt/x -o client=/etc/bftfs/client-2.json
    ///
    /// or in /etc/fstab:
    ///
    ///   /etc/bftfs/cluster.json  /mnt/x  bftfs  _netdev,nofail,client=/etc/bftfs/client-2.json  0 0
    ///
    /// Besides the options of `bftfs mount -o`, mount.bftfs takes log=FILE: where the
    /// background process logs once mount(8) has returned.
    InstallHelper {
        /// Where to put the link (mount(8) looks in /sbin).
        #[arg(long, value_name = "DIR", default_value = fs_client::mount_helper::HELPER_DIR)]
        dir: PathBuf,
        /// Remove the link instead (only if it points to a bftfs).
        #[arg(long)]
        remove: bool,
    },
    /// Lock the directory PATH (and everything below it) for this mount (Zzyzx).
    ///
    /// While the lock is held, the mount's calls inside PATH are served by the replicas
    /// through the lock's log, one round trip each, with no agreement among the replicas.
    /// Another mount that touches the subtree revokes the lock: this mount then gives it back
    /// (everything it completed stays), and both go on through ordinary agreement. The lock
    /// is given back by `bftfs unlock PATH` and at unmount. Errors: EBUSY (already locked,
    /// locked a moment ago by a conflict, or too many locks), EPERM (no write permission on
    /// PATH), EOPNOTSUPP (a mount without replication).
    Lock {
        /// A directory inside a bftfs mount.
        path: PathBuf,
    },
    /// Give back the lock `bftfs lock PATH` took.
    Unlock { path: PathBuf },
    /// Unmount MOUNTPOINT (as root with umount2; otherwise with fusermount3 -u).
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if busy, and finish when the last user leaves. Also recovers a
        /// mount whose client died ("Transport endpoint is not connected").
        #[arg(long, short = 'l')]
        lazy: bool,
    },
    /// Show the cluster behind MOUNTPOINT (or CONFIG): a verdict (ok, degraded or stuck) with
    /// its reasons, then each replica's role, address, pid, view, last executed sequence
    /// number, checkpoint, lag, agreement and health, and the replicas others suspect.
    ///
    /// agree: "yes" when the replica's checkpoint state digests equal the other replicas' at
    /// the same checkpoints, "NO" when more replicas (or as many) hold another state there
    /// (its health then says at which checkpoint), "-" when there is nothing to compare.
    ///
    /// ok: every replica answers in one active view, none behind or suspected, and the
    /// mount's calls complete. degraded: a quorum (2f+1 replicas in one active view) serves,
    /// but a replica is down, lagging, changing view alone, suspected or holding a state that
    /// differs from the others'. stuck: no quorum in
    /// an active view (e.g. every replica changing view), no replica answers, the mount's
    /// process is gone, or the mount's calls fail (EIO) or have waited 10 s or more for an
    /// answer (MOUNTPOINT: the mount's own calls; --config: every client that reported in the
    /// last 10 s next to CONFIG). All replicas are asked at once, waiting up to 2 s.
    ///
    /// Exit status: 0 ok, 1 degraded, 2 stuck or unreachable, 3 the status could not be found
    /// (no such mount, unreadable config, bad arguments). --json carries the same verdict in
    /// "health", "exit_code" and "reasons".
    #[command(group(clap::ArgGroup::new("target").required(true).args(["mountpoint", "config"])))]
    Status {
        mountpoint: Option<PathBuf>,
        #[arg(long, value_name = "CONFIG")]
        config: Option<PathBuf>,
        /// Machine-readable output (with --watch, one JSON object per line).
        #[arg(long)]
        json: bool,
        /// Report again every SECONDS (default 2; write --watch=5) until interrupted, like
        /// watch(1); on a terminal each report replaces the last.
        #[arg(
            long,
            value_name = "SECONDS",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "2"
        )]
        watch: Option<f64>,
        /// With --watch: stop after N reports, exiting with the last one's status.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
    },
    /// Generate keys and a cluster config for replicas on other machines.
    ///
    /// Writes DIR/cluster.json (public: addresses and public keys, for every node and client)
    /// and one secrets file per replica (replica-<i>.json) and per client identity
    /// (client-<id>.json), mode 0600. Copy cluster.json and a replica's own secrets file to
    /// each replica machine, and cluster.json and one client file to each client. Never
    /// overwrites existing keys.
    Keygen {
        /// Directory to write into (created with mode 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Number of Byzantine faults to tolerate: the cluster has 3f+1 replicas.
        #[arg(long, default_value_t = 1)]
        f: u32,
        /// A replica's address, HOST:PORT; give it 3f+1 times, replica 0 first
        /// [default: 127.0.0.1 with ports from --base-port].
        #[arg(long = "replica", value_name = "HOST:PORT")]
        replicas: Vec<String>,
        /// First port of the default addresses.
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        /// Number of client identities to make (each mounted client needs its own).
        #[arg(long, default_value_t = 1)]
        clients: u32,
        /// Which uids and gids the clients state are believed, as NFS export options: `none`
        /// (all), `root` (uid 0 becomes nobody, 65534: NFS root_squash) or `all` (everyone
        /// becomes nobody). A client's key proves which client calls, not which user; edit a
        /// client's "squash" in cluster.json to set it per client.
        #[arg(long, default_value = "none", value_name = "MODE")]
        squash: state_abstraction::fs::Squash,
    },
    /// Check configuration files.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Run one replica of a cluster: the daemon `bftfs-replica` runs, with the same options.
    ///
    /// It orders file operations with the other replicas (PBFT), executes them on the file
    /// service kept in --data-dir, and answers clients, until SIGINT or SIGTERM. Keys and the
    /// cluster config come from `bftfs keygen`. `bftfs up` starts its replicas this way when
    /// no bftfs-replica program is beside bftfs, so one installed `bftfs` is enough.
    Replica(replica::daemon::ReplicaArgs),
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell).
    ///
    /// For example: `bftfs completions bash > /etc/bash_completion.d/bftfs`,
    /// `bftfs completions zsh > /usr/local/share/zsh/site-functions/_bftfs`,
    /// `bftfs completions fish > ~/.config/fish/completions/bftfs.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages: bftfs(1), one bftfs-COMMAND(1) per command and
    /// bftfs-replica(1), into DIR; without --dir, print bftfs(1).
    ///
    /// For example: `bftfs man --dir /usr/local/share/man/man1 && mandb -q`.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Check a cluster config (cluster.json) or a secrets file (replica-<i>.json,
    /// client-<id>.json): every field known, spelt right and valid, and a secrets file
    /// made for the cluster config next to it (or --cluster).
    ///
    /// Prints what the file holds and exits 0 when it is usable; otherwise says what is wrong,
    /// at which line (with a guess at a misspelt field name), and exits 1. Every bftfs program
    /// refuses such a file in the same way when it starts. Times in the "protocol" section
    /// are durations such as "2s" or "500ms" (files with the older `..._ticks` numbers and
    /// `tick_ns` still load).
    Check {
        file: PathBuf,
        /// What FILE is [default: guessed from its content].
        #[arg(long, value_enum)]
        kind: Option<fs_client::config_check::Kind>,
        /// The cluster config a secrets file must match [default: cluster.json next to FILE,
        /// if there is one].
        #[arg(long, value_name = "CONFIG")]
        cluster: Option<PathBuf>,
    },
}

/// `bftfs status`'s exit status when it cannot find out (see its help).
const STATUS_UNKNOWN: i32 = 3;

/// The time of day in UTC, `HH:MM:SS UTC`, heading each report of `status --watch` (the
/// date would only repeat itself from one report to the next).
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn parse_options(raw: &[String]) -> Result<MountOptions> {
    match MountOptions::parse_all(raw) {
        Ok(o) => Ok(o),
        Err(e) => bail!("{e}"),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Up {
            mountpoint,
            f,
            data_dir,
            detach,
            no_fast_path,
            options,
            byzantine,
            metrics_port,
            foreground_child,
        } => up::up(UpArgs {
            options: {
                let o = parse_options(&options)?;
                if o.client.is_some() {
                    bail!("-o client=FILE is for `bftfs mount`; `bftfs up` makes and picks its own client identities");
                }
                o
            },
            metrics_port: up::check_metrics_port(metrics_port, f)?,
            byzantine: up::parse_byzantine(&byzantine, f)?,
            mountpoint,
            f,
            data_dir,
            detach,
            fast_path: !no_fast_path,
            foreground_child,
        }),
        Cmd::Down { mountpoint } => up::down(&mountpoint),
        Cmd::Mount {
            config,
            mountpoint,
            options,
            detach,
            client,
            metrics,
            foreground_child,
        } => {
            let mut options = parse_options(&options)?;
            if metrics.is_some() {
                options.metrics = metrics;
            }
            let client = client.or_else(|| options.client.clone());
            up::mount(
                &config,
                &mountpoint,
                options,
                client.as_deref(),
                detach,
                foreground_child,
                false,
            )
        }
        Cmd::InstallHelper { dir, remove } => {
            use fs_client::mount_helper;
            if remove {
                match mount_helper::uninstall(&dir)? {
                    Some(link) => println!("bftfs: removed {}", link.display()),
                    None => println!(
                        "bftfs: there was no {}",
                        dir.join(mount_helper::HELPER_NAME).display()
                    ),
                }
            } else {
                let link = mount_helper::install(&dir)?;
                println!(
                    "bftfs: {} -> {}; `mount -t bftfs CLUSTER.json DIR -o client=FILE` and fstab lines of type bftfs now work",
                    link.display(),
                    std::fs::read_link(&link)?.display()
                );
            }
            Ok(())
        }
        Cmd::Lock { path } => {
            fs_client::lock_control(&path, true)
                .with_context(|| format!("cannot lock {}", path.display()))?;
            println!("bftfs: locked {}", path.display());
            Ok(())
        }
        Cmd::Unlock { path } => {
            fs_client::lock_control(&path, false)
                .with_context(|| format!("cannot unlock {}", path.display()))?;
            println!("bftfs: unlocked {}", path.display());
            Ok(())
        }
        Cmd::Umount { mountpoint, lazy } => {
            let mnt = mounting::mount_path(&mountpoint)?;
            mounting::unmount(&mnt, lazy)?;
            println!("bftfs: unmounted {}", mnt.display());
            Ok(())
        }
        Cmd::Status {
            mountpoint,
            config,
            json,
            watch,
            count,
        } => {
            let once = || match (&mountpoint, &config) {
                (Some(m), _) => up::status(m, json),
                (None, Some(c)) => up::status_of_config(c, json),
                (None, None) => bail!("give a mount point or --config CONFIG"),
            };
            let Some(every) = watch else {
                match once() {
                    Ok(h) => {
                        let _ = std::io::stdout().flush();
                        std::process::exit(h.exit_code())
                    }
                    Err(e) => {
                        eprintln!("bftfs: {e:#}");
                        std::process::exit(STATUS_UNKNOWN)
                    }
                }
            };
            if !every.is_finite() || !(0.1..=86_400.0).contains(&every) {
                eprintln!("bftfs: --watch {every}: give a number of seconds from 0.1 to 86400");
                std::process::exit(STATUS_UNKNOWN);
            }
            let redraw = !json && std::io::stdout().is_terminal();
            let mut round = 0u64;
            loop {
                round += 1;
                if redraw {
                    // Home and clear: each report replaces the last, as watch(1) does.
                    print!("\x1b[H\x1b[2J");
                }
                if !json {
                    println!("{}", now_utc());
                }
                let last = match once() {
                    Ok(h) => h.exit_code(),
                    Err(e) => {
                        // Keep watching: a mount that is restarting comes back.
                        eprintln!("bftfs: {e:#}");
                        STATUS_UNKNOWN
                    }
                };
                if !json && !redraw {
                    println!();
                }
                let _ = std::io::stdout().flush();
                if count.is_some_and(|n| round >= n) {
                    std::process::exit(last);
                }
                std::thread::sleep(std::time::Duration::from_secs_f64(every));
            }
        }
        Cmd::Config(ConfigCmd::Check {
            file,
            kind,
            cluster,
        }) => {
            let what = fs_client::config_check::check(&file, kind, cluster.as_deref())?;
            println!("{}: ok: {what}", file.display());
            Ok(())
        }
        Cmd::Replica(args) => replica::daemon::run(args),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            fs_client::packaging::completions(shell, Cli::command(), &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory;
            match dir {
                None => {
                    let page = fs_client::packaging::main_page(Cli::command())?;
                    std::io::stdout().write_all(&page)?;
                }
                Some(dir) => {
                    let written = fs_client::packaging::write_man_pages(
                        Cli::command(),
                        &[replica::daemon::Cli::command()],
                        &dir,
                    )?;
                    println!("bftfs: {} manual pages in {}", written.len(), dir.display());
                }
            }
            Ok(())
        }
        Cmd::Keygen {
            out,
            f,
            replicas,
            base_port,
            clients,
            squash,
        } => {
            let addresses = if replicas.is_empty() {
                keygen::default_addresses(f, "127.0.0.1", base_port)?
            } else {
                replicas
            };
            let files = keygen::write_cluster(&out, f, addresses, clients, squash)?;
            println!(
                "bftfs: keys for a cluster of {} replicas (f={f}) in {}",
                files.replicas.len(),
                out.display()
            );
            println!(
                "  config:   {} (public; every replica and client needs it)",
                files.config.display()
            );
            for (i, p) in files.replicas.iter().enumerate() {
                println!("  replica {i}: {} (secret)", p.display());
            }
            for (id, p) in &files.clients {
                println!("  client {}: {} (secret)", id.0, p.display());
            }
            Ok(())
        }
    }
}

fn main() {
    let mut argv = std::env::args_os();
    if fs_client::mount_helper::invoked_as_helper(argv.next().as_deref()) {
        let args: Vec<std::ffi::OsString> = argv.collect();
        let _ = replica::logging::init(0, None, &["fuser"]);
        std::process::exit(fs_client::mount_helper::main(args));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `status`'s exit statuses 1 and 2 mean degraded and stuck; a script must not read a
        // mistyped status command line (clap's usual 2) as a stuck cluster.
        Err(e)
            if e.use_stderr()
                && std::env::args()
                    .skip(1)
                    .find(|a| !a.starts_with('-'))
                    .as_deref()
                    == Some("status") =>
        {
            let _ = e.print();
            std::process::exit(STATUS_UNKNOWN)
        }
        Err(e) => e.exit(),
    };
    let verbosity = i8::try_from(i16::from(cli.verbose) - i16::from(cli.quiet)).unwrap_or(0);
    if let Err(e) = replica::logging::init(verbosity, cli.log_file.as_deref(), &["fuser"]) {
        eprintln!("bftfs: {e}");
        std::process::exit(if matches!(cli.command, Cmd::Status { .. }) {
            STATUS_UNKNOWN
        } else {
            1
        });
    }
    // A background process started for --detach logs the same way.
    let mut forward = Vec::new();
    forward.extend((0..cli.verbose).map(|_| "-v".to_string()));
    forward.extend((0..cli.quiet).map(|_| "-q".to_string()));
    if let Some(f) = &cli.log_file {
        match std::path::absolute(f) {
            Ok(abs) => forward.extend(["--log-file".to_string(), abs.to_string_lossy().into()]),
            Err(e) => {
                eprintln!("bftfs: --log-file {}: {e}", f.display());
                std::process::exit(1);
            }
        }
    }
    fs_client::up::set_forwarded_log_args(forward);
    if let Err(e) = run(cli) {
        eprintln!("bftfs: {e:#}");
        std::process::exit(1);
    }
}
