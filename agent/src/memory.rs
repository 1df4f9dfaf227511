//! How the agent's memory stays bounded by what it holds.
//!
//! glibc's malloc raises its mmap threshold each time a large block (a hash table that grew, a
//! sock_diag dump) is freed, up to 32 MiB; from then on such blocks come from the per-thread
//! arenas, and what is freed there stays in the process. With a table of 200,000 sockets
//! reconciled every 15 s, that held about 100 MiB of freed memory in four arenas (measured with
//! `cargo xtask bench --scenario busy`). A fixed threshold keeps large blocks in their own
//! mappings, returned to the kernel when freed, and two arenas are plenty for a table task, an
//! HTTP server and a dump thread.

/// Blocks of at least this size get their own mapping, returned when freed: the connection
/// table, dumps and reconciliation's sorted digests of a busy host. Smaller ones (the reader's
/// batches, at most a few hundred KiB at full churn; a scrape's text) are reused from the
/// arenas. Measured with `cargo xtask bench` (churn, agent CPU per million transitions, noisy
/// by +-15% on this VM): glibc's 128 KiB made every large batch an mmap, page faults and a
/// munmap (0.23-0.31 s against 0.17-0.18 s untuned); 1 MiB is within noise of untuned (0.19-0.20
/// s) and keeps the busy host at 52 MiB (untuned: 133 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 1 << 20;
/// Free memory kept at the top of an arena before it is given back: a few batches' worth.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 2 << 20;
/// Arenas for all threads together.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: i32 = 2;

/// Applies the settings above; call before any thread starts. A no-op on other C libraries.
pub(crate) fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}
