//! Why a frame was refused (or could not be made).

use super::Principal;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {bytes} bytes exceeds the limit")]
    FrameTooLarge { bytes: usize },
    #[error("decode: {0}")]
    Decode(String),
    #[error("encode: {0}")]
    Encode(String),
    #[error("unknown principal {0:?}")]
    UnknownPrincipal(Principal),
    #[error("frame carries no tag for this receiver")]
    NoTag,
    #[error("bad MAC from {0:?}")]
    BadMac(Principal),
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
    #[error("batch does not match the digest its pre-prepare signs")]
    BadBatchDigest,
    #[error("{0:?} may not send {1}")]
    ForbiddenSender(Principal, &'static str),
}

impl WireError {
    /// Counter name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::FrameTooLarge { .. } => "oversized",
            WireError::Decode(_) => "garbled",
            WireError::Encode(_) => "encode",
            WireError::UnknownPrincipal(_) | WireError::NoTag | WireError::BadMac(_) => {
                "unauthenticated"
            }
            WireError::BadSignature(_) | WireError::BadBatchDigest => "bad_signature",
            WireError::ForbiddenSender(..) => "forbidden",
        }
    }
}
