//! The final report: built from the client results, printed for people or as JSON.

use std::io::Write;

use serde::Serialize;

use crate::client::publisher::PublisherResult;
use crate::client::subscriber::SubscriberResult;
use crate::clock::CpuTime;
use crate::scenario::topology::Topology;
use crate::stats::{Latency, LatencySummary, SeqTracker, StreamCounts};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub mqtt_version: String,
    /// Connections over TLS (`--tls`).
    pub tls: bool,
    pub qos: Vec<u8>,
    pub payload_bytes: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub placement: String,
    pub brokers: Vec<BrokerUse>,
    pub topic_prefix: String,
    /// From the start signal to the end of the drain.
    pub elapsed_s: f64,
    /// From the start signal to the last message written.
    pub send_s: f64,
    /// From the start signal (for `offline`: the reconnect) to the last new message received.
    pub receive_s: f64,
    pub sent: u64,
    /// QoS 1/2 handshakes completed (PUBACK / PUBCOMP).
    pub acked: u64,
    /// Acks carrying a failure reason code.
    pub rejected: u64,
    pub send_rate: f64,
    /// Distinct messages received per second (deliveries: a fan-out counts each copy).
    pub receive_rate: f64,
    /// Over all streams.
    pub totals: StreamCounts,
    /// Messages without a petrel-bench stamp.
    pub foreign: u64,
    /// Distinct messages a receiver got from a publisher it should not hear.
    pub misrouted: u64,
    /// True if the drain ended on its idle deadline, not because everything arrived.
    pub drain_timed_out: bool,
    pub latency: LatencySummary,
    pub by_qos: Vec<QosRow>,
    pub streams: Vec<StreamRow>,
    pub publisher_results: Vec<PublisherRow>,
    pub connects: Option<ConnectStats>,
    pub offline: Option<OfflineStats>,
    pub cpu: CpuReport,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerUse {
    pub addr: String,
    pub publishers: usize,
    pub subscribers: usize,
    /// Idle connections (`conn`).
    pub connections: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct QosRow {
    pub qos: u8,
    pub streams: usize,
    #[serde(flatten)]
    pub counts: StreamCounts,
    pub latency: LatencySummary,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamRow {
    pub publisher: u32,
    pub receiver: String,
    pub qos: u8,
    #[serde(flatten)]
    pub counts: StreamCounts,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PublisherRow {
    pub id: u32,
    pub qos: u8,
    pub broker: String,
    pub sent: u64,
    pub acked: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectStats {
    pub attempted: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Succeeded connections per second over the connect phase.
    pub per_sec: f64,
    pub connect_phase_s: f64,
    /// Connections the broker closed while they were held idle.
    pub dropped: u64,
    /// TCP connect + CONNECT + CONNACK.
    pub latency: LatencySummary,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct OfflineStats {
    /// Messages published while the subscribers were away (all acknowledged by the broker).
    pub published_while_offline: u64,
    pub sessions_resumed: u64,
    pub sessions_not_present: u64,
    /// Reconnect to last message received.
    pub drain_s: f64,
    pub drain_rate: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuReport {
    #[serde(flatten)]
    pub time: CpuTime,
    /// CPU seconds per wall second (1.0 = one core busy).
    pub utilisation: f64,
    /// Generator CPU seconds per million messages (sent + received).
    pub per_million_messages: f64,
}

impl CpuReport {
    pub fn new(time: CpuTime, wall_s: f64, messages: u64) -> CpuReport {
        let utilisation = if wall_s > 0.0 {
            time.total_s / wall_s
        } else {
            0.0
        };
        let per_million_messages = if messages > 0 {
            time.total_s * 1e6 / messages as f64
        } else {
            0.0
        };
        CpuReport {
            time,
            utilisation,
            per_million_messages,
        }
    }
}

pub fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Fills the message accounting of `report` from the client results.
pub fn account(
    report: &mut Report,
    topo: &Topology,
    brokers: &[String],
    pubs: &[PublisherResult],
    subs: &[SubscriberResult],
) {
    for p in pubs {
        report.sent += p.sent;
        report.acked += p.completed;
        report.rejected += p.rejected;
        let broker = topo
            .publishers
            .get(p.id as usize)
            .map(|pl| brokers[pl.broker].clone())
            .unwrap_or_default();
        report.publisher_results.push(PublisherRow {
            id: p.id,
            qos: p.qos,
            broker,
            sent: p.sent,
            acked: p.completed,
        });
        report.errors.extend(p.error.clone());
    }
    let sent_of = |id: u32| pubs.iter().find(|p| p.id == id).map_or(0, |p| p.sent);
    let mut latency: [Option<Latency>; 3] = Default::default();
    for s in subs {
        report.foreign += s.foreign;
        report.errors.extend(s.error.clone());
        for (q, h) in s.latency.iter().enumerate() {
            if let Some(h) = h {
                latency[q].get_or_insert_with(Latency::new).merge(h);
            }
        }
    }
    for (ri, receiver) in topo.receivers.iter().enumerate() {
        let members: Vec<&SubscriberResult> = subs
            .iter()
            .filter(|s| {
                topo.subscribers
                    .get(s.id as usize)
                    .is_some_and(|p| p.receiver == ri)
            })
            .collect();
        let seen = members.iter().map(|m| m.streams.len()).max().unwrap_or(0);
        let expected_ids = receiver.publishers.clone().unwrap_or_default();
        let top = seen.max(
            expected_ids
                .iter()
                .map(|&p| p as usize + 1)
                .max()
                .unwrap_or(0),
        );
        for pid in 0..top as u32 {
            let mut merged: Option<(SeqTracker, u8)> = None;
            for m in &members {
                if let Some(Some(st)) = m.streams.get(pid as usize) {
                    match &mut merged {
                        Some((t, _)) => t.merge(&st.tracker),
                        None => merged = Some((st.tracker.clone(), st.qos)),
                    }
                }
            }
            let wanted = expected_ids.contains(&pid);
            if merged.is_none() && !wanted {
                continue;
            }
            let expected = match &receiver.publishers {
                None => None,
                Some(_) if wanted => Some(sent_of(pid)),
                Some(_) => Some(0),
            };
            let (tracker, seen_qos) = merged.unwrap_or_default();
            let counts = tracker.counts(expected);
            if expected == Some(0) {
                report.misrouted += counts.distinct;
            }
            let qos = topo
                .publishers
                .get(pid as usize)
                .map_or(seen_qos, |p| p.qos);
            report.streams.push(StreamRow {
                publisher: pid,
                receiver: receiver.label.clone(),
                qos,
                counts,
            });
        }
    }
    for q in 0..3u8 {
        let rows: Vec<&StreamRow> = report.streams.iter().filter(|r| r.qos == q).collect();
        if rows.is_empty() {
            continue;
        }
        let mut counts = StreamCounts::default();
        rows.iter().for_each(|r| counts.add(&r.counts));
        let summary = latency[usize::from(q)]
            .as_ref()
            .map(Latency::summary)
            .unwrap_or_default();
        report.by_qos.push(QosRow {
            qos: q,
            streams: rows.len(),
            counts,
            latency: summary,
        });
        report.totals.add(&counts);
    }
    let mut all = Latency::new();
    latency.iter().flatten().for_each(|h| all.merge(h));
    report.latency = all.summary();
}

impl Report {
    /// 2 when `--check` fails: a client failed, a QoS 1/2 message was lost, a QoS 2 one
    /// duplicated, or a message reached the wrong receiver.
    pub fn check_failures(&self) -> Vec<String> {
        let mut bad: Vec<String> = self.errors.iter().map(|e| format!("error: {e}")).collect();
        for row in &self.by_qos {
            if row.qos >= 1 && row.counts.lost > 0 {
                bad.push(format!("QoS {}: {} lost", row.qos, row.counts.lost));
            }
            if row.qos == 2 && row.counts.duplicates > 0 {
                bad.push(format!("QoS 2: {} duplicates", row.counts.duplicates));
            }
        }
        if self.misrouted > 0 {
            bad.push(format!("{} misrouted", self.misrouted));
        }
        bad
    }

    pub fn write_json(&self, out: &mut impl Write) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        writeln!(out)
    }

    pub fn write_human(&self, out: &mut impl Write) -> std::io::Result<()> {
        let brokers: Vec<String> = self
            .brokers
            .iter()
            .map(|b| match b.connections {
                0 => format!("{} ({}p/{}s)", b.addr, b.publishers, b.subscribers),
                n => format!("{} ({n} conns)", b.addr),
            })
            .collect();
        let over = if self.tls { " over TLS" } else { "" };
        match &self.connects {
            Some(c) => writeln!(
                out,
                "petrel-bench {}: {} connections, MQTT {}{over}",
                self.scenario, c.attempted, self.mqtt_version
            )?,
            None => writeln!(
                out,
                "petrel-bench {}: {} publishers, {} subscribers, QoS {:?}, {} B payloads, MQTT {}{over}",
                self.scenario,
                self.publishers,
                self.subscribers,
                self.qos,
                self.payload_bytes,
                self.mqtt_version
            )?,
        }
        writeln!(
            out,
            "  brokers ({}): {}",
            self.placement,
            brokers.join(", ")
        )?;
        if let Some(c) = &self.connects {
            writeln!(
                out,
                "  connects   {} ok, {} failed of {} in {:.2} s = {:.0} conn/s; {} dropped while idle",
                c.succeeded, c.failed, c.attempted, c.connect_phase_s, c.per_sec, c.dropped
            )?;
            write_latency(out, "  connect latency", &c.latency)?;
        }
        if self.publishers > 0 {
            writeln!(
                out,
                "  sent       {} msgs in {:.3} s = {:.0} msg/s (acked {}, rejected {})",
                self.sent, self.send_s, self.send_rate, self.acked, self.rejected
            )?;
        }
        if self.subscribers > 0 {
            let t = &self.totals;
            let expected = t.expected.map_or("?".into(), |e| e.to_string());
            writeln!(
                out,
                "  received   {} msgs in {:.3} s = {:.0} msg/s (expected {expected})",
                t.distinct, self.receive_s, self.receive_rate
            )?;
            writeln!(
                out,
                "  lost {}  duplicates {}  out-of-order {}  foreign {}  misrouted {}{}",
                t.lost,
                t.duplicates,
                t.out_of_order,
                self.foreign,
                self.misrouted,
                if self.drain_timed_out {
                    "  (drain timed out)"
                } else {
                    ""
                }
            )?;
            write_latency(out, "  latency", &self.latency)?;
            if self.by_qos.len() > 1 {
                for q in &self.by_qos {
                    let c = &q.counts;
                    writeln!(
                        out,
                        "  QoS {}: {} streams, received {} lost {} dup {} ooo {}",
                        q.qos, q.streams, c.distinct, c.lost, c.duplicates, c.out_of_order
                    )?;
                    write_latency(out, "    latency", &q.latency)?;
                }
            }
        }
        if let Some(o) = &self.offline {
            writeln!(
                out,
                "  offline    {} queued, {} sessions resumed ({} not present), drained in {:.3} s = {:.0} msg/s",
                o.published_while_offline, o.sessions_resumed, o.sessions_not_present, o.drain_s, o.drain_rate
            )?;
        }
        let cpu = &self.cpu;
        writeln!(
            out,
            "  generator CPU {:.2} s (user {:.2}, sys {:.2}) over {:.2} s = {:.0}% of a core, {:.2} s per million msgs",
            cpu.time.total_s,
            cpu.time.user_s,
            cpu.time.system_s,
            self.elapsed_s,
            cpu.utilisation * 100.0,
            cpu.per_million_messages
        )?;
        match self.errors.len() {
            0 => Ok(()),
            n => {
                writeln!(out, "  errors ({n}):")?;
                self.errors
                    .iter()
                    .take(10)
                    .try_for_each(|e| writeln!(out, "    {e}"))
            }
        }
    }
}

fn write_latency(out: &mut impl Write, label: &str, l: &LatencySummary) -> std::io::Result<()> {
    if l.count == 0 {
        return Ok(());
    }
    writeln!(
        out,
        "{label} us: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}  (mean {:.0}, n {})",
        l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us, l.count
    )
}
