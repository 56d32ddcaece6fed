//! `petrel ctl`: the admin REST API from the command line, for people (tables) and scripts
//! (`--json`). It finds the node and its token the way a shell inside the pod would:
//!
//! - address: `--url`, else `PETREL_ADMIN_URL`, else the node's own `PETREL_ADMIN_ADDR`
//!   (a wildcard host becomes 127.0.0.1), else `http://127.0.0.1:8080`;
//! - token: `--token`, else `PETREL_ADMIN_TOKEN`, else the token the node made in
//!   `<data dir>/admin-token` (`--data-dir`, `PETREL_DATA_DIR`, default `./data`).
//!
//! Plain HTTP only: inside a pod or on the node's machine the admin port is local.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// Admin API base URL, e.g. http://127.0.0.1:8080
    #[arg(long, env = "PETREL_ADMIN_URL", global = true)]
    url: Option<String>,
    /// Bearer token (default: PETREL_ADMIN_TOKEN, else <data dir>/admin-token)
    #[arg(
        long,
        env = "PETREL_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// The node's data directory, where a generated token is
    #[arg(long, env = "PETREL_DATA_DIR", default_value = "./data", global = true)]
    data_dir: PathBuf,
    /// Print the API's JSON instead of a table
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CtlCommand {
    /// MQTT sessions, cluster-wide
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Subscriptions, cluster-wide
    Subscriptions {
        /// Only this client's
        #[arg(long)]
        client_id: Option<String>,
        /// Only this exact filter
        #[arg(long)]
        filter: Option<String>,
    },
    /// Retained messages
    Retained {
        #[command(subcommand)]
        command: RetainedCommand,
    },
    /// Publish a message
    Publish {
        topic: String,
        payload: String,
        #[arg(long, default_value_t = 0)]
        qos: u8,
        #[arg(long)]
        retain: bool,
    },
    /// The replicated route table
    Routes,
    /// Members, roles and Raft positions; remove or drain a node
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Debug, clap::Subcommand)]
enum SessionsCommand {
    /// List sessions (every page unless --limit)
    List {
        #[arg(long)]
        node: Option<u64>,
        /// true: connected only; false: offline only
        #[arg(long)]
        connected: Option<bool>,
        /// Client ids starting with this
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long)]
        username: Option<String>,
        /// At most this many
        #[arg(long)]
        limit: Option<usize>,
    },
    /// One session in detail
    Show { client_id: String },
    /// Close a session's connection (v5: DISCONNECT 0x98)
    Kick {
        client_id: String,
        /// Also end the session
        #[arg(long)]
        discard: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
enum RetainedCommand {
    /// List retained messages matching a filter
    List {
        #[arg(long, default_value = "#")]
        filter: String,
    },
    /// One retained message
    Show { topic: String },
    /// Delete a retained message
    Delete { topic: String },
}

#[derive(Debug, clap::Subcommand)]
enum ClusterCommand {
    /// Members, roles, leader, term and log positions
    Status,
    /// Remove a dead node for good
    Remove { node_id: u64 },
    /// Drain a node (not ready, clients sent away, leadership handed on)
    Drain { node_id: u64 },
}

/// Runs `petrel ctl`; the error is printed by the caller.
pub fn run(args: CtlArgs) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run_async(args))
}

