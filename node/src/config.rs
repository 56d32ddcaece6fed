//! Node configuration: one serde tree and the rules for loading it.
//!
//! Sources, lowest precedence first:
//! 1. [`Config::default`], the zero-config node;
//! 2. the TOML file given by `--config`;
//! 3. generic environment variables `PETREL_<SECTION>__<FIELD>`, e.g.
//!    `PETREL_MQTT__MAX_QUEUED_MESSAGES=10`, then `PETREL_LOG` for `log.level`;
//! 4. command-line flags, applied by `main` after [`Config::load`].
//!
//! Unknown sections and keys are rejected in the file and in the environment. Every problem
//! found is reported, not only the first. `petrel.example.toml` (repository root) is the
//! canonical commented rendering of the defaults; a unit test keeps it equal to
//! [`Config::default`] and makes it name every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The commented default configuration, printed by `petrel --print-default-config`.
pub const EXAMPLE_TOML: &str = include_str!("../../petrel.example.toml");

/// Environment variable holding a tracing `EnvFilter` directive; overrides `log.level`.
pub const LOG_ENV: &str = "PETREL_LOG";

/// Prefix of the generic `PETREL_<SECTION>__<FIELD>` environment variables.
const ENV_PREFIX: &str = "PETREL_";
/// Separator between section and field in a generic environment variable name.
const ENV_SEPARATOR: &str = "__";

/// Smallest accepted `mqtt.max_packet_size_bytes`.
pub const MIN_PACKET_SIZE_BYTES: u32 = 32;
/// Largest MQTT packet: 268435455 bytes of remaining length plus a 5-byte fixed header.
pub const MAX_PACKET_SIZE_BYTES: u32 = 268_435_460;
/// Longest accepted `mqtt.client_id_prefix`.
pub const MAX_CLIENT_ID_PREFIX_LEN: usize = 64;

/// The whole node configuration. `Config::default()` is the zero-config node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[mqtt]`: the MQTT listener and protocol limits.
    pub mqtt: MqttConfig,
    /// `[admin]`: the admin HTTP listener (metrics and health).
    pub admin: AdminConfig,
    /// `[storage]`: where the node keeps its data.
    pub storage: StorageConfig,
    /// `[tls]`: certificates for the TLS listeners (mqtts, wss).
    pub tls: TlsConfig,
    /// `[auth]`: authentication and authorisation.
    pub auth: AuthConfig,
    /// `[limits]`: process-wide resource limits.
    pub limits: LimitsConfig,
    /// `[log]`: log output.
    pub log: LogConfig,
    /// `[cluster]`: the node's id, its gRPC listener and how it finds the cluster.
    pub cluster: ClusterConfig,
}

/// Default port of the gRPC listener (Raft and node-to-node traffic).
pub const DEFAULT_GRPC_PORT: u16 = 7883;

