//! The owner lookup on a host with 2,000 processes: one pass over every /proc/PID/fd for the
//! inodes asked about. It runs on a blocking thread, never on the event path; this measures how
//! long such a pass takes. Needs root (to read other processes' fds). Run by `cargo xtask bench`.
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustc_hash::FxHashSet;
use tcpstate::kernel::procfs as owner;

const PROCESSES: usize = 2_000;

fn main() {
    // 2,000 processes, each with a few descriptors, and one socket of ours to find.
    let mut children: Vec<Child> = (0..PROCESSES)
        .map(|_| {
            Command::new("sleep")
                .arg("120")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn sleep")
        })
        .collect();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let link = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
    let inode = owner::socket_inode(&link.to_string_lossy()).unwrap();
    let wanted: FxHashSet<u32> = [inode].into_iter().collect();
    let procs = std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();

    let mut times: Vec<Duration> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let found = owner::scan(std::path::Path::new("/proc"), &wanted);
            let took = start.elapsed();
            assert_eq!(found[&inode][0].pid, std::process::id());
            took
        })
        .collect();
    times.sort();
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    println!(
        "| owner lookup: one /proc scan over {procs} processes (median of 5, off the event path) | {:.1} ms |",
        times[2].as_secs_f64() * 1e3
    );
}