async fn run_async(args: CtlArgs) -> Result<(), String> {
    let api = Api::new(&args)?;
    let json = args.json;
    match args.command {
        CtlCommand::Sessions { command } => match command {
            SessionsCommand::List {
                node,
                connected,
                prefix,
                username,
                limit,
            } => {
                let mut q = Query::default();
                q.opt("node", node.map(|n| n.to_string()));
                q.opt("connected", connected.map(|c| c.to_string()));
                q.opt("client_id_prefix", prefix);
                q.opt("username", username);
                let items = api.all("/api/v1/sessions", q, limit).await?;
                show_list(
                    json,
                    &items,
                    &[
                        ("CLIENT ID", "client_id"),
                        ("NODE", "node_id"),
                        ("CONNECTED", "connected"),
                        ("PROTO", "protocol_version"),
                        ("PEER", "peer"),
                        ("USER", "username"),
                        ("QUEUED", "queued_messages"),
                        ("INFLIGHT", "inflight_messages"),
                        ("SUBS", "subscription_count"),
                    ],
                );
            }
            SessionsCommand::Show { client_id } => {
                let v = api
                    .call(
                        "GET",
                        &format!("/api/v1/sessions/{}", enc(&client_id)),
                        None,
                    )
                    .await?;
                show_object(json, &v);
            }
            SessionsCommand::Kick { client_id, discard } => {
                let path = format!("/api/v1/sessions/{}?discard={discard}", enc(&client_id));
                let v = api.call("DELETE", &path, None).await?;
                show_object(json, &v);
            }
        },
        CtlCommand::Subscriptions { client_id, filter } => {
            let mut q = Query::default();
            q.opt("client_id", client_id);
            q.opt("filter", filter);
            let items = api.all("/api/v1/subscriptions", q, None).await?;
            show_list(
                json,
                &items,
                &[
                    ("CLIENT ID", "client_id"),
                    ("FILTER", "filter"),
                    ("QOS", "qos"),
                    ("NODE", "node_id"),
                ],
            );
        }
        CtlCommand::Retained { command } => match command {
            RetainedCommand::List { filter } => {
                let mut q = Query::default();
                q.opt("filter", Some(filter));
                let items = api.all("/api/v1/retained", q, None).await?;
                show_list(
                    json,
                    &items,
                    &[
                        ("TOPIC", "topic"),
                        ("QOS", "qos"),
                        ("BYTES", "payload_bytes"),
                        ("PAYLOAD", "payload"),
                    ],
                );
            }
            RetainedCommand::Show { topic } => {
                let v = api
                    .call(
                        "GET",
                        &format!("/api/v1/retained/message?topic={}", enc(&topic)),
                        None,
                    )
                    .await?;
                show_object(json, &v);
            }
            RetainedCommand::Delete { topic } => {
                api.call(
                    "DELETE",
                    &format!("/api/v1/retained/message?topic={}", enc(&topic)),
                    None,
                )
                .await?;
                if !json {
                    println!("deleted {topic}");
                }
            }
        },
        CtlCommand::Publish {
            topic,
            payload,
            qos,
            retain,
        } => {
            let body = serde_json::json!({"topic": topic, "payload": payload, "qos": qos, "retain": retain});
            let v = api.call("POST", "/api/v1/publish", Some(body)).await?;
            show_object(json, &v);
        }
        CtlCommand::Routes => {
            let items = api.all("/api/v1/routes", Query::default(), None).await?;
            show_list(
                json,
                &items,
                &[
                    ("FILTER", "filter"),
                    ("GROUP", "share_group"),
                    ("NODE", "node_id"),
                    ("UNKNOWN NODE", "unknown_node"),
                ],
            );
        }
        CtlCommand::Cluster { command } => match command {
            ClusterCommand::Status => {
                let v = api.call("GET", "/api/v1/cluster", None).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                } else {
                    println!(
                        "node {} ({}), leader {}, term {}, committed {}, applied {}, routes to non-members {}",
                        v["node_id"], text(&v["role"]), text(&v["leader_id"]), v["term"],
                        v["committed_index"], v["applied_index"], v["routes_unknown_node"]
                    );
                    let members = v["members"].as_array().cloned().unwrap_or_default();
                    show_list(
                        false,
                        &members,
                        &[
                            ("NODE", "node_id"),
                            ("ROLE", "role"),
                            ("GRPC", "grpc_addr"),
                            ("MQTT", "mqtt_addr"),
                            ("VERSION", "version"),
                            ("REACHABLE", "reachable"),
                            ("DRAINING", "draining"),
                            ("LAG", "lag"),
                        ],
                    );
                }
            }
            ClusterCommand::Remove { node_id } => {
                let v = api
                    .call("DELETE", &format!("/api/v1/cluster/nodes/{node_id}"), None)
                    .await?;
                show_object(json, &v);
            }
            ClusterCommand::Drain { node_id } => {
                let v = api
                    .call(
                        "POST",
                        &format!("/api/v1/cluster/nodes/{node_id}/drain"),
                        None,
                    )
                    .await?;
                show_object(json, &v);
            }
        },
    }
    Ok(())
}

struct Api {
    host: String,
    token: String,
}

#[derive(Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn opt(&mut self, k: &str, v: Option<String>) {
        if let Some(v) = v {
            self.0.push((k.to_owned(), v));
        }
    }

    fn render(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.0 {
            s.push(if s.is_empty() { '?' } else { '&' });
            let _ = write!(s, "{}={}", enc(k), enc(v));
        }
        s
    }
}

