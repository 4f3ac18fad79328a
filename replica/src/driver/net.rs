//! TCP plumbing: frames with their size checked before the body is read, and outbound links
//! that reconnect with backoff.
//!
//! Frames are opaque here (`wire::Authenticator::seal` makes them, length prefix included);
//! authentication happens in the caller before anything reaches a protocol core.

use crate::wire::{self, WireError, FRAME_HEADER_BYTES};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Reads one frame body. An oversized length is refused from the header alone, so a hostile
/// peer cannot make us buffer more than the limit.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    r.read_exact(&mut header).await?;
    let len = wire::frame_length(header)
        .map_err(|e: WireError| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    // Grow the buffer as bytes arrive rather than trusting the announced length: a peer that
    // announces a large frame and then stalls must not pin that much memory per connection.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a frame",
        ));
    }
    Ok(body)
}

/// Writes frames from `rx` (each already length-prefixed) until the channel closes or the
/// socket fails. Frames that are already queued go out in one write.
pub async fn write_frames<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    rx: &mut mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    let mut buf = Vec::new();
    while let Some(frame) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&frame);
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        w.write_all(&buf).await?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_secs(1),
        }
    }
}

/// An outbound link to `address`. Frames pushed into the returned sender are written over a
/// connection that is re-established with backoff whenever it fails. While the peer is
/// unreachable, frames are dropped rather than queued without bound: the protocol
/// retransmits what matters. Frames the peer sends back on the connection go to `inbound`.
/// `hello`, if given, is written first on every new connection.
pub fn spawn_link(
    address: String,
    queue: usize,
    backoff: Backoff,
    hello: Option<Vec<u8>>,
    inbound: Option<mpsc::Sender<Vec<u8>>>,
) -> mpsc::Sender<Vec<u8>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(queue);
    tokio::spawn(async move {
        let mut delay = backoff.first;
        let mut failures = 0u64;
        loop {
            let stream = match TcpStream::connect(&address).await {
                Ok(s) => s,
                Err(e) => {
                    failures += 1;
                    // Log the first failure and then rarely, so a dead peer does not flood logs.
                    if failures == 1 || failures % 100 == 0 {
                        tracing::info!(%address, error = %e, failures, "cannot connect; retrying with backoff");
                    }
                    while rx.try_recv().is_ok() {}
                    if rx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(backoff.max);
                    continue;
                }
            };
            if failures > 0 {
                tracing::info!(%address, "connected");
            }
            failures = 0;
            delay = backoff.first;
            let _ = stream.set_nodelay(true);
            let (mut rd, mut wr) = stream.into_split();
            if let Some(h) = &hello {
                if let Err(e) = wr.write_all(h).await {
                    tracing::debug!(%address, error = %e, "hello failed; reconnecting");
                    continue;
                }
            }
            let reader = inbound.clone().map(|inbound| {
                tokio::spawn(async move {
                    while let Ok(frame) = read_frame(&mut rd).await {
                        if inbound.send(frame).await.is_err() {
                            break;
                        }
                    }
                })
            });
            let result = write_frames(&mut wr, &mut rx).await;
            if let Some(r) = reader {
                r.abort();
            }
            match result {
                Ok(()) => return, // sender dropped: the link is no longer wanted
                Err(e) => tracing::debug!(%address, error = %e, "link failed; reconnecting"),
            }
        }
    });
    tx
}
