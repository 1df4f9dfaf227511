//! Logs lingering connections, naming the processes that hold each socket. The detector
//! ([`crate::model::linger`]) decides what to log; this task scans /proc for owners on a
//! blocking thread, for the inodes of new crossings only, cached per inode, and writes the lines.
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::mpsc;

use crate::kernel::procfs::{self, Owner};
use crate::model::linger::{self, Happening, LogRecord};

/// Owners remembered, at most; the cache starts over beyond.
const OWNER_CACHE: usize = 100_000;

/// Logs each batch of records as it comes, until the table task goes away.
pub(crate) async fn run(mut records: mpsc::Receiver<Vec<LogRecord>>) {
    let mut cache: FxHashMap<u32, Vec<Owner>> = FxHashMap::default();
    while let Some(batch) = records.recv().await {
        let wanted: FxHashSet<u32> = linger::wanted_owners(&batch)
            .into_iter()
            .filter(|i| !cache.contains_key(i))
            .collect();
        if !wanted.is_empty() {
            let found = tokio::task::spawn_blocking(move || {
                let found = procfs::scan(std::path::Path::new("/proc"), &wanted);
                (wanted, found)
            })
            .await;
            if let Ok((wanted, mut found)) = found {
                if cache.len() > OWNER_CACHE {
                    cache.clear();
                }
                for inode in wanted {
                    cache.insert(inode, found.remove(&inode).unwrap_or_default());
                }
            }
        }
        emit(&batch, &cache);
    }
}

/// Emits log records through `tracing`: crossings at `warn` with the best owner information
/// available (the processes holding the socket's inode, else the pid that connected it),
/// departures at `info`.
fn emit(records: &[LogRecord], owners: &FxHashMap<u32, Vec<Owner>>) {
    for r in records {
        match r {
            LogRecord::One(Happening::Crossed { entry, age }) => {
                let c = &entry.conn;
                let owner = owners.get(&c.inode).and_then(|o| o.first());
                let owner_pid = owner.map_or(c.pid, |o| o.pid);
                let owner_comm = owner.map_or("", |o| o.comm.as_str());
                let container = owner.and_then(|o| o.container.as_deref()).unwrap_or("");
                tracing::warn!(
                    state = c.state.name(),
                    age_s = age.as_secs_f64(),
                    age_is_lower_bound = c.seeded,
                    local = %c.local,
                    remote = %c.remote,
                    role = c.role.label(),
                    port = c.service_port,
                    netns = c.netns,
                    inode = c.inode,
                    owner_pid,
                    owner_comm,
                    owner_container = container,
                    owners = owners.get(&c.inode).map_or(0, Vec::len),
                    "connection lingering in {}",
                    c.state.name()
                );
            }
            LogRecord::One(Happening::Left {
                entry,
                ending,
                to,
                age,
            }) => {
                let c = &entry.conn;
                tracing::info!(
                    state = c.state.name(),
                    ended = ending.label(),
                    to = to.name(),
                    age_s = age.as_secs_f64(),
                    local = %c.local,
                    remote = %c.remote,
                    role = c.role.label(),
                    port = c.service_port,
                    netns = c.netns,
                    owner_pid = c.pid,
                    "lingering connection left {}",
                    c.state.name()
                );
            }
            LogRecord::Summary {
                role,
                port,
                state,
                crossed,
                count,
            } => {
                if *crossed {
                    tracing::warn!(
                        state = state.name(),
                        role = role.label(),
                        port = %port.label(),
                        count,
                        "{count} more connections lingering in {} (not listed one by one)",
                        state.name()
                    );
                } else {
                    tracing::info!(
                        state = state.name(),
                        role = role.label(),
                        port = %port.label(),
                        count,
                        "{count} more lingering connections left {}",
                        state.name()
                    );
                }
            }
        }
    }
}
