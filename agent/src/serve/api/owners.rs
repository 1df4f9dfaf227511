//! Who holds the sockets the API answers about: their inodes (from sock_diag, for sockets
//! opened since the last reconciliation) and the processes holding those inodes (from /proc),
//! both looked up off the async threads.
use std::path::Path;

use rustc_hash::{FxHashMap, FxHashSet};

use super::rows;
use crate::kernel::procfs;
use crate::model::table::Conn;

/// Sockets opened since the last reconciliation have no inode yet: asks sock_diag, in just the
/// namespaces concerned, off the async threads.
pub(crate) async fn fill_inodes(conns: &mut [Conn]) {
    let unknown: FxHashSet<u32> = conns
        .iter()
        .filter(|c| c.inode == 0)
        .map(|c| c.netns)
        .collect();
    if unknown.is_empty() {
        return;
    }
    let Ok(found) = tokio::task::spawn_blocking(move || rows::inodes_by_tuple(&unknown)).await
    else {
        return;
    };
    for c in conns.iter_mut().filter(|c| c.inode == 0) {
        let (local, remote) = (c.local.addr(), c.remote.addr());
        let tuple = rows::SocketTuple {
            netns: c.netns,
            local,
            remote,
        };
        if let Some(inode) = found.get(&tuple) {
            c.inode = *inode;
        }
    }
}

/// The processes holding each inode: one /proc pass, off the async threads.
pub(crate) async fn owners_of(inodes: FxHashSet<u32>) -> FxHashMap<u32, Vec<procfs::Owner>> {
    if inodes.is_empty() {
        return FxHashMap::default();
    }
    tokio::task::spawn_blocking(move || procfs::scan(Path::new("/proc"), &inodes))
        .await
        .unwrap_or_default()
}