/// `[cluster]` section. A node with no `join` and an empty data dir starts a cluster of one
/// (itself); the default node is exactly that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster and fixed for the life of its data dir (a
    /// StatefulSet pod's ordinal). Default `0`.
    pub node_id: u64,
    /// Address the gRPC listener binds (Raft and node-to-node traffic); port 0 picks a free
    /// port. Default `0.0.0.0:7883`.
    pub grpc_addr: SocketAddr,
    /// The gRPC address other nodes dial to reach this one (`host:port`); empty: the bound
    /// address, with the machine's host name when it binds every interface. Default `""`.
    pub advertise_addr: String,
    /// gRPC addresses (`host:port`, comma-separated) of members to join. Empty: a node with an
    /// empty data dir starts a new cluster. With seeds, only the node with the lowest id of
    /// all seeds starts the cluster, once every seed answers; the others join it. A node
    /// with data rejoins by itself. Default `""`.
    pub join: String,
    /// Voting members the cluster keeps (odd, 1 to 5); further nodes join as learners that
    /// replicate everything but do not vote. Default `3`.
    pub voters: usize,
    /// Interval of the leader's heartbeats. Default `250`.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for this long (randomised up to twice) starts an
    /// election. Default `1500`.
    pub election_timeout_ms: u64,
    /// Log entries applied since the last snapshot before a new one is taken. Default `20000`.
    pub snapshot_after_entries: u64,
    /// Log entries kept behind a snapshot, so a follower a little behind catches up from the
    /// log rather than the whole snapshot. Default `1000`.
    pub snapshot_keep_entries: u64,
    /// Longest a CONNECT waits for the cluster to confirm its claim (a quorum must commit
    /// it); past it the CONNECT is refused with CONNACK 0x88 Server unavailable (3 in MQTT
    /// 3.x). Default `5000`.
    pub propose_timeout_ms: u64,
    /// Longest a member may lag before acknowledgements stop waiting for it: a SUBACK (and
    /// UNSUBACK, and a retained message's PUBACK) goes out once every live member has
    /// applied the change, but a member whose applied index has not reached, within this
    /// time, what this node had applied when it fell behind (stopped, cut off, overloaded) is
    /// left out until it catches up. Default `1000`.
    pub apply_wait_ms: u64,
    /// Longest a QoS 1/2 PUBACK/PUBREC waits for the other nodes the message was forwarded
    /// to: past it, a node that has not acknowledged its copy (stopped, cut off, overloaded)
    /// no longer holds the publisher, and the copy waits in the outbox until the node takes
    /// it. Default `1000`.
    pub forward_ack_timeout_ms: u64,
    /// Bytes of forwarded messages a peer that keeps up may have unacknowledged: past it the
    /// QoS 1/2 publishers feeding it pause (stop reading, until half of it is free or
    /// `mqtt.backpressure_max_wait_ms` passes; counted in
    /// `petrel_forward_window_full_total`), and QoS 0 copies for it are dropped (counted in
    /// `petrel_forward_dropped_total{reason="slow_peer"}`). A value past half of
    /// `forward_outbox_bytes` counts as that. Default `16777216` (16 MiB).
    pub forward_window_bytes: usize,
    /// Bytes of forwarded messages one peer may hold unacknowledged in this node's outbox
    /// (a peer that is behind, stopped or away holds nobody, so only this bounds it); past
    /// it the oldest QoS 1/2 copies are dropped (counted in
    /// `petrel_forward_dropped_total{reason="outbox_full"}`). Default `67108864` (64 MiB).
    pub forward_outbox_bytes: usize,
    /// How long a node must be unreachable before another node (the leader) publishes the
    /// wills of the clients that were connected to it (exactly once, even if it comes back:
    /// then it does not). A node restarted within it publishes them itself. Default `10000`.
    pub will_grace_ms: u64,
    /// Which node serves a `$share/group/filter` message when the group has members on
    /// several nodes: `local_first` (the publishing node when it has a member, else the
    /// nodes with members in turn), `round_robin` (the nodes with members in turn, this one
    /// included) or `random`. On the chosen node the members take turns (connected ones
    /// first). Default `local_first`.
    pub shared_strategy: SharedStrategy,
    /// The wire level this node announces (1 to the version's own, 4 in this version): the
    /// cluster uses a feature of a level once every member announces it (see
    /// ARCHITECTURE.md, "Versions side by side"). Lower it to keep the newer features off,
    /// for example before going back to the previous version. Default: the version's own.
    pub wire_level: u32,
}

/// `cluster.shared_strategy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedStrategy {
    /// Served on the publishing node when it has a member (no hop); otherwise by the nodes
    /// with members in turn.
    #[default]
    LocalFirst,
    /// The nodes with members in turn, the publishing node as one of them: an even spread
    /// over nodes whatever the publishers' placement.
    RoundRobin,
    /// A node with members at random.
    Random,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: 0,
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], DEFAULT_GRPC_PORT)),
            advertise_addr: String::new(),
            join: String::new(),
            voters: 3,
            heartbeat_interval_ms: 250,
            election_timeout_ms: 1500,
            snapshot_after_entries: 20_000,
            snapshot_keep_entries: 1000,
            propose_timeout_ms: 5000,
            apply_wait_ms: 1000,
            forward_ack_timeout_ms: 1000,
            forward_window_bytes: 16 << 20,
            forward_outbox_bytes: 64 << 20,
            will_grace_ms: 10_000,
            shared_strategy: SharedStrategy::LocalFirst,
            wire_level: crate::cluster::wire::LEVEL,
        }
    }
}

