//! `bftfs config check FILE`: says whether a cluster config or a secrets file is usable, and
//! if not, what is wrong and where, in words an operator can act on.
//!
//! The files are JSON read with `deny_unknown_fields` (replica/src/config.rs), so the checks
//! are the ones every reader makes; this module only finds out what kind of file it was given,
//! points at the line, and suggests the field that was probably meant.

use anyhow::{anyhow, bail, Context, Result};
use replica::config::{ClientSecrets, ClusterConfig, DurationText, ReplicaSecrets};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// The three kinds of file `bftfs keygen` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// `cluster.json`: addresses, public keys, protocol parameters.
    Cluster,
    /// `replica-<i>.json`: one replica's secrets.
    Replica,
    /// `client-<id>.json`: one client's secrets.
    Client,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Cluster => "cluster config",
            Kind::Replica => "replica secrets file",
            Kind::Client => "client secrets file",
        }
    }
}

/// Guesses the kind from the content (the names are only a convention): a cluster config
/// lists `replicas`; a replica's MAC keys name replicas and clients (`{"Replica": 1}`), a
/// client's name replicas by number.
fn guess_kind(value: &serde_json::Value) -> Option<Kind> {
    let object = value.as_object()?;
    if ["replicas", "protocol", "f"]
        .iter()
        .any(|k| object.contains_key(*k))
    {
        return Some(Kind::Cluster);
    }
    let first_peer = object.get("mac_keys")?.as_array()?.first()?.get(0)?;
    if first_peer.is_object() {
        Some(Kind::Replica)
    } else {
        Some(Kind::Client)
    }
}

/// What a valid file holds, in one line.
fn summary(kind: Kind, text: &str) -> Result<String> {
    Ok(match kind {
        Kind::Cluster => {
            let c = ClusterConfig::from_json(text)?;
            let p = &c.protocol;
            let time = |ticks: u64| {
                DurationText(std::time::Duration::from_nanos(
                    ticks.saturating_mul(p.tick_ns),
                ))
            };
            format!(
                "cluster config: f={}, {} replicas ({}), {} clients; view-change timeout {}, fast path {}",
                c.f,
                c.n(),
                c.replicas
                    .iter()
                    .map(|r| r.address.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                c.clients.len(),
                time(p.view_change_timeout_ticks),
                if p.fast_path { "on" } else { "off" }
            )
        }
        Kind::Replica => {
            let s = ReplicaSecrets::from_json(text)?;
            format!(
                "secrets of replica {} ({} MAC keys)",
                s.id.0,
                s.mac_keys.len()
            )
        }
        Kind::Client => {
            let s = ClientSecrets::from_json(text)?;
            format!(
                "secrets of client {} ({} MAC keys)",
                s.id.0,
                s.mac_keys.len()
            )
        }
    })
}

/// One JSON error as an operator reads it: the message without serde's position suffix, the
/// position as "line L, column C" with that line quoted, and a guess at a misspelt field.
fn explain_json(e: &serde_json::Error, text: &str) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full);
    let mut out = if e.line() > 0 {
        format!("line {}, column {}: {message}", e.line(), e.column())
    } else {
        message.to_string()
    };
    if let Some(guess) = misspelt_field(message) {
        out.push_str(&format!(" (did you mean `{guess}`?)"));
    }
    if let Some(line) = text
        .lines()
        .nth(e.line().saturating_sub(1))
        .filter(|_| e.line() > 0)
    {
        out.push_str(&format!("\n    {}", line.trim()));
    }
    out
}

/// From serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`"), the known
/// field closest to `x`, if it is close enough to be a misspelling.
fn misspelt_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (wrong, expected) = rest.split_once('`')?;
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    known
        .into_iter()
        .map(|k| (edit_distance(wrong, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k.to_string())
}

/// Levenshtein distance, counting a swap of neighbours as one edit ("sqaush" → "squash").
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// Parses `text` as `T`, explaining a failure with [`explain_json`].
fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| explain_json(&e, text))
}

