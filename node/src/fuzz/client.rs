//! One in-process client: an in-memory socket to a real `connection::serve`, the bytes it has
//! queued, and a reader task that keeps taking what the broker writes (so the broker never
//! waits for the client to read).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::script::{encode, Flush};
use super::view::View;
use crate::broker::Broker;
use crate::codec::{Packet, Protocol};
use crate::connection::{self, ConnInfo};
use crate::limit::{Permits, Refusal};
use crate::listener::Kind;

/// How long the broker may take to answer, read or close before the case fails.
pub(super) const DEADLINE: Duration = Duration::from_secs(5);

/// What the broker runs a connection with.
pub(super) struct Server<'a> {
    pub broker: &'a Arc<Broker>,
    pub cancel: &'a CancellationToken,
    pub tracker: &'a TaskTracker,
    pub permits: &'a Arc<Semaphore>,
    pub socket_buffer: usize,
}

#[derive(Default)]
struct Inbox {
    state: Mutex<(BytesMut, bool)>,
    changed: Notify,
}

pub(super) struct Client {
    pub slot: usize,
    writer: Option<WriteHalf<DuplexStream>>,
    inbox: Arc<Inbox>,
    reader: JoinHandle<()>,
    pending: Vec<u8>,
    pub eof: bool,
    pub view: View,
}

impl Client {
    /// Connects to a new `connection::serve` task (nothing is sent yet).
    pub fn open(
        slot: usize,
        server: &Server<'_>,
        refused: Option<Refusal>,
        cert_cn: bool,
        view: View,
    ) -> Client {
        let (ours, theirs) = tokio::io::duplex(server.socket_buffer);
        let info = ConnInfo {
            listener: Kind::Mqtt,
            cert_cn: cert_cn.then(|| "cn".to_owned()),
            refused,
        };
        let permit = server
            .permits
            .clone()
            .try_acquire_owned()
            .expect("a permit per connection");
        let peer = SocketAddr::from(([127, 0, 0, 1], 40_000 + slot as u16));
        server.tracker.spawn(connection::serve(
            theirs,
            peer,
            info,
            server.broker.clone(),
            server.cancel.clone(),
            server.tracker.clone(),
            Permits::one(permit),
        ));
        let (r, w) = tokio::io::split(ours);
        let inbox = Arc::new(Inbox::default());
        Client {
            slot,
            writer: Some(w),
            reader: tokio::spawn(read_all(r, inbox.clone())),
            inbox,
            pending: Vec::new(),
            eof: false,
            view,
        }
    }

    /// Queues bytes the view cannot follow.
    pub fn queue_raw(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.view.lose_track();
            self.pending.extend_from_slice(bytes);
        }
    }

    /// Queues a packet, encoded for the connection's protocol.
    pub fn queue(&mut self, p: &Packet) {
        let wire = encode(p, self.protocol());
        if !wire.is_empty() {
            self.view.on_send(p);
            self.pending.extend(wire);
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.view.protocol().unwrap_or(Protocol::V5)
    }

    /// Writes what is queued, as `flush` says.
    pub async fn flush(&mut self, flush: &Flush) {
        let sizes: &[u8] = match flush {
            Flush::Later => return,
            Flush::Now => &[],
            Flush::Split(sizes) => sizes,
        };
        let data = std::mem::take(&mut self.pending);
        let mut rest = &data[..];
        for &n in sizes {
            let (chunk, after) = rest.split_at((n as usize).min(rest.len()));
            self.write(chunk).await;
            rest = after;
            tokio::task::yield_now().await;
        }
        self.write(rest).await;
    }

    async fn write(&mut self, bytes: &[u8]) {
        let Some(w) = &mut self.writer else { return };
        if bytes.is_empty() {
            return;
        }
        match tokio::time::timeout(DEADLINE, w.write_all(bytes)).await {
            Ok(Ok(())) => {}
            // The broker closed the connection: what is left goes nowhere.
            Ok(Err(_)) => self.writer = None,
            Err(_) => panic!(
                "slot {}: the broker read nothing for {DEADLINE:?} with bytes waiting",
                self.slot
            ),
        }
    }

    /// Takes what the broker wrote so far into the view, and sends the view's
    /// acknowledgements.
    pub async fn absorb(&mut self) {
        let (bytes, eof) = {
            let mut s = self.inbox.state.lock().expect("inbox lock");
            (s.0.split(), s.1)
        };
        let acks = self.view.feed(&bytes);
        if eof && !self.eof {
            self.eof = true;
            self.view.at_eof();
        }
        if !acks.is_empty() && !self.eof {
            for a in &acks {
                self.queue(a);
            }
            self.flush(&Flush::Now).await;
        }
    }

    /// Waits until `done` holds for the view or the broker closes the connection; false if
    /// neither happens within [`DEADLINE`].
    pub async fn wait_for<F>(&mut self, done: F) -> bool
    where
        F: Fn(&View) -> bool,
    {
        let deadline = Instant::now() + DEADLINE;
        let inbox = self.inbox.clone();
        loop {
            let changed = inbox.changed.notified();
            self.absorb().await;
            if done(&self.view) || self.eof {
                return true;
            }
            if timeout_at(deadline, changed).await.is_none() {
                return false;
            }
        }
    }

    /// Writes what is queued and closes the client's side; the reader goes on to the
    /// broker's end.
    pub async fn close(&mut self) {
        self.flush(&Flush::Now).await;
        if let Some(mut w) = self.writer.take() {
            let _ = w.shutdown().await;
        }
    }

    /// Drops both directions at once.
    pub fn abort(self) {
        self.reader.abort();
    }

    /// Waits until the broker has closed the connection.
    pub async fn wait_closed(&mut self) {
        if !self.wait_for(|_| false).await {
            panic!(
                "slot {}: the broker kept the connection open {DEADLINE:?} after the client \
                 closed it",
                self.slot
            );
        }
    }
}

async fn timeout_at<F: Future>(deadline: Instant, f: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, f).await.ok()
}

async fn read_all(mut r: ReadHalf<DuplexStream>, inbox: Arc<Inbox>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = r.read(&mut buf).await.unwrap_or(0);
        {
            let mut s = inbox.state.lock().expect("inbox lock");
            if n == 0 {
                s.1 = true;
            } else {
                s.0.extend_from_slice(&buf[..n]);
            }
        }
        inbox.changed.notify_one();
        if n == 0 {
            return;
        }
    }
}
