//! rumqttc clients (3.1.1 and 5.0) whose event loops run in a task.
//!
//! The task forwards every event except pings into a channel and stops at the first error,
//! so a connection the broker closes stays closed (rumqttc would otherwise reconnect) and the
//! test sees why. Waiting for one kind of event keeps the others in a backlog, in order.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::wait::WAIT;

/// How long a graceful disconnect waits for the broker to close the connection.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

trait Terminal {
    fn terminal(&self) -> bool;
}

enum WaitError {
    Timeout,
    Ended(String),
}

struct EventQueue<E> {
    rx: mpsc::UnboundedReceiver<E>,
    backlog: VecDeque<E>,
}

impl<E: Terminal + Debug> EventQueue<E> {
    fn new(rx: mpsc::UnboundedReceiver<E>) -> Self {
        EventQueue {
            rx,
            backlog: VecDeque::new(),
        }
    }

    /// The first event (backlog first) that `pick` accepts; events skipped stay queued.
    async fn take<T>(
        &mut self,
        within: Duration,
        mut pick: impl FnMut(&E) -> Option<T>,
    ) -> Result<T, WaitError> {
        for i in 0..self.backlog.len() {
            if let Some(t) = pick(&self.backlog[i]) {
                self.backlog.remove(i);
                return Ok(t);
            }
            if self.backlog[i].terminal() {
                return Err(WaitError::Ended(format!("{:?}", self.backlog[i])));
            }
        }
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Err(WaitError::Timeout),
                Ok(None) => return Err(WaitError::Ended("event loop task ended".into())),
                Ok(Some(e)) => {
                    if let Some(t) = pick(&e) {
                        return Ok(t);
                    }
                    let end = e.terminal().then(|| format!("{e:?}"));
                    self.backlog.push_back(e);
                    if let Some(desc) = end {
                        return Err(WaitError::Ended(desc));
                    }
                }
            }
        }
    }

    fn describe_backlog(&self) -> String {
        let n = self.backlog.len();
        let shown: Vec<String> = self
            .backlog
            .iter()
            .skip(n.saturating_sub(8))
            .map(|e| format!("{e:?}"))
            .collect();
        format!("{n} unconsumed events, last: {shown:?}")
    }

    /// Like [`take`](Self::take) but panics with context on timeout or end of connection.
    async fn expect<T>(
        &mut self,
        who: &str,
        what: &str,
        within: Duration,
        pick: impl FnMut(&E) -> Option<T>,
    ) -> T {
        match self.take(within, pick).await {
            Ok(t) => t,
            Err(WaitError::Timeout) => panic!(
                "{who}: no {what} within {within:?} ({})",
                self.describe_backlog()
            ),
            Err(WaitError::Ended(why)) => {
                panic!("{who}: connection ended while waiting for {what}: {why}")
            }
        }
    }
}

/// The topic of a client's `n`th marker: under `$petrel-test/`, which no filter starting with
/// a wildcard matches (MQTT 4.7.2), so other clients' `#` subscriptions never see it.
fn marker_topic(client_id: &str, n: u32) -> String {
    let id: String = client_id
        .chars()
        .map(|c| if matches!(c, '+' | '#' | '/') { '_' } else { c })
        .collect();
    format!("$petrel-test/marker/{id}/{n}")
}

fn short_payload(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(&p[..p.len().min(64)]).into_owned();
    if p.len() > 64 {
        format!("{s}...({} bytes)", p.len())
    } else {
        s
    }
}

// ------------------------------------------------------------------------------------------
// MQTT 3.1.1

/// What a 3.1.1 client's event loop reported.
#[derive(Debug, Clone)]
pub enum V3Event {
    In(rumqttc::Packet),
    Out(rumqttc::Outgoing),
    /// The connection ended (the event loop's error).
    Closed(String),
}

impl Terminal for V3Event {
    fn terminal(&self) -> bool {
        matches!(self, V3Event::Closed(_))
    }
}

/// A connected rumqttc 3.1.1 client. Dropping it closes the socket without DISCONNECT.
pub struct V3Client {
    pub client: rumqttc::AsyncClient,
    pub connack: rumqttc::ConnAck,
    pub id: String,
    events: EventQueue<V3Event>,
    task: JoinHandle<()>,
    markers: u32,
}

impl Drop for V3Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V3Client {
    /// Connects with a clean session.
    pub async fn connect(addr: SocketAddr, id: &str) -> V3Client {
        Self::connect_with(addr, id, |_| {}).await
    }

