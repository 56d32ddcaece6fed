//! `petrel cluster ...`: look at and manage the cluster through any member's gRPC address.

use std::time::Duration;

use petrel_cluster_proto::pb;
use petrel_cluster_proto::pb::cluster_client::ClusterClient;

/// Arguments of `petrel cluster`.
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// gRPC address of any member
    #[arg(
        long,
        env = "PETREL_CLUSTER_ADDR",
        default_value = "127.0.0.1:7883",
        value_name = "HOST:PORT",
        global = true
    )]
    addr: String,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ClusterCommand {
    /// Members, roles, the leader and log positions as this member sees them
    Status {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove a node for good (a dead one): out of Raft, its routes and ownerships with it
    Remove {
        /// The node's id
        node_id: u64,
    },
}

/// Runs `petrel cluster`; the error is printed by the caller.
pub fn run(args: ClusterArgs) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let channel = super::network::channel(&args.addr).map_err(|e| e.to_string())?;
        let mut client = ClusterClient::new(channel);
        match args.command {
            ClusterCommand::Status { json } => {
                let mut req = tonic::Request::new(pb::StatusRequest {});
                req.set_timeout(Duration::from_secs(5));
                let st = client
                    .status(req)
                    .await
                    .map_err(|s| format!("{}: {}", args.addr, s.message()))?
                    .into_inner();
                if json {
                    println!("{}", status_json(&st));
                } else {
                    print_status(&st);
                }
                Ok(())
            }
            ClusterCommand::Remove { node_id } => {
                let mut req = tonic::Request::new(pb::RemoveRequest { node_id });
                req.set_timeout(Duration::from_secs(30));
                client
                    .remove(req)
                    .await
                    .map_err(|s| format!("{}: {}", args.addr, s.message()))?;
                println!("node {node_id} removed");
                Ok(())
            }
        }
    })
}

fn status_json(st: &pb::StatusReply) -> serde_json::Value {
    let members: Vec<serde_json::Value> = st
        .members
        .iter()
        .map(|m| {
            serde_json::json!({
                "node_id": m.node_id,
                "grpc_addr": m.grpc_addr,
                "mqtt_addr": m.mqtt_addr,
                "version": m.version,
                "draining": m.draining,
                "role": m.role,
                "matched_index": m.matched_index,
                "routes": m.routes,
            })
        })
        .collect();
    serde_json::json!({
        "node_id": st.node_id,
        "leader_id": st.leader_id,
        "term": st.term,
        "role": st.role,
        "last_log_index": st.last_log_index,
        "committed_index": st.committed_index,
        "applied_index": st.applied_index,
        "members": members,
        "routes_unknown_node": st.routes_unknown_node,
    })
}

fn print_status(st: &pb::StatusReply) {
    let leader = st
        .leader_id
        .map(|l| l.to_string())
        .unwrap_or_else(|| "none".to_owned());
    println!(
        "node {} ({}), leader {leader}, term {}, log {}, committed {}, applied {}",
        st.node_id, st.role, st.term, st.last_log_index, st.committed_index, st.applied_index
    );
    println!(
        "{:>6}  {:<9}  {:<24}  {:<24}  {:<10}  {:>7}  ROUTES",
        "NODE", "ROLE", "GRPC", "MQTT", "VERSION", "MATCHED"
    );
    for m in &st.members {
        let role = if m.draining {
            format!("{} (draining)", m.role)
        } else {
            m.role.clone()
        };
        println!(
            "{:>6}  {:<9}  {:<24}  {:<24}  {:<10}  {:>7}  {}",
            m.node_id, role, m.grpc_addr, m.mqtt_addr, m.version, m.matched_index, m.routes
        );
    }
}
