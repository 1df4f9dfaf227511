//! One linger-detector pass over 100,000 tracked sockets: the time the table task spends not
//! applying events while it looks. Run by `cargo xtask bench`.
use std::time::{Duration, Instant};

use tcpstate::model::event::Transition;
use tcpstate::model::linger::{Detector, Thresholds};
use tcpstate::model::table::{DEFAULT_EPHEMERAL, Table};
use tcpstate::testing;
use tcpstate_common::TcpState::{self, *};

const SOCKETS: u64 = 100_000;
const S: u64 = 1_000_000_000;

/// A server-side transition of socket `sock` on one of 16 ports.
fn tr(sock: u64, ts: u64, old: TcpState, new: TcpState) -> Transition {
    let local = format!("10.0.0.2:{}", 8000 + sock % 16);
    let remote = format!("10.0.0.1:{}", 32768 + sock % 20000);
    testing::tr(sock, ts, old, new, &local, &remote).with_pid(0)
}

/// 100k server sockets: one in ten in CLOSE_WAIT since t=0, the rest ESTABLISHED.
fn table() -> Table {
    let mut t = Table::new(512, DEFAULT_EPHEMERAL);
    for sock in 1..=SOCKETS {
        t.apply(&tr(sock, 0, Listen, SynRecv));
        t.apply(&tr(sock, 0, SynRecv, Established));
        if sock % 10 == 0 {
            t.apply(&tr(sock, 0, Established, CloseWait));
        }
    }
    t
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let thresholds = Thresholds::default();
    // Steady state: nothing new crosses (the usual pass).
    let mut t = table();
    let mut d = Detector::new(thresholds);
    let crossed = d.tick(&mut t, 61 * S).len();
    assert_eq!(crossed as u64, SOCKETS / 10);
    let quiet: Vec<Duration> = (0..20)
        .map(|i| {
            let start = Instant::now();
            let n = d.tick(&mut t, (62 + i) * S).len();
            assert_eq!(n, 0);
            start.elapsed()
        })
        .collect();
    // The worst pass: 10,000 sockets cross at once.
    let busy: Vec<Duration> = (0..5)
        .map(|_| {
            let mut t = table();
            let mut d = Detector::new(thresholds);
            let start = Instant::now();
            let n = d.tick(&mut t, 61 * S).len();
            let took = start.elapsed();
            assert_eq!(n as u64, SOCKETS / 10);
            took
        })
        .collect();
    println!(
        "| detector pass over {SOCKETS} sockets, none crossing (median of 20) | {:.2} ms |",
        median(quiet).as_secs_f64() * 1e3
    );
    println!(
        "| detector pass over {SOCKETS} sockets, 10,000 crossing at once (median of 5) | {:.2} ms |",
        median(busy).as_secs_f64() * 1e3
    );
}