    /// Connects after `configure` adjusted the options.
    pub async fn connect_with(
        addr: SocketAddr,
        id: &str,
        configure: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> V3Client {
        match Self::try_connect_with(addr, id, configure).await {
            Ok(c) => c,
            Err(e) => panic!("v3 client {id:?}: connect failed: {e}"),
        }
    }

    /// Connects; `Err` holds why the connection did not come up.
    pub async fn try_connect_with(
        addr: SocketAddr,
        id: &str,
        configure: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Result<V3Client, String> {
        use rumqttc::{Event, Outgoing, Packet};
        let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        configure(&mut opts);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PingResp))
                    | Ok(Event::Outgoing(Outgoing::PingReq)) => continue,
                    Ok(Event::Incoming(p)) => V3Event::In(p),
                    Ok(Event::Outgoing(o)) => V3Event::Out(o),
                    Err(e) => {
                        let _ = tx.send(V3Event::Closed(format!("{e} ({e:?})")));
                        break;
                    }
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        let mut events = EventQueue::new(rx);
        let got = events
            .take(WAIT, |e| match e {
                V3Event::In(Packet::ConnAck(c)) => Some(c.clone()),
                _ => None,
            })
            .await;
        match got {
            Ok(connack) => Ok(V3Client {
                client,
                connack,
                id: id.to_owned(),
                events,
                task,
                markers: 0,
            }),
            Err(WaitError::Timeout) => {
                task.abort();
                Err(format!("no CONNACK within {WAIT:?}"))
            }
            Err(WaitError::Ended(why)) => {
                task.abort();
                Err(why)
            }
        }
    }

