//! `bftfs completions SHELL` and `bftfs man`: shell completion scripts and manual pages made
//! from the clap definitions, so that they never disagree with `--help`.
//!
//! In: the `bftfs` command (and `bftfs-replica`'s, for its page). Out: a completion script on
//! stdout; roff manual pages, `bftfs(1)`, one `bftfs-<command>(1)` per command (nested ones
//! as `bftfs-config-check(1)`) and `bftfs-replica(1)`, written into a directory.

use anyhow::{Context, Result};
use clap::Command;
use std::path::{Path, PathBuf};

/// Writes the completion script for `shell` to `out`.
pub fn completions(
    shell: clap_complete::Shell,
    mut command: Command,
    out: &mut dyn std::io::Write,
) {
    let name = command.get_name().to_string();
    clap_complete::generate(shell, &mut command, name, out);
}

/// Renders one manual page.
fn render(command: &Command) -> Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .context("cannot render a manual page")?;
    Ok(page)
}

/// `bftfs(1)` as roff.
pub fn main_page(command: Command) -> Result<Vec<u8>> {
    render(&command)
}

/// Writes `bftfs.1`, `bftfs-<command>.1` for every visible command, and a page for each of
/// `extra` (other programs, e.g. `bftfs-replica`) into `dir`; returns the files written.
pub fn write_man_pages(command: Command, extra: &[Command], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut command = command;
    // Subcommands get their full names (`bftfs up` in the usage line) only once built.
    command.build();
    let mut pages: Vec<Command> = Vec::new();
    collect(&command, &mut pages);
    for program in extra {
        // `bftfs-replica` is both a program and the page name of `bftfs replica`: they run
        // the same daemon, and the program's own page (its usage line) wins.
        pages.retain(|p| p.get_name() != program.get_name());
        pages.push(program.clone());
    }
    let mut written = Vec::new();
    for page in pages {
        let path = dir.join(format!("{}.1", page.get_name()));
        std::fs::write(&path, render(&page)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// `command` and, recursively, its visible subcommands named `parent-child` (the convention
/// of git(1) and systemctl's pages, so that `man bftfs-up` finds the page).
fn collect(command: &Command, out: &mut Vec<Command>) {
    out.push(command.clone());
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        // `help` is clap's own; its page would only say to use --help.
        if sub.get_name() == "help" {
            continue;
        }
        let named = sub
            .clone()
            .name(format!("{}-{}", command.get_name(), sub.get_name()));
        collect(&named, out);
    }
}