impl Api {
    fn new(args: &CtlArgs) -> Result<Api, String> {
        let url = match &args.url {
            Some(u) => u.clone(),
            None => match std::env::var("PETREL_ADMIN_ADDR") {
                Ok(a) if !a.is_empty() => {
                    let a = a.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]");
                    format!("http://{a}")
                }
                _ => "http://127.0.0.1:8080".to_owned(),
            },
        };
        let host = match url.strip_prefix("http://") {
            Some(h) => h.trim_end_matches('/').to_owned(),
            None if url.starts_with("https://") => {
                return Err("petrel ctl speaks plain HTTP to a local admin port; use curl for an HTTPS listener".to_owned())
            }
            None => url.trim_end_matches('/').to_owned(),
        };
        let token = match &args.token {
            Some(t) => t.clone(),
            None => {
                let path = crate::admin::token::generated_path(&args.data_dir);
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| format!("no token: give --token or PETREL_ADMIN_TOKEN, or run where {} is readable ({e})", path.display()))?
            }
        };
        Ok(Api { host, token })
    }

    /// Every page of a list (or the first `limit` items).
    async fn all(&self, path: &str, q: Query, limit: Option<usize>) -> Result<Vec<Value>, String> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q2 = Query(q.0.clone());
            q2.opt("cursor", cursor.clone());
            let want = limit
                .map(|l| l.saturating_sub(items.len()).clamp(1, 1000))
                .unwrap_or(1000);
            q2.opt("limit", Some(want.to_string()));
            let page = self
                .call("GET", &format!("{path}{}", q2.render()), None)
                .await?;
            if let Some(nodes) = page["unreachable_nodes"].as_array() {
                if !nodes.is_empty() {
                    eprintln!("warning: nodes {nodes:?} did not answer; their items are missing");
                }
            }
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            cursor = page["next_cursor"].as_str().map(str::to_owned);
            if cursor.is_none() || limit.is_some_and(|l| items.len() >= l) {
                return Ok(items);
            }
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_once(method, path, body))
            .await
            .map_err(|_| format!("{}: no answer within {CALL_TIMEOUT:?}", self.host))?
    }

    async fn call_once(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut stream = tokio::net::TcpStream::connect(&self.host)
            .await
            .map_err(|e| format!("connect to {}: {e}", self.host))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.host, self.token
        );
        if !body.is_empty() {
            let _ = write!(
                req,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        req.push_str("\r\n");
        req.push_str(&body);
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| e.to_string())?;
        let (status, body) = parse_response(&raw)?;
        let v: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|e| format!("answer is not JSON ({e})"))?
        };
        if !(200..300).contains(&status) {
            let code = v["error"]["code"].as_str().unwrap_or("?");
            let msg = v["error"]["message"].as_str().unwrap_or("");
            return Err(format!("{status} {code}: {msg}"));
        }
        Ok(v)
    }
}

/// Status and body of an HTTP/1.1 response (plain or chunked).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("truncated HTTP answer")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "bad HTTP header")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("bad chunk")?;
            let size_hex = std::str::from_utf8(&rest[..nl]).map_err(|_| "bad chunk")?;
            let size = usize::from_str_radix(size_hex.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "bad chunk size")?;
            rest = &rest[nl + 2..];
            if size == 0 || rest.len() < size {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = rest.get(size + 2..).unwrap_or(&[]);
        }
        body = out;
    }
    Ok((status, body))
}

/// Percent-encodes everything but unreserved characters.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn show_object(json: bool, v: &Value) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    if let Some(map) = v.as_object() {
        for (k, val) in map {
            if let Some(items) = val.as_array() {
                println!("{k}:");
                for i in items {
                    println!("  {}", i);
                }
            } else {
                println!("{k}: {}", text(val));
            }
        }
    }
}

fn show_list(json: bool, items: &[Value], cols: &[(&str, &str)]) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Array(items.to_vec())).unwrap_or_default()
        );
        return;
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| cols.iter().map(|(_, k)| text(&i[*k])).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(c, (h, _))| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
                .max(h.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (c, cell) in cells.iter().enumerate() {
            let _ = write!(s, "{:<w$}  ", cell, w = widths[c]);
        }
        println!("{}", s.trim_end());
    };
    line(cols.iter().map(|(h, _)| (*h).to_owned()).collect());
    for r in rows {
        line(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let (s, b) =
            parse_response(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (404, &b"{}"[..]));
        let raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        let (s, b) = parse_response(raw).unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{\"a\":1}"[..]));
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(enc("a/b c+#ü"), "a%2Fb%20c%2B%23%C3%BC");
    }
}
