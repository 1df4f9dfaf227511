//! `doctor`: the model's findings ([`crate::model::diagnose`]) with their owners named, as
//! protocol rows.
use std::path::Path;

use rustc_hash::FxHashSet;

use super::owners::{fill_inodes, owners_of};
use super::protocol::{DestinationRow, DoctorReport, FindingRow, PeerRow, Reply, TcpState};
use super::rows::owner_rows;
use crate::engine::handle::Shared;
use crate::kernel::procfs::{self, Owner};
use crate::model::diagnose::{Evidence, Finding, diagnose};
use crate::model::query::ConnFilter;
use crate::model::table::{DestUse, PortKey};

/// The findings about `port` (all when `None`), the most severe first.
pub(super) async fn doctor(state: &Shared, port: Option<u16>) -> Reply {
    const DOWN: &str = "the agent is shutting down";
    let Some(view) = state.table.view().await else {
        return Reply::error(DOWN);
    };
    let lingering = ConnFilter {
        port,
        lingering: true,
        ..ConnFilter::default()
    };
    let listening = ConnFilter {
        port,
        state: Some(TcpState::Listen),
        ..ConnFilter::default()
    };
    let (Some(lingering), Some(listeners)) = (
        state.table.conns(lingering).await,
        state.table.conns(listening).await,
    ) else {
        return Reply::error(DOWN);
    };
    let (mut lingering, mut listeners) = (lingering.conns, listeners.conns);
    fill_inodes(&mut lingering).await;
    fill_inodes(&mut listeners).await;
    let findings: Vec<Finding> = diagnose(&Evidence {
        view: &view,
        lingering: &lingering,
        listeners: &listeners,
    })
    .into_iter()
    .filter(|f| port.is_none_or(|p| number(f.key) == Some(p)))
    .collect();

    let inodes: FxHashSet<u32> = findings.iter().flat_map(|f| f.inodes.clone()).collect();
    let holders = owners_of(inodes).await;
    let pids: FxHashSet<u32> = findings.iter().flat_map(|f| f.pids.clone()).collect();
    let openers: Vec<Owner> = tokio::task::spawn_blocking(move || {
        let proc = Path::new("/proc");
        pids.into_iter()
            .map(|p| procfs::describe(proc, p))
            .collect()
    })
    .await
    .unwrap_or_default();

    let rows = findings
        .iter()
        .map(|f| {
            let mut owners: Vec<Owner> = Vec::new();
            for o in f.inodes.iter().filter_map(|i| holders.get(i)).flatten() {
                if !owners.iter().any(|x| x.pid == o.pid) {
                    owners.push(o.clone());
                }
            }
            let opened: Vec<Owner> = openers
                .iter()
                .filter(|o| f.pids.contains(&o.pid))
                .cloned()
                .collect();
            finding_row(f, &owners, &opened)
        })
        .collect();
    let destinations = view
        .table
        .ephemeral
        .top
        .iter()
        .filter(|d| port.is_none_or(|p| number(d.key) == Some(p)))
        .map(destination_row)
        .collect();
    Reply {
        doctor: Some(DoctorReport {
            findings: rows,
            destinations,
            tracked_sockets: view.table.tracked_sockets as u64,
        }),
        ..Reply::ok()
    }
}

/// The port number of a key; `None` for `other`.
fn number(key: PortKey) -> Option<u16> {
    match key {
        PortKey::Port(p) | PortKey::NsPort(_, p) => Some(p),
        PortKey::Other | PortKey::NsOther(_) => None,
    }
}

fn finding_row(f: &Finding, owners: &[Owner], opened: &[Owner]) -> FindingRow {
    FindingRow {
        severity: f.severity.label().to_string(),
        kind: f.kind.label().to_string(),
        port: f.key.label(),
        role: f.role.label().to_string(),
        netns: f.netns.clone(),
        count: f.count,
        oldest_seconds: f.oldest_seconds,
        share: f.share,
        destination: f.destination.map(|d| d.remote.to_string()),
        range_size: f.destination.map(|d| d.range),
        peers: f
            .peers
            .iter()
            .map(|(ip, n)| PeerRow {
                address: ip.to_string(),
                count: *n,
            })
            .collect(),
        owners: owner_rows(owners),
        opened_by: owner_rows(opened),
        what: f.what.clone(),
        why: f.why.to_string(),
        // The commands in the fixes name the finding's own port.
        fix: f
            .fix
            .replace("--port PORT", &format!("--port {}", f.key.label())),
    }
}

fn destination_row(d: &DestUse) -> DestinationRow {
    DestinationRow {
        destination: d.remote.to_string(),
        port: d.key.label(),
        netns: (d.netns != 0).then_some(d.netns),
        in_use: d.in_use,
        range_size: d.range,
        share: d.share(),
    }
}
