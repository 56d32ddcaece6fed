//! A TCP client that writes hand-made bytes and frames what comes back.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::pkt::{self, kind, read_varint, PropValue};
use crate::wait::WAIT;

/// One framed packet from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPacket {
    /// Packet type (upper nibble of the first byte).
    pub kind: u8,
    /// Lower nibble of the first byte.
    pub flags: u8,
    pub body: Vec<u8>,
}

/// Result of reading from a [`RawClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawRead {
    Packet(RawPacket),
    /// EOF or connection reset.
    Closed,
    Timeout,
}

/// A decoded PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPublish {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub properties: Vec<(u8, PropValue)>,
    pub payload: Vec<u8>,
}

impl RawPacket {
    fn u16_at(&self, i: usize) -> u16 {
        assert!(self.body.len() >= i + 2, "packet too short: {self:?}");
        u16::from_be_bytes([self.body[i], self.body[i + 1]])
    }

    /// CONNACK: (session present, return/reason code).
    pub fn connack(&self) -> (bool, u8) {
        assert_eq!(self.kind, kind::CONNACK, "expected CONNACK, got {self:?}");
        assert!(self.body.len() >= 2, "short CONNACK {self:?}");
        (self.body[0] & 1 == 1, self.body[1])
    }

    /// Properties of a v5 CONNACK.
    pub fn connack_props(&self) -> Vec<(u8, PropValue)> {
        assert_eq!(self.kind, kind::CONNACK, "expected CONNACK, got {self:?}");
        self.props_at(2)
    }

    /// Reason code of a DISCONNECT (0x00 when the body is empty).
    pub fn disconnect_reason(&self) -> u8 {
        assert_eq!(
            self.kind,
            kind::DISCONNECT,
            "expected DISCONNECT, got {self:?}"
        );
        self.body.first().copied().unwrap_or(0)
    }

    /// Properties of a v5 DISCONNECT.
    pub fn disconnect_props(&self) -> Vec<(u8, PropValue)> {
        assert_eq!(
            self.kind,
            kind::DISCONNECT,
            "expected DISCONNECT, got {self:?}"
        );
        if self.body.len() < 2 {
            return Vec::new();
        }
        self.props_at(1)
    }

    /// Packet identifier of an ack, SUBACK or UNSUBACK.
    pub fn pkid(&self) -> u16 {
        self.u16_at(0)
    }

    /// Reason code of a v5 PUBACK/PUBREC/PUBREL/PUBCOMP (0 when omitted).
    pub fn ack_reason(&self) -> u8 {
        self.body.get(2).copied().unwrap_or(0)
    }

    /// SUBACK codes; `v5` skips the property block.
    pub fn suback_codes(&self, v5: bool) -> Vec<u8> {
        assert_eq!(self.kind, kind::SUBACK, "expected SUBACK, got {self:?}");
        if v5 {
            let (len, n) = read_varint(&self.body[2..]).expect("SUBACK property length");
            self.body[2 + n + len..].to_vec()
        } else {
            self.body[2..].to_vec()
        }
    }

    /// Properties of a v5 SUBACK.
    pub fn suback_props(&self) -> Vec<(u8, PropValue)> {
        assert_eq!(self.kind, kind::SUBACK, "expected SUBACK, got {self:?}");
        self.props_at(2)
    }

    fn props_at(&self, i: usize) -> Vec<(u8, PropValue)> {
        let (len, n) = read_varint(&self.body[i..]).expect("property length");
        pkt::parse_props(&self.body[i + n..i + n + len])
            .unwrap_or_else(|e| panic!("bad properties in {self:?}: {e}"))
    }

    /// Decodes a PUBLISH; `v5` parses the property block.
    pub fn publish(&self, v5: bool) -> RawPublish {
        assert_eq!(self.kind, kind::PUBLISH, "expected PUBLISH, got {self:?}");
        let tlen = self.u16_at(0) as usize;
        let topic = String::from_utf8(self.body[2..2 + tlen].to_vec()).expect("UTF-8 topic");
        let qos = (self.flags >> 1) & 3;
        let mut i = 2 + tlen;
        let pkid = if qos > 0 {
            i += 2;
            self.u16_at(i - 2)
        } else {
            0
        };
        let properties = if v5 {
            let (len, n) = read_varint(&self.body[i..]).expect("property length");
            let p = pkt::parse_props(&self.body[i + n..i + n + len]).expect("publish properties");
            i += n + len;
            p
        } else {
            Vec::new()
        };
        RawPublish {
            topic,
            qos,
            retain: self.flags & 1 == 1,
            dup: self.flags & 8 == 8,
            pkid,
            properties,
            payload: self.body[i..].to_vec(),
        }
    }
}

