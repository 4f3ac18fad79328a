//! Frames: a big-endian `u32` length, then a body naming its sender, one MAC tag per receiver
//! and the encoded message. Lengths are checked before a body is read.

use super::codec::byte_string;
use super::{decode, Principal, WireError, FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
use serde::{Deserialize, Serialize};

/// Checks a frame's length prefix before its body is read.
pub fn frame_length(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge { bytes: len });
    }
    Ok(len)
}

/// Prefixes `body` with its length.
pub fn frame(body: &[u8]) -> Result<Vec<u8>, WireError> {
    if body.len() > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge { bytes: body.len() });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Splits a byte stream into frame bodies (sans-IO). An oversized length is an error as soon
/// as its header arrives; the connection should then be closed.
#[derive(Default)]
pub struct FrameReader {
    buffer: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        if self.buffer.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let header = [
            self.buffer[0],
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
        ];
        let len = frame_length(header)?;
        if self.buffer.len() < FRAME_HEADER_BYTES + len {
            return Ok(None);
        }
        let body = self.buffer[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len].to_vec();
        self.buffer.drain(..FRAME_HEADER_BYTES + len);
        Ok(Some(body))
    }
}

/// The body of a frame: who sent it, one MAC tag per intended receiver, the encoded message.
#[derive(Serialize, Deserialize)]
pub(super) struct FrameBody {
    pub(super) sender: Principal,
    pub(super) tags: Vec<(Principal, [u8; 32])>,
    #[serde(with = "byte_string")]
    pub(super) message: Vec<u8>,
}

/// The sender a frame body claims, read without authenticating it: only for counting
/// failed frames per peer, never for trusting anything (a forger can claim anyone).
pub fn claimed_sender(body: &[u8]) -> Option<Principal> {
    decode::<FrameBody>(body).ok().map(|f| f.sender)
}