    /// Subscribes to one filter and returns the granted code from the SUBACK.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: rumqttc::QoS,
    ) -> rumqttc::SubscribeReasonCode {
        self.subscribe_many(&[(filter, qos)]).await.remove(0)
    }

    /// Subscribes to several filters in one SUBSCRIBE and returns the SUBACK codes.
    pub async fn subscribe_many(
        &mut self,
        filters: &[(&str, rumqttc::QoS)],
    ) -> Vec<rumqttc::SubscribeReasonCode> {
        use rumqttc::{Outgoing, Packet, SubscribeFilter};
        let subs: Vec<SubscribeFilter> = filters
            .iter()
            .map(|(f, q)| SubscribeFilter::new((*f).to_owned(), *q))
            .collect();
        self.client
            .subscribe_many(subs)
            .await
            .expect("queue SUBSCRIBE");
        let who = self.who();
        let pkid = self
            .events
            .expect(&who, "outgoing SUBSCRIBE", WAIT, |e| match e {
                V3Event::Out(Outgoing::Subscribe(id)) => Some(*id),
                _ => None,
            })
            .await;
        let ack = self
            .events
            .expect(&who, "SUBACK", WAIT, |e| match e {
                V3Event::In(Packet::SubAck(a)) if a.pkid == pkid => Some(a.clone()),
                _ => None,
            })
            .await;
        assert_eq!(
            ack.return_codes.len(),
            filters.len(),
            "{who}: SUBACK code count"
        );
        ack.return_codes
    }

    /// Unsubscribes and waits for the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) {
        use rumqttc::{Outgoing, Packet};
        self.client
            .unsubscribe(filter)
            .await
            .expect("queue UNSUBSCRIBE");
        let who = self.who();
        let pkid = self
            .events
            .expect(&who, "outgoing UNSUBSCRIBE", WAIT, |e| match e {
                V3Event::Out(Outgoing::Unsubscribe(id)) => Some(*id),
                _ => None,
            })
            .await;
        self.events
            .expect(&who, "UNSUBACK", WAIT, |e| match e {
                V3Event::In(Packet::UnsubAck(a)) if a.pkid == pkid => Some(()),
                _ => None,
            })
            .await;
    }

    /// Publishes and waits for the flow to complete: written (QoS 0), PUBACK (QoS 1) or
    /// PUBCOMP (QoS 2). Returns the packet id.
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: rumqttc::QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> u16 {
        use rumqttc::{Outgoing, Packet, QoS};
        self.client
            .publish(topic, qos, retain, payload)
            .await
            .expect("queue PUBLISH");
        let who = self.who();
        let pkid = self
            .events
            .expect(&who, "outgoing PUBLISH", WAIT, |e| match e {
                V3Event::Out(Outgoing::Publish(id)) => Some(*id),
                _ => None,
            })
            .await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.events
                    .expect(&who, "PUBACK", WAIT, |e| match e {
                        V3Event::In(Packet::PubAck(a)) if a.pkid == pkid => Some(()),
                        _ => None,
                    })
                    .await
            }
            QoS::ExactlyOnce => {
                self.events
                    .expect(&who, "PUBCOMP", WAIT, |e| match e {
                        V3Event::In(Packet::PubComp(a)) if a.pkid == pkid => Some(()),
                        _ => None,
                    })
                    .await
            }
        }
        pkid
    }

    /// The next PUBLISH from the broker (within [`WAIT`]).
    pub async fn recv_publish(&mut self) -> rumqttc::Publish {
        self.recv_publish_within(WAIT).await
    }

    /// The next PUBLISH from the broker within `within`.
    pub async fn recv_publish_within(&mut self, within: Duration) -> rumqttc::Publish {
        let who = self.who();
        self.events
            .expect(&who, "PUBLISH", within, |e| match e {
                V3Event::In(rumqttc::Packet::Publish(p)) => Some(p.clone()),
                _ => None,
            })
            .await
    }

    /// `n` PUBLISH packets in arrival order.
    pub async fn recv_publishes(&mut self, n: usize) -> Vec<rumqttc::Publish> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.recv_publish().await);
        }
        out
    }

    /// The next PUBLISH if one arrives within `within`; panics if the connection ends.
    pub async fn try_recv_publish(&mut self, within: Duration) -> Option<rumqttc::Publish> {
        match self
            .events
            .take(within, |e| match e {
                V3Event::In(rumqttc::Packet::Publish(p)) => Some(p.clone()),
                _ => None,
            })
            .await
        {
            Ok(p) => Some(p),
            Err(WaitError::Timeout) => None,
            Err(WaitError::Ended(why)) => panic!("{}: connection ended: {why}", self.who()),
        }
    }

    /// Every PUBLISH the broker sends before a marker of this client's own.
    ///
    /// The client subscribes to a topic of its own under `$petrel-test/` (no filter starting
    /// with a wildcard matches it, so other clients never see it) at QoS 0, so nothing needs
    /// acknowledging, publishes the marker there at QoS 1 and collects what arrives
    /// first. A session's deliveries keep their order, so whatever the broker had queued for
    /// this client before the marker's PUBACK is in the result: a check that nothing else
    /// arrives needs no fixed waiting time.
    pub async fn publishes_before_marker(&mut self) -> Vec<rumqttc::Publish> {
        use rumqttc::QoS;
        self.markers += 1;
        let topic = marker_topic(&self.id, self.markers);
        self.subscribe(&topic, QoS::AtMostOnce).await;
        self.publish(&topic, QoS::AtLeastOnce, false, "marker")
            .await;
        let mut got = Vec::new();
        loop {
            let p = self.recv_publish().await;
            if p.topic == topic {
                return got;
            }
            got.push(p);
        }
    }

    /// Fails if any PUBLISH arrives before a marker (see [`publishes_before_marker`](Self::publishes_before_marker)).
    pub async fn assert_no_publish_before_marker(&mut self) {
        let got = self.publishes_before_marker().await;
        if let Some(p) = got.first() {
            panic!(
                "{}: unexpected PUBLISH on {:?}: {:?} (qos {:?}, retain {}); {} before the marker",
                self.who(),
                p.topic,
                short_payload(&p.payload),
                p.qos,
                p.retain,
                got.len()
            );
        }
    }

    /// Acknowledges a PUBLISH (with manual acks).
    pub async fn ack(&self, p: &rumqttc::Publish) {
        self.client.ack(p).await.expect("queue ack");
    }

    /// Waits until the connection ends and returns why.
    pub async fn wait_closed(&mut self, within: Duration) -> String {
        let who = self.who();
        self.events
            .expect(&who, "end of connection", within, |e| match e {
                V3Event::Closed(why) => Some(why.clone()),
                _ => None,
            })
            .await
    }

    /// Whether the connection has ended (without waiting).
    pub async fn is_closed(&mut self) -> bool {
        matches!(
            self.events
                .take(Duration::ZERO, |e| e.terminal().then_some(()))
                .await,
            Ok(()) | Err(WaitError::Ended(_))
        )
    }

    /// Sends DISCONNECT, then waits (briefly) for the broker to close the connection.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        let who = self.who();
        self.events
            .expect(&who, "outgoing DISCONNECT", WAIT, |e| match e {
                V3Event::Out(rumqttc::Outgoing::Disconnect) => Some(()),
                _ => None,
            })
            .await;
        // The client closes after DISCONNECT in any case; give the broker the chance first.
        let _ = self
            .events
            .take(CLOSE_WAIT, |e| e.terminal().then_some(()))
            .await;
    }

    /// Closes the socket without DISCONNECT (network failure from the broker's view).
    pub fn drop_connection(self) {
        drop(self);
    }

    fn who(&self) -> String {
        format!("v3 client {:?}", self.id)
    }
}

