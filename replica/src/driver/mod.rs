//! The tokio driver: runs the sans-IO replica core and client over TCP, a write-ahead log and
//! the wall clock. See [`node`] for the replica side and [`client`] for the client side.

pub mod audit;
#[cfg(feature = "byzantine")]
pub mod byzantine;
pub mod client;
pub mod metrics;
pub mod net;
pub mod node;
pub mod peers;
pub mod status;
pub mod wal;

/// Whether this build can run Byzantine replicas on purpose (cargo feature `byzantine`).
pub const BYZANTINE_AVAILABLE: bool = cfg!(feature = "byzantine");

/// Checks a `--byzantine` mode: Ok in builds with the feature if it parses, else why not.
pub fn check_byzantine_mode(text: &str) -> Result<(), String> {
    #[cfg(feature = "byzantine")]
    {
        text.parse::<byzantine::Mode>().map(|_| ())
    }
    #[cfg(not(feature = "byzantine"))]
    {
        Err(format!(
            "--byzantine {text}: this build has no Byzantine modes; rebuild with `cargo build --features byzantine`"
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn byzantine_modes_only_with_the_feature() {
        let checked = super::check_byzantine_mode("lie");
        if super::BYZANTINE_AVAILABLE {
            assert_eq!(checked, Ok(()));
            assert!(super::check_byzantine_mode("loud").is_err());
        } else {
            assert!(checked.is_err_and(|e| e.contains("--features byzantine")));
        }
    }
}