impl ClusterConfig {
    /// The seed addresses of `join`.
    pub fn seeds(&self) -> Vec<String> {
        self.join
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// `[mqtt]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Address the MQTT listener binds; port 0 picks a free port. Default `0.0.0.0:1883`.
    pub addr: SocketAddr,
    /// Time a new connection has to send CONNECT before it is closed, from its accept (a
    /// connection that sends nothing is accepted about a second after its TCP handshake, see
    /// `listener.rs`). Default `10000`.
    pub connect_timeout_ms: u64,
    /// Largest accepted inbound packet, also sent as the v5 Maximum Packet Size; between 32 and
    /// 268435460. Default `1048576` (1 MiB).
    pub max_packet_size_bytes: u32,
    /// Cap on the client's keep alive, told to v5 clients as Server Keep Alive; 0 accepts the
    /// client's value. Default `0`.
    pub max_keep_alive_secs: u16,
    /// Inbound unacknowledged QoS 1/2 publishes allowed per client (v5 Receive Maximum); at
    /// least 1. Default `128`.
    pub receive_maximum: u16,
    /// Outbound unacknowledged QoS 1/2 publishes per session, further limited by the client's
    /// Receive Maximum; at least 1. Default `128`: a window that keeps a high-latency link
    /// busy (128 messages per round trip), as fast as the client acknowledges.
    pub max_inflight_messages: u16,
    /// Messages queued per session while it is offline or its window is full; at least 1.
    /// Default `1000`.
    pub max_queued_messages: usize,
    /// Payload and topic bytes queued per session; past it the overflow policy applies as for
    /// `max_queued_messages`; 0 means no byte limit. Default `16777216` (16 MiB).
    pub max_queued_bytes: usize,
    /// Longest a publisher's connection stops reading while a connected subscriber it feeds
    /// has a long queue (half of `max_queued_messages`, at most 1024), so fast publishers
    /// slow down to what subscribers take instead of overflowing their queues; a subscriber
    /// that drains nothing in that time stops counting until it catches up. 0 turns this
    /// off. Default `100`.
    pub backpressure_max_wait_ms: u64,
    /// Which message a full session queue drops: `drop-newest` or `drop-oldest`.
    /// Default `drop-newest`.
    pub queue_overflow: QueueOverflow,
    /// Queue QoS 0 messages for offline persistent sessions too. Default `false`.
    pub queue_qos0_offline: bool,
    /// Topic aliases accepted from a client; outbound aliases use the smaller of the client's
    /// maximum and this; 0 disables aliases. Default `64`.
    pub topic_alias_maximum: u16,
    /// Highest QoS granted and accepted, 0 to 2. Default `2`.
    pub max_qos: u8,
    /// Whether retained messages are supported. Default `true`.
    pub retain_available: bool,
    /// Cap on the session expiry interval a v5 client may ask for (a client asking for more,
    /// or for "never", is told the cap in CONNACK). Default `604800` (7 days).
    pub session_expiry_max_secs: u32,
    /// Expiry of MQTT 3.1/3.1.1 sessions with clean_session=0; `4294967295` (u32::MAX) means
    /// never. Default `604800` (7 days).
    pub persistent_session_expiry_secs: u32,
    /// Interval between `$SYS` topic publishes; 0 disables them. Default `10`.
    pub sys_interval_secs: u64,
    /// Prefix of server-assigned client ids: 1 to 64 characters of `A-Z a-z 0-9 - _ .`.
    /// Default `petrel-`.
    pub client_id_prefix: String,
    /// Address of the MQTT-over-TLS listener (usually port 8883); empty disables it. Needs
    /// `tls.cert_file` and `tls.key_file`. Default `""`.
    pub mqtts_addr: String,
    /// Address of the MQTT-over-WebSocket listener; empty disables it. Default `""`.
    pub ws_addr: String,
    /// Address of the MQTT-over-secure-WebSocket listener; empty disables it. Needs
    /// `tls.cert_file` and `tls.key_file`. Default `""`.
    pub wss_addr: String,
    /// HTTP path the WebSocket listeners accept upgrades on. Default `/mqtt`.
    pub ws_path: String,
    /// Where MQTT 5 clients should go when this node shuts down or drains (e.g. the load
    /// balancer's `host:port`): they get DISCONNECT 0x9C Use another server with this
    /// Server Reference. Empty: DISCONNECT 0x8B Server shutting down. Default `""`.
    pub server_reference: String,
}

/// What a full session queue drops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueOverflow {
    /// Drop the message that does not fit (the default).
    #[default]
    DropNewest,
    /// Drop the oldest queued message to make room.
    DropOldest,
}

