//! Closing a connection so that its last words arrive.
//!
//! When the node closes a socket while bytes the client sent are still unread, the kernel
//! answers with a reset instead of a FIN. A client that is still writing (past its Receive
//! Maximum, an oversized packet, publishes racing a takeover) then gets a broken pipe on its
//! next write, and its stack may never read the DISCONNECT or CONNACK that says why. So the
//! node writes its last bytes, half-closes (FIN), then reads and discards whatever the client
//! still sends until the client closes too ([`LINGER`] at most, and at most a bounded number
//! of bytes), and only then drops the socket.
//!
//! ```text
//!  finish(): will, release the session (a takeover goes on at once) -> last bytes
//!  close():  write last bytes + shutdown(write)   within CLOSE_FLUSH
//!            read and discard until EOF           within LINGER and linger_bytes
//!            drop (the connection permits with it)
//! ```

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::ConnError;
use crate::codec::DecodeError;

/// How long a closing connection may spend writing its last bytes.
pub(super) const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// How long a closed connection keeps reading (and discarding) what the client still sends.
pub(super) const LINGER: Duration = Duration::from_secs(2);
/// How many bytes a lingering connection discards at most (besides an oversized packet).
pub(super) const LINGER_BYTES: usize = 64 * 1024;
/// Size of the discard buffer (allocated only while lingering).
const DISCARD_BUF: usize = 4096;

/// How much a connection closed for `e` discards at most: [`LINGER_BYTES`], plus the size of
/// an oversized packet it refused (0x95): the client is usually still writing that packet,
/// and reads the DISCONNECT only after it. Time bounds it too ([`LINGER`]).
pub(super) fn linger_bytes(e: &ConnError) -> usize {
    match e {
        ConnError::Decode(DecodeError::PacketTooLarge { size, .. }) => LINGER_BYTES + size,
        _ => LINGER_BYTES,
    }
}

/// Writes `last`, half-closes, and with `linger > 0` reads and discards up to `linger` bytes
/// until the client closes or [`LINGER`] passes. The caller drops the halves afterwards.
pub(super) async fn close<R, W>(reader: &mut R, writer: &mut W, last: &[u8], linger: usize)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let flushed = tokio::time::timeout(CLOSE_FLUSH, async {
        writer.write_all(last).await?;
        writer.shutdown().await
    })
    .await;
    if linger == 0 || !matches!(flushed, Ok(Ok(()))) {
        return;
    }
    let mut buf = vec![0u8; DISCARD_BUF];
    let mut left = linger;
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) if n >= left => return,
                Ok(n) => left -= n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn writes_half_closes_and_reads_until_eof() {
        let (ours, mut theirs) = duplex(1024);
        let (mut r, mut w) = tokio::io::split(ours);
        let peer = tokio::spawn(async move {
            // Still writing after the node has said goodbye.
            theirs.write_all(&[7u8; 300]).await.expect("write");
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).await.expect("read to the FIN");
            drop(theirs);
            got
        });
        close(&mut r, &mut w, b"bye", 64 * 1024).await;
        assert_eq!(peer.await.expect("peer"), b"bye");
    }

    #[tokio::test(start_paused = true)]
    async fn lingering_is_bounded_in_time() {
        let (ours, _theirs) = duplex(1024);
        let (mut r, mut w) = tokio::io::split(ours);
        let start = tokio::time::Instant::now();
        close(&mut r, &mut w, b"bye", 64 * 1024).await;
        assert_eq!(start.elapsed(), LINGER, "a silent client is given up on");
    }

    #[tokio::test]
    async fn lingering_is_bounded_in_bytes() {
        let (ours, mut theirs) = duplex(64 * 1024);
        let (mut r, mut w) = tokio::io::split(ours);
        let writer = tokio::spawn(async move {
            // Writes until the node drops its end.
            while theirs.write_all(&[1u8; 1024]).await.is_ok() {}
        });
        close(&mut r, &mut w, b"", 8 * 1024).await;
        drop((r, w));
        writer
            .await
            .expect("the writer stops once the node is gone");
    }
}