// ------------------------------------------------------------------------------------------
// MQTT 5

/// What a 5.0 client's event loop reported.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // test events, moved a few at a time
pub enum V5Event {
    In(p5::Packet),
    Out(rumqttc::Outgoing),
    /// The broker sent DISCONNECT.
    Disconnected(p5::DisconnectReasonCode, Option<String>),
    /// The connection ended otherwise (the event loop's error).
    Closed(String),
}

impl Terminal for V5Event {
    fn terminal(&self) -> bool {
        matches!(self, V5Event::Disconnected(..) | V5Event::Closed(_))
    }
}

/// A connected rumqttc 5.0 client. Dropping it closes the socket without DISCONNECT.
pub struct V5Client {
    pub client: rumqttc::v5::AsyncClient,
    pub connack: p5::ConnAck,
    pub id: String,
    events: EventQueue<V5Event>,
    task: JoinHandle<()>,
    markers: u32,
}

impl Drop for V5Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V5Client {
    /// Connects with clean start and no session expiry.
    pub async fn connect(addr: SocketAddr, id: &str) -> V5Client {
        Self::connect_with(addr, id, |_| {}).await
    }

    /// Connects after `configure` adjusted the options.
    pub async fn connect_with(
        addr: SocketAddr,
        id: &str,
        configure: impl FnOnce(&mut rumqttc::v5::MqttOptions),
    ) -> V5Client {
        match Self::try_connect_with(addr, id, configure).await {
            Ok(c) => c,
            Err(e) => panic!("v5 client {id:?}: connect failed: {e}"),
        }
    }