/// `[admin]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Whether the admin HTTP listener runs. Default `true`.
    pub enabled: bool,
    /// Address the admin HTTP listener binds; port 0 picks a free port. Default `0.0.0.0:8080`.
    pub addr: SocketAddr,
    /// A read-write bearer token for `/api/v1/*` (at least 16 characters). With neither
    /// this nor `token_file`, the node makes one at first start in
    /// `<data_dir>/admin-token` (mode 600). Default empty.
    pub token: String,
    /// A file of tokens, one per line: `read-only <token>` or `read-write <token>`.
    /// Default empty.
    pub token_file: PathBuf,
    /// `/metrics` needs a token too. Default `false`.
    pub protect_metrics: bool,
    /// `/healthz` and `/readyz` need a token too. Default `false`.
    pub protect_health: bool,
    /// PEM certificate chain: with `tls_key_file`, the admin listener speaks HTTPS only.
    /// Default empty (plain HTTP).
    pub tls_cert_file: PathBuf,
    /// PEM private key of `tls_cert_file`. Default empty.
    pub tls_key_file: PathBuf,
    /// A draining node closes at most this many client connections per second. Default 500.
    pub drain_rate_per_sec: u32,
}

/// `[storage]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory for the node's data (the RocksDB database is `<data_dir>/db`).
    /// Default `./data`.
    pub data_dir: PathBuf,
    /// Send PUBACK/PUBREC for a QoS 1/2 message only once every persistent session's copy
    /// is in RocksDB's write-ahead log, so a crash loses no acknowledged message.
    /// Default `true`.
    pub durable_acks: bool,
    /// Also fsync each group commit, so acknowledged messages survive power loss, not only
    /// a process crash. Default `false`.
    pub fsync: bool,
}

/// `[tls]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server. Default `""`.
    pub cert_file: PathBuf,
    /// PEM private key of the server. Default `""`.
    pub key_file: PathBuf,
    /// PEM CA certificates that client certificates are verified against; empty: clients
    /// are not asked for certificates. Default `""`.
    pub client_ca_file: PathBuf,
    /// Refuse TLS clients without a valid certificate (needs `client_ca_file`).
    /// Default `false`.
    pub require_client_cert: bool,
    /// Use the client certificate's common name as the username; such a client needs no
    /// password. Default `false`.
    pub cn_as_username: bool,
    /// How often the certificate files are checked for changes. Default `60`.
    pub reload_interval_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            client_ca_file: PathBuf::new(),
            require_client_cert: false,
            cn_as_username: false,
            reload_interval_secs: 60,
        }
    }
}

/// `[auth]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accept clients that send no username. Default `true`.
    pub allow_anonymous: bool,
    /// Password file of `username:argon2id-hash` lines (manage it with `petrel passwd`);
    /// empty: usernames are not checked. Reloaded when it changes. Default `""`.
    pub password_file: PathBuf,
    /// ACL file (see the README); empty: every client may publish and subscribe to
    /// everything. Reloaded when it changes. Default `""`.
    pub acl_file: PathBuf,
    /// How often the password and ACL files are checked for changes. Default `5`.
    pub reload_interval_secs: u64,
}

/// `[limits]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most concurrent client connections over all listeners; at least 1. Default `100000`.
    pub max_connections: usize,
    /// Most concurrent connections on the plain MQTT listener; 0: only `max_connections`
    /// applies. Default `0`.
    pub max_connections_mqtt: usize,
    /// Same for the MQTT-over-TLS listener. Default `0`.
    pub max_connections_mqtts: usize,
    /// Same for the WebSocket listener. Default `0`.
    pub max_connections_ws: usize,
    /// Same for the secure WebSocket listener. Default `0`.
    pub max_connections_wss: usize,
    /// New connections per second accepted from one source IP address (a token bucket that
    /// holds one second's worth); 0 means no limit. Default `0`.
    pub max_connection_rate_per_ip: u32,
    /// Most levels (`/`-separated parts) in a topic name or filter; at least 1. Default `128`.
    pub max_topic_levels: usize,
    /// Longest topic name or filter in bytes, 1 to 65535. Default `65535`.
    pub max_topic_length_bytes: usize,
    /// Most subscriptions one session may hold; 0 means no limit. Default `10000`.
    pub max_subscriptions_per_client: usize,
    /// Most retained messages the node holds; a new retained topic past it is refused (v5
    /// QoS 1/2: PUBACK/PUBREC 0x97 and the message is not routed; otherwise it is delivered
    /// but not retained); replacing or clearing a retained topic is always allowed; 0 means
    /// no limit. Default `1000000`.
    pub max_retained_messages: usize,
    /// Most topic and payload bytes of retained messages the node holds, refused past it as
    /// for `max_retained_messages`; 0 means no limit. Default `536870912` (512 MiB).
    pub max_retained_bytes: usize,
    /// PUBLISH packets per second one connection may send (a token bucket); 0 means no
    /// limit. Default `0`.
    pub max_publish_rate_per_client: u32,
    /// Size of that bucket: publishes allowed in a burst; 0 means one second's worth.
    /// Default `0`.
    pub publish_rate_burst: u32,
    /// What happens past the publish rate: `throttle` (stop reading from the client until
    /// the bucket refills; nothing is lost) or `disconnect` (DISCONNECT 0x96 Message rate
    /// too high in v5, the socket closed in 3.x). Default `throttle`.
    pub publish_rate_policy: PublishRatePolicy,
    /// Password hashes verified at once (each argon2id check holds about 19 MiB for tens of
    /// milliseconds); 0 means one per CPU core. Default `0`.
    pub max_concurrent_password_checks: usize,
    /// CONNECTs that may wait for a password check; past that a CONNECT is refused at once
    /// (CONNACK 0x97 Quota exceeded in v5, 3 Server unavailable in 3.x). Default `256`.
    pub max_waiting_password_checks: usize,
}

