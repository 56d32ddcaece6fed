//! One MQTT connection: the socket, a read buffer decoded in place and a write buffer that
//! collects a batch of packets before each write.

use std::io;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::codec::{self, kind, ConnAck, Connect, Frame, Version};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;
/// Largest packet accepted from the broker.
pub const MAX_INBOUND: usize = 16 * 1024 * 1024;

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub version: Version,
    pub client_id: String,
    pub clean: bool,
    pub keepalive_secs: u16,
    pub session_expiry_secs: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Duration,
}

/// What a non-blocking read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// New bytes are in the read buffer.
    Data,
    /// Nothing to read now.
    Empty,
    /// The broker closed the connection.
    Closed,
}

#[derive(Debug)]
pub struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
    /// Bytes asked of the socket per read: small for idle connections.
    read_chunk: usize,
    pub version: Version,
    pub connack: ConnAck,
}

impl Conn {
    /// TCP connect, CONNECT, and wait for a successful CONNACK, within the connect timeout.
    /// `buf_capacity` sizes both buffers (small for idle connections).
    pub async fn connect(
        addr: &str,
        opts: &ClientOptions,
        buf_capacity: usize,
    ) -> anyhow::Result<Conn> {
        let attempt = Self::connect_inner(addr, opts, buf_capacity);
        tokio::time::timeout(opts.connect_timeout, attempt)
            .await
            .map_err(|_| {
                anyhow!(
                    "connect to {addr}: no CONNACK within {:?}",
                    opts.connect_timeout
                )
            })?
    }

    async fn connect_inner(
        addr: &str,
        opts: &ClientOptions,
        buf_capacity: usize,
    ) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(buf_capacity),
            wbuf: BytesMut::with_capacity(buf_capacity),
            read_chunk: buf_capacity.clamp(64, READ_CHUNK),
            version: opts.version,
            connack: ConnAck::default(),
        };
        let connect = Connect {
            version: opts.version,
            client_id: &opts.client_id,
            clean: opts.clean,
            keepalive_secs: opts.keepalive_secs,
            session_expiry_secs: opts.session_expiry_secs,
            receive_maximum: opts.receive_maximum,
            username: opts.username.as_deref(),
            password: opts.password.as_deref(),
        };
        codec::encode_connect(&mut conn.wbuf, &connect);
        conn.flush()
            .await
            .with_context(|| format!("send CONNECT to {addr}"))?;
        let f = conn
            .read_frame()
            .await
            .with_context(|| format!("wait for CONNACK from {addr}"))?;
        if f.kind != kind::CONNACK {
            bail!("expected CONNACK from {addr}, got packet type {}", f.kind);
        }
        let ack =
            codec::parse_connack(opts.version, f.body(&conn.rbuf)).context("decode CONNACK")?;
        conn.rbuf.advance(f.packet_len());
        if ack.code != 0 {
            let why = ack.reason_string.as_deref().unwrap_or("");
            bail!(
                "{addr} refused client {}: CONNACK code 0x{:02x} {why}",
                opts.client_id,
                ack.code
            );
        }
        conn.connack = ack;
        Ok(conn)
    }

    /// The keep-alive in force: the v5 Server Keep Alive if the server sent one.
    pub fn keepalive(&self, asked: u16) -> Option<Duration> {
        let secs = self.connack.server_keepalive.unwrap_or(asked);
        (secs > 0).then(|| Duration::from_secs(u64::from(secs)))
    }

    /// Writes the whole write buffer.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        Ok(())
    }

    /// Waits for one complete packet in the read buffer (the caller consumes it).
    pub async fn read_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(f) = codec::frame(&self.rbuf, MAX_INBOUND)? {
                return Ok(f);
            }
            self.rbuf.reserve(self.read_chunk);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                bail!("connection closed by the broker");
            }
        }
    }

    /// Reads what the socket has without waiting (up to about four chunks).
    pub fn try_read(&mut self) -> io::Result<Read> {
        let mut got = Read::Empty;
        for _ in 0..4 {
            self.rbuf.reserve(self.read_chunk);
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => return Ok(Read::Closed),
                Ok(_) => got = Read::Data,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// Writes as much of the write buffer as the socket takes without waiting.
    pub fn try_write(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            match self.stream.try_write(&self.wbuf) {
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends DISCONNECT and waits (up to `wait`) for the broker to close the socket, so the
    /// session is known to be offline when this returns. In v5 `expire_session` ends it.
    pub async fn disconnect(mut self, expire_session: bool, wait: Duration) -> anyhow::Result<()> {
        codec::encode_disconnect(&mut self.wbuf, self.version, expire_session);
        self.flush().await.context("send DISCONNECT")?;
        let drain = async {
            loop {
                self.rbuf.clear();
                if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                    return Ok::<_, io::Error>(());
                }
            }
        };
        match tokio::time::timeout(wait, drain).await {
            Ok(r) => r.context("wait for the broker to close after DISCONNECT"),
            Err(_) => bail!("broker did not close the connection within {wait:?} of DISCONNECT"),
        }
    }
}
