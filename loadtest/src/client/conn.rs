//! One MQTT connection: the socket, a read buffer decoded in place and a write buffer that
//! collects a batch of packets before each write.
//!
//! With `--tls` a sans-IO `rustls::ClientConnection` sits between the buffers and the socket:
//! the loops stay readiness-based (`stream.ready()`, then [`Conn::try_read`] /
//! [`Conn::try_write`]); reads feed ciphertext to rustls and move the plaintext into `rbuf`,
//! writes move `wbuf` into rustls and push its records out. Records rustls still holds count
//! as pending output ([`Conn::wants_write`]).

use std::io::{self, Read as _, Write as _};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BytesMut};
use rustls::ClientConnection;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::codec::{self, kind, ConnAck, Connect, Frame, Version};
use super::tls::TlsOptions;

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
    /// TLS to the broker (one configuration shared by the run's connections).
    pub tls: Option<TlsOptions>,
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
    /// The TLS session when connected with `--tls`: plaintext goes through it.
    tls: Option<Box<ClientConnection>>,
    pub(crate) rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
    /// Bytes asked of the socket per read: small for idle connections.
    read_chunk: usize,
    pub version: Version,
    pub connack: ConnAck,
}

impl Conn {
    /// TCP connect, TLS handshake (with `opts.tls`), CONNECT, and wait for a successful
    /// CONNACK, all within the connect timeout. `buf_capacity` sizes both buffers (small for
    /// idle connections).
    pub async fn connect(
        addr: &str,
        opts: &ClientOptions,
        buf_capacity: usize,
    ) -> anyhow::Result<Conn> {
        let limit = opts.connect_timeout;
        let deadline = Instant::now() + limit;
        let open = Self::open(addr, opts, buf_capacity);
        let mut conn =
            tokio::time::timeout_at(deadline, open)
                .await
                .map_err(|_| match opts.tls {
                    Some(_) => anyhow!(
                    "connect to {addr}: TCP connect and TLS handshake not done within {limit:?}"
                ),
                    None => anyhow!("connect to {addr}: TCP connect not done within {limit:?}"),
                })??;
        tokio::time::timeout_at(deadline, conn.mqtt_connect(addr, opts))
            .await
            .map_err(|_| anyhow!("connect to {addr}: no CONNACK within {limit:?}"))??;
        Ok(conn)
    }

    /// The TCP connection and, with TLS, the completed handshake.
    async fn open(addr: &str, opts: &ClientOptions, buf_capacity: usize) -> anyhow::Result<Conn> {
        let tls = match &opts.tls {
            Some(t) => {
                let name = t.server_name_for(addr)?;
                let session = ClientConnection::new(t.config.clone(), name)
                    .with_context(|| format!("start a TLS session to {addr}"))?;
                Some(Box::new(session))
            }
            None => None,
        };
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        let mut conn = Conn {
            stream,
            tls,
            rbuf: BytesMut::with_capacity(buf_capacity),
            wbuf: BytesMut::with_capacity(buf_capacity),
            read_chunk: buf_capacity.clamp(64, READ_CHUNK),
            version: opts.version,
            connack: ConnAck::default(),
        };
        if conn.tls.is_some() {
            conn.handshake()
                .await
                .with_context(|| format!("TLS handshake with {addr}"))?;
        }
        Ok(conn)
    }

    /// Drives the TLS handshake to its end (the last flight may still be buffered).
    async fn handshake(&mut self) -> anyhow::Result<()> {
        loop {
            self.try_write()?;
            let handshaking = self.tls.as_ref().is_some_and(|t| t.is_handshaking());
            if !handshaking {
                return Ok(());
            }
            let ready = self.stream.ready(self.interest()).await?;
            if ready.is_readable() && self.try_read()? == Read::Closed {
                bail!(
                    "the broker closed the connection during the handshake (not a TLS listener?)"
                );
            }
        }
    }

    /// CONNECT, then a successful CONNACK.
    async fn mqtt_connect(&mut self, addr: &str, opts: &ClientOptions) -> anyhow::Result<()> {
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
        codec::encode_connect(&mut self.wbuf, &connect);
        self.flush()
            .await
            .with_context(|| format!("send CONNECT to {addr}"))?;
        let f = self
            .read_frame()
            .await
            .with_context(|| format!("wait for CONNACK from {addr}"))?;
        if f.kind != kind::CONNACK {
            bail!("expected CONNACK from {addr}, got packet type {}", f.kind);
        }
        let ack =
            codec::parse_connack(opts.version, f.body(&self.rbuf)).context("decode CONNACK")?;
        self.rbuf.advance(f.packet_len());
        if ack.code != 0 {
            let why = ack.reason_string.as_deref().unwrap_or("");
            bail!(
                "{addr} refused client {}: CONNACK code 0x{:02x} {why}",
                opts.client_id,
                ack.code
            );
        }
        self.connack = ack;
        Ok(())
    }