/// What a client publishing faster than `limits.max_publish_rate_per_client` gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishRatePolicy {
    /// Its packets are read more slowly: TCP flow control pushes back.
    #[default]
    Throttle,
    /// It is disconnected (v5 reason code 0x96).
    Disconnect,
}

/// `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Output format: `text` or `json`. Default `text`.
    pub format: LogFormat,
    /// Tracing `EnvFilter` directive, e.g. `info,petrel_node=debug`; the `PETREL_LOG`
    /// environment variable overrides it. Default `info,openraft=warn` (openraft's own
    /// INFO lines narrate every election step; the node logs joins, leaders and removals
    /// itself).
    pub level: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Why [`Config::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("read config file {}", path.display())]
    Read {
        /// The file given to `--config`.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The sources hold unknown keys or bad values; one entry per problem.
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// Every problem, one line each, for printing before exiting.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Read { path, source } => {
                vec![format!("read config file {}: {source}", path.display())]
            }
            ConfigError::Invalid(problems) => problems.clone(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            addr: SocketAddr::from(([0, 0, 0, 0], 1883)),
            connect_timeout_ms: 10_000,
            max_packet_size_bytes: 1_048_576,
            max_keep_alive_secs: 0,
            receive_maximum: 128,
            max_inflight_messages: 128,
            max_queued_messages: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            backpressure_max_wait_ms: 100,
            queue_overflow: QueueOverflow::DropNewest,
            queue_qos0_offline: false,
            topic_alias_maximum: 64,
            max_qos: 2,
            retain_available: true,
            session_expiry_max_secs: 7 * 24 * 3600,
            persistent_session_expiry_secs: 7 * 24 * 3600,
            sys_interval_secs: 10,
            client_id_prefix: "petrel-".to_owned(),
            mqtts_addr: String::new(),
            ws_addr: String::new(),
            wss_addr: String::new(),
            ws_path: "/mqtt".to_owned(),
            server_reference: String::new(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            token: String::new(),
            token_file: PathBuf::new(),
            protect_metrics: false,
            protect_health: false,
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            drain_rate_per_sec: 500,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./data"),
            durable_acks: true,
            fsync: false,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 100_000,
            max_connections_mqtt: 0,
            max_connections_mqtts: 0,
            max_connections_ws: 0,
            max_connections_wss: 0,
            max_connection_rate_per_ip: 0,
            max_topic_levels: 128,
            max_topic_length_bytes: 65_535,
            max_subscriptions_per_client: 10_000,
            max_retained_messages: 1_000_000,
            max_retained_bytes: 512 * 1024 * 1024,
            max_publish_rate_per_client: 0,
            publish_rate_burst: 0,
            publish_rate_policy: PublishRatePolicy::Throttle,
            max_concurrent_password_checks: 0,
            max_waiting_password_checks: 256,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: true,
            password_file: PathBuf::new(),
            acl_file: PathBuf::new(),
            reload_interval_secs: 5,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info,openraft=warn".to_owned(),
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected `text` or `json`, got `{other}`")),
        }
    }
}

impl Config {
    /// Loads defaults, then the TOML file at `path` (if any), then the `PETREL_*` variables in
    /// `env` (the process environment; other variables are ignored). Does not validate.
    pub fn load<I>(path: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: Iterator<Item = (String, String)>,
    {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some((path, text))
            }
            None => None,
        };
        let file = file.as_ref().map(|(path, text)| (*path, text.as_str()));
        Self::from_sources(file, env)
    }

    /// [`Config::load`] with the file already read: `file` is its path (for messages) and text.
    fn from_sources<I>(file: Option<(&Path, &str)>, env: I) -> Result<Config, ConfigError>
    where
        I: Iterator<Item = (String, String)>,
    {
        let schema = Schema::new();
        let mut merged = toml::Table::new();
        let mut problems = Vec::new();
        if let Some((path, text)) = file {
            schema.merge_file(path, text, &mut merged, &mut problems);
        }
        schema.merge_env(env, &mut merged, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Config::deserialize(toml::Value::Table(merged))
            .map_err(|e| ConfigError::Invalid(vec![e.message().to_owned()]))
    }

    /// Checks rules the types cannot express. Returns every broken rule, one message each.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let (mqtt, admin, limits) = (&self.mqtt, &self.admin, &self.limits);
        let at_least_one = [
            ("mqtt.connect_timeout_ms", mqtt.connect_timeout_ms > 0),
            ("mqtt.receive_maximum", mqtt.receive_maximum > 0),
            ("mqtt.max_inflight_messages", mqtt.max_inflight_messages > 0),
            ("mqtt.max_queued_messages", mqtt.max_queued_messages > 0),
            ("limits.max_connections", limits.max_connections > 0),
            ("limits.max_topic_levels", limits.max_topic_levels > 0),
            (
                "limits.max_topic_length_bytes",
                limits.max_topic_length_bytes > 0,
            ),
        ];
        let mut problems: Vec<String> = at_least_one
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(key, _)| format!("{key} must be at least 1"))
            .collect();
        if limits.max_topic_length_bytes > 65_535 {
            problems.push(format!(
                "limits.max_topic_length_bytes must be at most 65535, got {}",
                limits.max_topic_length_bytes
            ));
        }
        let (min, max) = (MIN_PACKET_SIZE_BYTES, MAX_PACKET_SIZE_BYTES);
        if !(min..=max).contains(&mqtt.max_packet_size_bytes) {
            let got = mqtt.max_packet_size_bytes;
            problems.push(format!(
                "mqtt.max_packet_size_bytes must be between {min} and {max}, got {got}"
            ));
        }
        if mqtt.max_qos > 2 {
            problems.push(format!(
                "mqtt.max_qos must be 0, 1 or 2, got {}",
                mqtt.max_qos
            ));
        }
        if !valid_client_id_prefix(&mqtt.client_id_prefix) {
            problems.push(format!(
                "mqtt.client_id_prefix must be 1 to {MAX_CLIENT_ID_PREFIX_LEN} characters of \
                 A-Z a-z 0-9 - _ ., got {:?}",
                mqtt.client_id_prefix
            ));
        }
        if !admin.token.is_empty() {
            if let Err(e) = petrel_admin_api::auth::check_token(&admin.token) {
                problems.push(format!("admin.token: {e}"));
            }
        }
        if admin.tls_cert_file.as_os_str().is_empty() != admin.tls_key_file.as_os_str().is_empty() {
            problems.push("admin.tls_cert_file and admin.tls_key_file go together".to_owned());
        }
        if admin.drain_rate_per_sec == 0 {
            problems.push("admin.drain_rate_per_sec must be at least 1".to_owned());
        }
        if admin.enabled && ports_clash(mqtt.addr, admin.addr) {
            let (a, m) = (admin.addr, mqtt.addr);
            problems.push(format!(
                "admin.addr {a} and mqtt.addr {m} use the same port"
            ));
        }
        for (key, addr) in [
            ("mqtt.mqtts_addr", &mqtt.mqtts_addr),
            ("mqtt.ws_addr", &mqtt.ws_addr),
            ("mqtt.wss_addr", &mqtt.wss_addr),
        ] {
            if !addr.is_empty() && addr.parse::<SocketAddr>().is_err() {
                problems.push(format!(
                    "{key} must be HOST:PORT (an IP address and a port) or empty, got {addr:?}"
                ));
            }
        }
        if !mqtt.ws_path.starts_with('/') {
            problems.push(format!(
                "mqtt.ws_path must start with '/', got {:?}",
                mqtt.ws_path
            ));
        }
        let tls_needed = !mqtt.mqtts_addr.is_empty() || !mqtt.wss_addr.is_empty();
        let tls = &self.tls;
        if tls_needed
            && (tls.cert_file.as_os_str().is_empty() || tls.key_file.as_os_str().is_empty())
        {
            problems.push(
                "mqtt.mqtts_addr and mqtt.wss_addr need tls.cert_file and tls.key_file".to_owned(),
            );
        }
        if tls.require_client_cert && tls.client_ca_file.as_os_str().is_empty() {
            problems.push("tls.require_client_cert needs tls.client_ca_file".to_owned());
        }
        if tls.reload_interval_secs == 0 {
            problems.push("tls.reload_interval_secs must be at least 1".to_owned());
        }
        if self.auth.reload_interval_secs == 0 {
            problems.push("auth.reload_interval_secs must be at least 1".to_owned());
        }
        let cluster = &self.cluster;
        if !(1..=5).contains(&cluster.voters) || cluster.voters % 2 == 0 {
            problems.push(format!(
                "cluster.voters must be 1, 3 or 5, got {}",
                cluster.voters
            ));
        }
        if cluster.heartbeat_interval_ms == 0
            || cluster.election_timeout_ms < 2 * cluster.heartbeat_interval_ms
        {
            problems.push(format!(
                "cluster.election_timeout_ms ({}) must be at least twice \
                 cluster.heartbeat_interval_ms ({}), which must be at least 1",
                cluster.election_timeout_ms, cluster.heartbeat_interval_ms
            ));
        }
        if !(1..=crate::cluster::wire::LEVEL).contains(&cluster.wire_level) {
            problems.push(format!(
                "cluster.wire_level must be 1 to {} (this version's), got {}",
                crate::cluster::wire::LEVEL,
                cluster.wire_level
            ));
        }
        if cluster.propose_timeout_ms == 0 {
            problems.push("cluster.propose_timeout_ms must be at least 1".to_owned());
        }
        if cluster.apply_wait_ms == 0 {
            problems.push("cluster.apply_wait_ms must be at least 1".to_owned());
        }
        if cluster.forward_ack_timeout_ms == 0 {
            problems.push("cluster.forward_ack_timeout_ms must be at least 1".to_owned());
        }
        if cluster.forward_window_bytes < 1 << 16 {
            problems.push(format!(
                "cluster.forward_window_bytes must be at least 65536 (64 KiB), got {}",
                cluster.forward_window_bytes
            ));
        }
        if cluster.forward_outbox_bytes < 1 << 20 {
            problems.push(format!(
                "cluster.forward_outbox_bytes must be at least 1048576 (1 MiB), got {}",
                cluster.forward_outbox_bytes
            ));
        }
        if cluster.snapshot_after_entries == 0 {
            problems.push("cluster.snapshot_after_entries must be at least 1".to_owned());
        }
        for seed in cluster.seeds() {
            if !valid_host_port(&seed) {
                problems.push(format!(
                    "cluster.join must be HOST:PORT addresses separated by commas, got {seed:?}"
                ));
            }
        }
        if !cluster.advertise_addr.is_empty() && !valid_host_port(&cluster.advertise_addr) {
            problems.push(format!(
                "cluster.advertise_addr must be HOST:PORT or empty, got {:?}",
                cluster.advertise_addr
            ));
        }
        for (key, addr) in [("mqtt.addr", mqtt.addr), ("admin.addr", admin.addr)] {
            if (key == "mqtt.addr" || admin.enabled) && ports_clash(cluster.grpc_addr, addr) {
                problems.push(format!(
                    "cluster.grpc_addr {} and {key} {addr} use the same port",
                    cluster.grpc_addr
                ));
            }
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            problems.push("storage.data_dir must not be empty".to_owned());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            let level = &self.log.level;
            problems.push(format!(
                "log.level (or {LOG_ENV}) {level:?} is not a tracing filter: {e}"
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The default configuration as commented TOML (the text of `petrel.example.toml`).
    pub fn to_toml_string() -> String {
        EXAMPLE_TOML.to_owned()
    }
}

/// `host:port` with a non-empty host and a port number.
fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    }
}

fn valid_client_id_prefix(prefix: &str) -> bool {
    (1..=MAX_CLIENT_ID_PREFIX_LEN).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether two listeners would fight over one port (port 0 never clashes).
fn ports_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The known sections and keys, taken from the serialized default configuration. Every field
/// must therefore serialize to a value (no `Option` defaulting to `None`), or it would be
/// rejected as unknown.
struct Schema {
    defaults: toml::Table,
}

impl Schema {
    fn new() -> Self {
        let defaults = match toml::Value::try_from(Config::default()) {
            Ok(toml::Value::Table(table)) => table,
            other => panic!("the default config must serialize to a TOML table, got {other:?}"),
        };
        Schema { defaults }
    }

    /// The default values of `section`, or a message listing the known sections.
    fn section(&self, section: &str) -> Result<&toml::Table, String> {
        let fields = self.defaults.get(section).and_then(toml::Value::as_table);
        fields.ok_or_else(|| {
            format!(
                "unknown section `{section}`, expected one of: {}",
                key_list(&self.defaults)
            )
        })
    }

    /// The default value of `section.field`, or a message saying what is known instead.
    fn default_of(&self, section: &str, field: &str) -> Result<&toml::Value, String> {
        let fields = self.section(section)?;
        fields.get(field).ok_or_else(|| {
            format!(
                "unknown key `{section}.{field}`, expected one of: {}",
                key_list(fields)
            )
        })
    }

    fn merge_file(
        &self,
        path: &Path,
        text: &str,
        merged: &mut toml::Table,
        problems: &mut Vec<String>,
    ) {
        let file = match text.parse::<toml::Table>() {
            Ok(file) => file,
            Err(e) => {
                let at = e.span().map(|span| line_col(text, span.start));
                let (line, col) = at.unwrap_or((1, 1));
                let message = e.message().trim().replace('\n', "; ");
                problems.push(format!("{}:{line}:{col}: {message}", path.display()));
                return;
            }
        };
        for (section, value) in file {
            let fields = match (self.section(&section), value) {
                (Ok(_), toml::Value::Table(fields)) => fields,
                (Ok(_), _) => {
                    problems.push(format!("{}: `{section}` must be a table", path.display()));
                    continue;
                }
                (Err(problem), _) => {
                    problems.push(format!("{}: {problem}", path.display()));
                    continue;
                }
            };
            for (field, value) in fields {
                match self.check(&section, &field, &value) {
                    Ok(()) => insert(merged, &section, field, value),
                    Err(problem) => problems.push(format!("{}: {problem}", path.display())),
                }
            }
        }
    }

    fn merge_env<I>(&self, env: I, merged: &mut toml::Table, problems: &mut Vec<String>)
    where
        I: Iterator<Item = (String, String)>,
    {
        let mut env: Vec<(String, String)> = env.collect();
        env.sort();
        let mut log_level = None;
        for (name, raw) in env {
            if name == LOG_ENV {
                log_level = Some(raw);
                continue;
            }
            let Some((section, field)) = name
                .strip_prefix(ENV_PREFIX)
                .and_then(|rest| rest.split_once(ENV_SEPARATOR))
            else {
                continue;
            };
            let (section, field) = (section.to_ascii_lowercase(), field.to_ascii_lowercase());
            let default = match self.default_of(&section, &field) {
                Ok(default) => default,
                Err(problem) => {
                    problems.push(format!("environment variable {name}: {problem}"));
                    continue;
                }
            };
            let value = env_value(default, &raw);
            match self.check(&section, &field, &value) {
                Ok(()) => insert(merged, &section, field, value),
                Err(problem) => {
                    problems.push(format!("environment variable {name}={raw}: {problem}"))
                }
            }
        }
        if let Some(level) = log_level {
            insert(
                merged,
                "log",
                "level".to_owned(),
                toml::Value::String(level),
            );
        }
    }

    /// Checks that `value` is acceptable for `section.field` on its own, so that each bad
    /// key gets its own message.
    fn check(&self, section: &str, field: &str, value: &toml::Value) -> Result<(), String> {
        self.default_of(section, field)?;
        let mut one = toml::Table::new();
        insert(&mut one, section, field.to_owned(), value.clone());
        match Config::deserialize(toml::Value::Table(one)) {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("`{section}.{field}` = {value}: {}", e.message())),
        }
    }
}

/// The TOML value of an environment variable: raw text for string settings, otherwise the
/// text parsed as a TOML value if it parses (`10`, `true`), else the raw text as a string.
fn env_value(default: &toml::Value, raw: &str) -> toml::Value {
    if default.is_str() {
        return toml::Value::String(raw.to_owned());
    }
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut table) if table.len() == 1 => table.remove("v").expect("the table has key v"),
        _ => toml::Value::String(raw.to_owned()),
    }
}

fn insert(root: &mut toml::Table, section: &str, field: String, value: toml::Value) {
    let fields = root
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(fields) = fields {
        fields.insert(field, value);
    }
}

fn key_list(table: &toml::Table) -> String {
    table
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
#[path = "config_test.rs"]
mod tests;