/// A TCP connection speaking hand-made bytes.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
    /// The error that closed the connection (a reset, a broken pipe); `None` after a clean
    /// EOF or while open.
    close_error: Option<std::io::ErrorKind>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect {addr}: timed out"))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        RawClient {
            stream,
            buf: Vec::new(),
            closed: false,
            close_error: None,
        }
    }

    /// Connects and completes a CONNECT/CONNACK exchange, asserting success.
    pub async fn handshake(addr: SocketAddr, connect: &pkt::Connect) -> (RawClient, RawPacket) {
        let mut c = RawClient::connect(addr).await;
        c.send(&connect.encode()).await;
        let ack = c.expect_packet(WAIT, "CONNACK").await;
        let (_, code) = ack.connack();
        assert_eq!(code, 0, "CONNACK code for {connect:?}: {ack:?}");
        (c, ack)
    }

    /// Writes bytes; a write error (the broker closed) is ignored, later reads see `Closed`
    /// (like a client stack that gives up on a connection whose write failed, without
    /// reading what the broker sent before closing).
    pub async fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes).await {
            self.closed = true;
            self.close_error.get_or_insert(e.kind());
        }
    }

    /// The error that ended the connection (a reset, a broken pipe on a write); `None`
    /// while it is open or after the broker closed it cleanly (EOF).
    pub fn close_error(&self) -> Option<std::io::ErrorKind> {
        self.close_error
    }

    /// Half-closes the connection (sends FIN) and keeps reading possible.
    pub async fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    fn frame(&mut self) -> Option<RawPacket> {
        if self.buf.is_empty() {
            return None;
        }
        let (len, n) = read_varint(&self.buf[1..])?;
        if self.buf.len() < 1 + n + len {
            return None;
        }
        let first = self.buf[0];
        let body = self.buf[1 + n..1 + n + len].to_vec();
        self.buf.drain(..1 + n + len);
        Some(RawPacket {
            kind: first >> 4,
            flags: first & 0x0f,
            body,
        })
    }

    /// The next packet, `Closed` on EOF/reset, or `Timeout`.
    pub async fn read(&mut self, within: Duration) -> RawRead {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.frame() {
                return RawRead::Packet(p);
            }
            if self.closed {
                return RawRead::Closed;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return RawRead::Timeout,
                Ok(Ok(0)) => self.closed = true,
                Ok(Err(e)) => {
                    self.closed = true;
                    self.close_error.get_or_insert(e.kind());
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next packet; panics on close or timeout.
    pub async fn expect_packet(&mut self, within: Duration, what: &str) -> RawPacket {
        match self.read(within).await {
            RawRead::Packet(p) => p,
            other => panic!("raw client: expected {what}, got {other:?}"),
        }
    }

    /// The next packet of `kind`, skipping others (returned in the second element).
    pub async fn expect_kind(&mut self, k: u8, within: Duration) -> (RawPacket, Vec<RawPacket>) {
        let deadline = Instant::now() + within;
        let mut skipped = Vec::new();
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                RawRead::Packet(p) if p.kind == k => return (p, skipped),
                RawRead::Packet(p) => skipped.push(p),
                other => {
                    panic!("raw client: expected packet type {k}, got {other:?} after {skipped:?}")
                }
            }
        }
    }

    /// Reads until the broker closes the connection; returns the packets received first.
    /// Panics if the connection is still open after `within`.
    pub async fn expect_closed(&mut self, within: Duration) -> Vec<RawPacket> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                RawRead::Packet(p) => got.push(p),
                RawRead::Closed => return got,
                RawRead::Timeout => {
                    panic!("raw client: connection still open after {within:?}; received {got:?}")
                }
            }
        }
    }

    /// Asserts nothing arrives and the connection stays open for `within`.
    pub async fn expect_silence(&mut self, within: Duration) {
        match self.read(within).await {
            RawRead::Timeout => {}
            other => panic!("raw client: expected silence for {within:?}, got {other:?}"),
        }
    }

    /// Sends PINGREQ and expects PINGRESP (skipping nothing): proves the connection is alive,
    /// and is the marker of a raw connection: what the broker was going to send before it
    /// read the PINGREQ (say a PUBLISH queued earlier) arrives first and fails the check.
    pub async fn ping(&mut self) {
        self.send(&pkt::pingreq()).await;
        let p = self.expect_packet(WAIT, "PINGRESP").await;
        assert_eq!(p.kind, kind::PINGRESP, "expected PINGRESP, got {p:?}");
    }
}