/// Checks `path`. On success returns a one-line description of what it holds; on failure an
/// error naming the file and what is wrong. `cluster`: the cluster config to check a secrets
/// file against (by default `cluster.json` in the same directory, if there is one).
pub fn check(path: &Path, kind: Option<Kind>, cluster: Option<&Path>) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value =
        parse(&text).map_err(|e| anyhow!("{} is not JSON: {e}", path.display()))?;
    let Some(kind) = kind.or_else(|| guess_kind(&value)) else {
        bail!(
            "{} is not a bftfs config: expected a cluster config (with \"replicas\") or a secrets file (with \"mac_keys\"); name the kind with --kind",
            path.display()
        );
    };
    let invalid = |e: String| anyhow!("{} is not a valid {}: {e}", path.display(), kind.describe());
    // Field by field first, for the position and the suggestion; then the checks that need
    // the whole file (replica count, keys, protocol limits).
    match kind {
        Kind::Cluster => parse::<ClusterConfig>(&text).map(|_| ()),
        Kind::Replica => parse::<ReplicaSecrets>(&text).map(|_| ()),
        Kind::Client => parse::<ClientSecrets>(&text).map(|_| ()),
    }
    .map_err(invalid)?;
    let mut line = summary(kind, &text).map_err(|e| invalid(e.to_string()))?;
    if kind != Kind::Cluster {
        let next_to_it: Option<PathBuf> = path
            .parent()
            .map(|d| d.join(crate::keygen::CONFIG_FILE))
            .filter(|p| p.is_file());
        if let Some(config_path) = cluster.map(Path::to_path_buf).or(next_to_it) {
            let config = crate::cluster::read_config(&config_path)?;
            let matched = match kind {
                Kind::Replica => ReplicaSecrets::from_json(&text)?.check_against(&config),
                _ => ClientSecrets::from_json(&text)?.check_against(&config),
            };
            matched.map_err(|e| {
                anyhow!(
                    "{} does not belong to the cluster in {}: {e}",
                    path.display(),
                    config_path.display()
                )
            })?;
            line.push_str(&format!("; matches {}", config_path.display()));
        }
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspellings_are_guessed() {
        assert_eq!(
            misspelt_field("unknown field `sqaush`, expected one of `id`, `public_key`, `squash`"),
            Some("squash".into())
        );
        assert_eq!(
            misspelt_field("unknown field `adress`, expected one of `id`, `address`, `public_key`"),
            Some("address".into())
        );
        assert_eq!(
            misspelt_field("unknown field `colour`, expected one of `id`, `public_key`, `squash`"),
            None
        );
        assert_eq!(misspelt_field("missing field `f`"), None);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("ab", "ba"), 1);
    }

    #[test]
    fn checks_name_the_file_line_and_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = crate::keygen::write_cluster(
            &dir.path().join("k"),
            1,
            crate::keygen::default_addresses(1, "127.0.0.1", 7000).expect("addresses"),
            1,
            state_abstraction::fs::Squash::None,
        )
        .expect("keygen");
        let ok = check(&files.config, None, None).expect("valid");
        assert!(
            ok.contains("f=1, 4 replicas") && ok.contains("timeout 2s"),
            "{ok}"
        );
        let ok = check(&files.replicas[1], None, None).expect("valid");
        assert!(ok.contains("replica 1") && ok.contains("matches"), "{ok}");
        let ok = check(&files.clients[0].1, None, None).expect("valid");
        assert!(ok.contains("client 1"), "{ok}");

        let text = std::fs::read_to_string(&files.config).expect("read");
        let bad = dir.path().join("bad.json");
        std::fs::write(
            &bad,
            text.replace("\"view_change_timeout\"", "\"view_change_timout\""),
        )
        .expect("write");
        let e = check(&bad, None, None).expect_err("misspelt").to_string();
        assert!(
            e.contains("bad.json")
                && e.contains("unknown field `view_change_timout`")
                && e.contains("did you mean `view_change_timeout`")
                && e.contains("line "),
            "{e}"
        );
        std::fs::write(&bad, text.replace("\"2s\"", "\"2 parsecs\"")).expect("write");
        let e = check(&bad, None, None)
            .expect_err("bad duration")
            .to_string();
        assert!(e.contains("`2 parsecs` is not a duration"), "{e}");
        std::fs::write(&bad, "{\"hello\": 1}").expect("write");
        let e = check(&bad, None, None)
            .expect_err("unknown kind")
            .to_string();
        assert!(e.contains("not a bftfs config"), "{e}");
        std::fs::write(&bad, "{\"f\": ").expect("write");
        let e = check(&bad, None, None).expect_err("not json").to_string();
        assert!(e.contains("not JSON"), "{e}");
    }
}