    /// The keep-alive in force: the v5 Server Keep Alive if the server sent one.
    pub fn keepalive(&self, asked: u16) -> Option<Duration> {
        let secs = self.connack.server_keepalive.unwrap_or(asked);
        (secs > 0).then(|| Duration::from_secs(u64::from(secs)))
    }

    /// True while anything is waiting to go out: packets in the write buffer, or TLS
    /// records rustls has not written yet. Loops ask for WRITABLE while this holds.
    pub fn wants_write(&self) -> bool {
        !self.wbuf.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// READABLE, plus WRITABLE while output is pending.
    pub fn interest(&self) -> Interest {
        if self.wants_write() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }

    /// Writes everything pending (the write buffer and rustls's records).
    pub async fn flush(&mut self) -> io::Result<()> {
        loop {
            self.try_write()?;
            if !self.wants_write() {
                return Ok(());
            }
            self.stream.writable().await?;
        }
    }

    /// Waits for one complete packet in the read buffer (the caller consumes it).
    pub async fn read_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(f) = codec::frame(&self.rbuf, MAX_INBOUND)? {
                return Ok(f);
            }
            self.stream.readable().await?;
            if self.try_read()? == Read::Closed {
                bail!("connection closed by the broker");
            }
        }
    }

    /// Reads what the socket has without waiting (up to about four chunks).
    pub fn try_read(&mut self) -> io::Result<Read> {
        if self.tls.is_some() {
            return self.try_read_tls();
        }
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

    /// [`Conn::try_read`] through TLS: ciphertext into rustls (about four chunks, rustls
    /// reads at most a record's worth at a time), plaintext out into the read buffer.
    fn try_read_tls(&mut self) -> io::Result<Read> {
        let mut budget = 4 * self.read_chunk;
        let Conn {
            stream, tls, rbuf, ..
        } = self;
        let tls = tls.as_mut().expect("called with a TLS session");
        let mut got = Read::Empty;
        loop {
            let eof = match tls.read_tls(&mut Socket(stream)) {
                Ok(0) => true,
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            let state = match tls.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    // Best effort: the alert rustls queued tells the broker why.
                    let _ = tls.write_tls(&mut Socket(stream));
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            };
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let len = rbuf.len();
                rbuf.resize(len + n, 0);
                let moved = tls.reader().read(&mut rbuf[len..])?;
                rbuf.truncate(len + moved);
                got = Read::Data;
            }
            if eof || state.peer_has_closed() {
                return Ok(Read::Closed);
            }
            if budget == 0 {
                break;
            }
        }
        Ok(got)
    }

    /// Writes as much as the socket takes without waiting: the write buffer, or with TLS the
    /// write buffer moved into rustls and its records.
    pub fn try_write(&mut self) -> io::Result<()> {
        let Conn {
            stream, tls, wbuf, ..
        } = self;
        let Some(tls) = tls else {
            while !wbuf.is_empty() {
                match stream.try_write(wbuf) {
                    Ok(n) => wbuf.advance(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            return Ok(());
        };
        loop {
            if !wbuf.is_empty() {
                // rustls takes what fits its outgoing buffer (64 KiB), the rest stays here.
                let n = tls.writer().write(wbuf)?;
                wbuf.advance(n);
            }
            if !tls.wants_write() {
                return Ok(());
            }
            match tls.write_tls(&mut Socket(stream)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends DISCONNECT and waits (up to `wait`) for the broker to close the socket, so the
    /// session is known to be offline when this returns. In v5 `expire_session` ends it.
    pub async fn disconnect(mut self, expire_session: bool, wait: Duration) -> anyhow::Result<()> {
        codec::encode_disconnect(&mut self.wbuf, self.version, expire_session);
        self.flush().await.context("send DISCONNECT")?;
        let drain = async {
            loop {
                self.rbuf.clear();
                self.stream.readable().await?;
                if self.try_read()? == Read::Closed {
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

/// The non-blocking socket as `io::Read` / `io::Write` for rustls: `WouldBlock` passes
/// through (and clears tokio's readiness, as the plain path does).
struct Socket<'a>(&'a TcpStream);

impl io::Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl io::Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
