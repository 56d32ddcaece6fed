//! Scenarios: each subcommand becomes a [`Topology`] run by [`traffic`], or one of the
//! special phases of [`conn`] and [`offline`].

pub mod conn;
pub mod offline;
pub mod role;
pub mod settings;
pub mod topology;
pub mod traffic;

pub use settings::{Load, Settings};
pub use topology::Topology;

use crate::cli::Command;
use crate::report::Report;
use topology::Layout;

/// Runs one client scenario (every subcommand but `sink`).
pub async fn run(command: Command) -> anyhow::Result<Report> {
    match command {
        Command::Conn(a) => conn::run(Settings::new("conn", &a.common)?, &a).await,
        Command::Pub(a) => {
            let s = Settings::new("pub", &a.common)?;
            let topo = Topology::publishers_only(a.clients, &a.traffic.qos, &s.prefix, s.layout());
            traffic::run(s, Load::new(&a.traffic), topo).await
        }
        Command::Sub(a) => {
            let s = Settings::new("sub", &a.common)?;
            let filter = a.topic.clone().unwrap_or_else(|| format!("{}/#", s.prefix));
            let topo = Topology::subscribers_only(a.clients, &filter, a.qos, s.layout());
            traffic::run(s, Load::listen(&a), topo).await
        }
        Command::Fanin(a) => {
            let s = Settings::new("fanin", &a.common)?;
            let topo = Topology::fanin(a.publishers, &a.traffic.qos, &s.prefix, s.layout());
            traffic::run(s, Load::new(&a.traffic), topo).await
        }
        Command::Fanout(a) => {
            let s = Settings::new("fanout", &a.common)?;
            let topo = Topology::fanout(a.subscribers, &a.traffic.qos, &s.prefix, s.layout());
            traffic::run(s, Load::new(&a.traffic), topo).await
        }
        Command::P2p(a) => {
            let s = Settings::new("p2p", &a.common)?;
            let topo = Topology::p2p(a.clients, &a.traffic.qos, &s.prefix, s.layout());
            traffic::run(s, Load::new(&a.traffic), topo).await
        }
        Command::Shared(a) => {
            let s = Settings::new("shared", &a.common)?;
            let topo = Topology::shared(
                a.publishers,
                a.subscribers,
                &a.group,
                &a.traffic.qos,
                &s.prefix,
                s.layout(),
            );
            traffic::run(s, Load::new(&a.traffic), topo).await
        }
        Command::Offline(a) => {
            let s = Settings::new("offline", &a.common)?;
            let topo = Topology::many_to_each(
                a.publishers,
                a.subscribers,
                &a.traffic.qos,
                &s.prefix,
                s.layout(),
            );
            offline::run(s, Load::new(&a.traffic), topo).await
        }
        Command::Sink(_) => anyhow::bail!("sink is not a client scenario"),
    }
}

impl Settings {
    pub fn layout(&self) -> Layout {
        Layout {
            brokers: self.brokers.len(),
            placement: self.placement,
        }
    }
}