    /// Connects; `Err` holds why the connection did not come up.
    pub async fn try_connect_with(
        addr: SocketAddr,
        id: &str,
        configure: impl FnOnce(&mut rumqttc::v5::MqttOptions),
    ) -> Result<V5Client, String> {
        use rumqttc::v5::{ConnectionError, Event, StateError};
        use rumqttc::Outgoing;
        let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        configure(&mut opts);
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(p5::Packet::PingResp(_)))
                    | Ok(Event::Outgoing(Outgoing::PingReq)) => continue,
                    Ok(Event::Incoming(p)) => V5Event::In(p),
                    Ok(Event::Outgoing(o)) => V5Event::Out(o),
                    Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                        reason_code,
                        reason_string,
                    })) => {
                        let _ = tx.send(V5Event::Disconnected(reason_code, reason_string));
                        break;
                    }
                    Err(e) => {
                        let _ = tx.send(V5Event::Closed(format!("{e} ({e:?})")));
                        break;
                    }
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        let mut events = EventQueue::new(rx);
        let got = events
            .take(WAIT, |e| match e {
                V5Event::In(p5::Packet::ConnAck(c)) => Some(c.clone()),
                _ => None,
            })
            .await;
        match got {
            Ok(connack) => Ok(V5Client {
                client,
                connack,
                id: id.to_owned(),
                events,
                task,
                markers: 0,
            }),
            Err(WaitError::Timeout) => {
                task.abort();
                Err(format!("no CONNACK within {WAIT:?}"))
            }
            Err(WaitError::Ended(why)) => {
                task.abort();
                Err(why)
            }
        }
    }

    /// Properties of the CONNACK (default if none were sent).
    pub fn connack_props(&self) -> p5::ConnAckProperties {
        self.connack
            .properties
            .clone()
            .unwrap_or(p5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: None,
                max_qos: None,
                retain_available: None,
                max_packet_size: None,
                assigned_client_identifier: None,
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            })
    }

    /// Subscribes to one filter with default options.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS5) -> p5::SubscribeReasonCode {
        self.subscribe_with(vec![p5::Filter::new(filter, qos)], None)
            .await
            .remove(0)
    }

    /// Subscribes with explicit filter options and properties; returns the SUBACK codes.
    ///
    /// rumqttc ends the connection on a failure code, so use [`RawClient`](crate::RawClient)
    /// where a refusal is expected.
    pub async fn subscribe_with(
        &mut self,
        filters: Vec<p5::Filter>,
        props: Option<p5::SubscribeProperties>,
    ) -> Vec<p5::SubscribeReasonCode> {
        use rumqttc::Outgoing;
        let n = filters.len();
        match props {
            Some(props) => {
                self.client
                    .subscribe_many_with_properties(filters, props)
                    .await
            }
            None => self.client.subscribe_many(filters).await,
        }
        .expect("queue SUBSCRIBE");
        let who = self.who();
        let pkid = self
            .events
            .expect(&who, "outgoing SUBSCRIBE", WAIT, |e| match e {
                V5Event::Out(Outgoing::Subscribe(id)) => Some(*id),
                _ => None,
            })
            .await;
        let ack = self
            .events
            .expect(&who, "SUBACK", WAIT, |e| match e {
                V5Event::In(p5::Packet::SubAck(a)) if a.pkid == pkid => Some(a.clone()),
                _ => None,
            })
            .await;
        assert_eq!(ack.return_codes.len(), n, "{who}: SUBACK code count");
        ack.return_codes
    }

    /// Unsubscribes and waits for the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) {
        use rumqttc::Outgoing;
        self.client
            .unsubscribe(filter)
            .await
            .expect("queue UNSUBSCRIBE");
        let who = self.who();
        let pkid = self
            .events
            .expect(&who, "outgoing UNSUBSCRIBE", WAIT, |e| match e {
                V5Event::Out(Outgoing::Unsubscribe(id)) => Some(*id),
                _ => None,
            })
            .await;
        self.events
            .expect(&who, "UNSUBACK", WAIT, |e| match e {
                V5Event::In(p5::Packet::UnsubAck(a)) if a.pkid == pkid => Some(()),
                _ => None,
            })
            .await;
    }

    /// Publishes without properties; see [`publish_with`](Self::publish_with).
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: QoS5,
        retain: bool,
        payload: impl Into<bytes::Bytes>,
    ) -> u16 {
        self.publish_with(
            topic,
            qos,
            retain,
            payload,
            p5::PublishProperties::default(),
        )
        .await
    }

    /// Publishes and waits for the flow to complete: written (QoS 0), PUBACK (QoS 1) or
    /// PUBCOMP (QoS 2). Returns the packet id.
    pub async fn publish_with(
        &mut self,
        topic: &str,
        qos: QoS5,
        retain: bool,
        payload: impl Into<bytes::Bytes>,
        props: p5::PublishProperties,
    ) -> u16 {
        use rumqttc::Outgoing;
        self.client
            .publish_with_properties(topic, qos, retain, payload.into(), props)
            .await
            .expect("queue PUBLISH");
        let who = self.who();
        let pkid = self
            .events
            .expect(&who, "outgoing PUBLISH", WAIT, |e| match e {
                V5Event::Out(Outgoing::Publish(id)) => Some(*id),
                _ => None,
            })
            .await;
        match qos {
            QoS5::AtMostOnce => {}
            QoS5::AtLeastOnce => {
                self.events
                    .expect(&who, "PUBACK", WAIT, |e| match e {
                        V5Event::In(p5::Packet::PubAck(a)) if a.pkid == pkid => Some(()),
                        _ => None,
                    })
                    .await
            }
            QoS5::ExactlyOnce => {
                self.events
                    .expect(&who, "PUBCOMP", WAIT, |e| match e {
                        V5Event::In(p5::Packet::PubComp(a)) if a.pkid == pkid => Some(()),
                        _ => None,
                    })
                    .await
            }
        }
        pkid
    }

    /// The next PUBLISH from the broker (within [`WAIT`]).
    pub async fn recv_publish(&mut self) -> p5::Publish {
        self.recv_publish_within(WAIT).await
    }

    /// The next PUBLISH from the broker within `within`.
    pub async fn recv_publish_within(&mut self, within: Duration) -> p5::Publish {
        let who = self.who();
        self.events
            .expect(&who, "PUBLISH", within, |e| match e {
                V5Event::In(p5::Packet::Publish(p)) => Some(p.clone()),
                _ => None,
            })
            .await
    }

    /// `n` PUBLISH packets in arrival order.
    pub async fn recv_publishes(&mut self, n: usize) -> Vec<p5::Publish> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.recv_publish().await);
        }
        out
    }

    /// The next PUBLISH if one arrives within `within`; panics if the connection ends.
    pub async fn try_recv_publish(&mut self, within: Duration) -> Option<p5::Publish> {
        match self
            .events
            .take(within, |e| match e {
                V5Event::In(p5::Packet::Publish(p)) => Some(p.clone()),
                _ => None,
            })
            .await
        {
            Ok(p) => Some(p),
            Err(WaitError::Timeout) => None,
            Err(WaitError::Ended(why)) => panic!("{}: connection ended: {why}", self.who()),
        }
    }

    /// Every PUBLISH the broker sends before a marker of this client's own; see
    /// [`V3Client::publishes_before_marker`].
    pub async fn publishes_before_marker(&mut self) -> Vec<p5::Publish> {
        self.markers += 1;
        let topic = marker_topic(&self.id, self.markers);
        self.subscribe(&topic, QoS5::AtMostOnce).await;
        self.publish(&topic, QoS5::AtLeastOnce, false, "marker")
            .await;
        let mut got = Vec::new();
        loop {
            let p = self.recv_publish().await;
            if p.topic == topic.as_bytes() {
                return got;
            }
            got.push(p);
        }
    }

    /// Fails if any PUBLISH arrives before a marker (see [`publishes_before_marker`](Self::publishes_before_marker)).
    pub async fn assert_no_publish_before_marker(&mut self) {
        let got = self.publishes_before_marker().await;
        if let Some(p) = got.first() {
            panic!(
                "{}: unexpected PUBLISH on {:?}: {:?} (qos {:?}, retain {}); {} before the marker",
                self.who(),
                String::from_utf8_lossy(&p.topic),
                short_payload(&p.payload),
                p.qos,
                p.retain,
                got.len()
            );
        }
    }

    /// Acknowledges a PUBLISH (with manual acks).
    pub async fn ack(&self, p: &p5::Publish) {
        self.client.ack(p).await.expect("queue ack");
    }

    /// Waits for a DISCONNECT from the broker; panics if the connection ends without one.
    pub async fn wait_disconnect(
        &mut self,
        within: Duration,
    ) -> (p5::DisconnectReasonCode, Option<String>) {
        let who = self.who();
        let end = self
            .events
            .expect(&who, "end of connection", within, |e| {
                e.terminal().then(|| e.clone())
            })
            .await;
        match end {
            V5Event::Disconnected(code, reason) => (code, reason),
            other => panic!("{who}: connection ended without DISCONNECT: {other:?}"),
        }
    }

    /// Waits until the connection ends (DISCONNECT or not) and returns the final event.
    pub async fn wait_closed(&mut self, within: Duration) -> V5Event {
        let who = self.who();
        self.events
            .expect(&who, "end of connection", within, |e| {
                e.terminal().then(|| e.clone())
            })
            .await
    }

    /// Every PUBLISH received until the connection ends (which must happen within `within`).
    pub async fn publishes_until_closed(&mut self, within: Duration) -> Vec<p5::Publish> {
        let who = self.who();
        let mut got = Vec::new();
        self.events
            .expect(&who, "end of connection", within, |e| match e {
                V5Event::In(p5::Packet::Publish(p)) => {
                    got.push(p.clone());
                    None
                }
                e => e.terminal().then_some(()),
            })
            .await;
        got
    }

    /// Whether the connection has ended (without waiting).
    pub async fn is_closed(&mut self) -> bool {
        matches!(
            self.events
                .take(Duration::ZERO, |e| e.terminal().then_some(()))
                .await,
            Ok(()) | Err(WaitError::Ended(_))
        )
    }

    /// Sends DISCONNECT (reason 0x00), then waits (briefly) for the broker to close.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        let who = self.who();
        self.events
            .expect(&who, "outgoing DISCONNECT", WAIT, |e| match e {
                V5Event::Out(rumqttc::Outgoing::Disconnect) => Some(()),
                _ => None,
            })
            .await;
        let _ = self
            .events
            .take(CLOSE_WAIT, |e| e.terminal().then_some(()))
            .await;
    }

    /// Closes the socket without DISCONNECT (network failure from the broker's view).
    pub fn drop_connection(self) {
        drop(self);
    }

    fn who(&self) -> String {
        format!("v5 client {:?}", self.id)
    }
}
