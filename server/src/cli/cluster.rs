//! `workbroker cluster`: members, leader and shard map of the broker cluster.

use std::io::Write;

use serde_json::json;
use workbroker_api::v1;

use super::output::{Table, time_cell, time_json, write_fields, write_json};
use super::{ClientOptions, Result};

/// Flags of `workbroker cluster`.
#[derive(clap::Args, Clone, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub options: ClientOptions,
}

/// Runs `workbroker cluster`.
pub(super) async fn run(args: ClusterArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    let mut admin = args.options.admin().await?;
    let info = admin.get_cluster_info(v1::GetClusterInfoRequest {}).await?.into_inner();
    if args.options.json {
        let members: Vec<_> = info
            .members
            .iter()
            .map(|member| {
                json!({
                    "member_id": member.member_id,
                    "grpc_address": member.grpc_address,
                    "started_at": time_json(member.started_at.as_ref()),
                    "version": member.version,
                    "shard_count": member.shards.len(),
                    "shards": member.shards,
                    "leader": member.leader,
                })
            })
            .collect();
        return write_json(
            out,
            &json!({
                "members": members,
                "leader_id": info.leader_id,
                "self_id": info.self_id,
                "shard_map_generation": info.shard_map_generation,
                "shard_count": info.shard_count,
            }),
        );
    }
    let mut table = Table::new(&["MEMBER", "ADDRESS", "STARTED", "VERSION", "SHARDS", "LEADER"]);
    for member in &info.members {
        table.push(vec![
            member.member_id.clone(),
            member.grpc_address.clone(),
            time_cell(member.started_at.as_ref()),
            member.version.clone(),
            member.shards.len().to_string(),
            if member.leader { "*" } else { "" }.to_owned(),
        ]);
    }
    if table.is_empty() {
        writeln!(out, "no members")?;
    } else {
        table.write(out)?;
    }
    writeln!(out)?;
    let none = |text: &str| {
        if text.is_empty() { "(none)".to_owned() } else { text.to_owned() }
    };
    write_fields(
        out,
        &[
            ("leader", none(&info.leader_id)),
            ("answered by", none(&info.self_id)),
            ("shard map generation", info.shard_map_generation.to_string()),
            ("shard count", info.shard_count.to_string()),
        ],
    )
}
