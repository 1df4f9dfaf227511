//! Timewait sockets counted live from the transitions that make them, expired with the kernel's
//! timer, and corrected by dumps, light or full.
use super::*;

const C: &str = "10.0.0.1:40000";
const S: &str = "10.0.0.2:80";

fn tw_of(t: &Table, role: Role, port: u16) -> [u64; 2] {
    t.snapshot()
        .ports
        .iter()
        .find(|(r, k, _)| *r == role && *k == PortKey::Port(port))
        .map_or([0, 0], |(_, _, s)| {
            [s.current[TimeWait.index()], s.current[FinWait2.index()]]
        })
}

#[test]
fn a_close_from_fin_wait2_or_closing_is_a_time_wait_socket_until_its_timer_runs_out() {
    let mut t = table();
    client_lifecycle(&mut t, SOCK_A); // FIN_WAIT2 -> CLOSE at ~0.3 s
    // A simultaneous close: CLOSING -> CLOSE.
    t.apply(&tr(SOCK_B, 1_000, Close, SynSent, "10.0.0.1:0", S));
    t.apply(&tr(
        SOCK_B,
        2_000,
        SynSent,
        Established,
        "10.0.0.1:40001",
        S,
    ));
    t.apply(&tr(
        SOCK_B,
        3_000,
        Established,
        FinWait1,
        "10.0.0.1:40001",
        S,
    ));
    t.apply(&tr(SOCK_B, 4_000, FinWait1, Closing, "10.0.0.1:40001", S));
    t.apply(&tr(SOCK_B, 5_000, Closing, Close, "10.0.0.1:40001", S));
    // A reset leaves none.
    t.apply(&tr(3, 1_000, Close, SynSent, "10.0.0.1:0", S));
    t.apply(&tr(3, 2_000, SynSent, Established, "10.0.0.1:40002", S));
    t.apply(&tr(3, 3_000, Established, Close, "10.0.0.1:40002", S));
    assert_eq!(tw_of(&t, Role::Client, 80), [2, 0]);
    // Each counts toward the destination's ephemeral ports.
    let top = &t.ephemeral_use().top[0];
    assert_eq!(top.in_use, 2);
    t.expire_timewait(59 * SEC);
    assert_eq!(tw_of(&t, Role::Client, 80), [2, 0]);
    t.expire_timewait(61 * SEC);
    assert_eq!(tw_of(&t, Role::Client, 80), [0, 0]);
    assert!(t.ephemeral_use().top.is_empty());
}

#[test]
fn a_socket_its_owner_closed_in_fin_wait2_leaves_an_orphan() {
    let mut t = table();
    t.apply(&tr(SOCK_A, 1_000, Close, SynSent, "10.0.0.1:0", S));
    t.apply(&tr(SOCK_A, 2_000, SynSent, Established, C, S));
    // shutdown(SHUT_WR), the peer's ACK, then close(): FIN_WAIT2 again, then CLOSE.
    t.apply(&tr(SOCK_A, 3_000, Established, FinWait1, C, S));
    t.apply(&tr(SOCK_A, 4_000, FinWait1, FinWait2, C, S));
    t.apply(&tr(SOCK_A, 5 * SEC, FinWait2, FinWait2, C, S));
    t.apply(&tr(SOCK_A, 5 * SEC, FinWait2, Close, C, S));
    assert_eq!(tw_of(&t, Role::Client, 80), [0, 1]);
    assert_eq!(t.orphans().len(), 1);
    assert_eq!(t.orphans()[0].since_ns, 5 * SEC);
    // It lives tcp_fin_timeout (60 s here).
    t.expire_timewait(66 * SEC);
    assert!(t.orphans().is_empty());
}

#[test]
fn a_dump_replaces_the_live_count_but_keeps_what_was_made_after_it_started() {
    let mut t = table();
    client_lifecycle(&mut t, SOCK_A); // 10.0.0.1:40000, before the dump
    let late = "10.0.0.1:40005";
    t.apply(&tr(SOCK_B, 2 * SEC, Close, SynSent, "10.0.0.1:0", S));
    t.apply(&tr(SOCK_B, 2 * SEC, SynSent, Established, late, S));
    t.apply(&tr(SOCK_B, 2 * SEC, Established, FinWait1, late, S));
    t.apply(&tr(SOCK_B, 2 * SEC, FinWait1, FinWait2, late, S));
    t.apply(&tr(SOCK_B, 2 * SEC, FinWait2, Close, late, S));
    assert_eq!(tw_of(&t, Role::Client, 80), [2, 0]);
    // A light dump that started at 1 s saw neither (the first was gone: a full timewait
    // table, say) and one more that events never showed.
    let dump = [
        diag(Listen, "0.0.0.0:22", "0.0.0.0:0"),
        timewait("10.0.0.1:40009", S),
    ];
    t.refresh(&dump, SEC, 3 * SEC, FIN);
    assert_eq!(
        tw_of(&t, Role::Client, 80),
        [2, 0],
        "40009 and the late 40005"
    );
    // A dump that saw the late one does not count it twice.
    t.refresh(&[timewait(late, S)], 4 * SEC, 4 * SEC, FIN);
    assert_eq!(tw_of(&t, Role::Client, 80), [1, 0]);
}

#[test]
fn a_light_dump_names_lingering_sockets_and_corrects_nothing() {
    let mut t = table();
    let (srv, cli) = ("10.0.0.2:8080", "10.0.0.9:50000");
    t.apply(&tr(SOCK_A, 1_000, Listen, SynRecv, srv, cli));
    t.apply(&tr(SOCK_A, 2_000, SynRecv, Established, srv, cli));
    t.apply(&tr(SOCK_A, 3_000, Established, CloseWait, srv, cli));
    t.apply(&tr(SOCK_B, 1_000, Close, SynSent, "10.0.0.1:0", S));
    t.apply(&tr(SOCK_B, 2_000, SynSent, Established, C, S));
    let mut cw = diag(CloseWait, srv, cli);
    cw.inode = 4242;
    // The dump holds neither the established socket (not asked for) nor anything to correct.
    t.refresh(&[cw], SEC, SEC, FIN);
    assert_eq!(t.get(SOCK_A).unwrap().inode, 4242);
    assert_eq!(t.get(SOCK_B).unwrap().state, Established, "not dropped");
    let r = t.reconcile_totals();
    assert_eq!((r.runs, r.full_runs), (1, 0));
    assert_eq!(r.corrections, Corrections::default());
}

#[test]
fn a_new_connection_on_the_tuple_of_a_time_wait_socket_ends_it() {
    let mut t = table();
    // The server closes first: its side keeps TIME_WAIT for (80, 40000).
    let (srv, cli) = ("10.0.0.2:80", "10.0.0.1:40000");
    t.apply(&tr(SOCK_A, 1_000, Close, Listen, "0.0.0.0:80", "0.0.0.0:0"));
    t.apply(&tr(SOCK_B, 2_000, Listen, SynRecv, srv, cli));
    t.apply(&tr(SOCK_B, 3_000, SynRecv, Established, srv, cli));
    t.apply(&tr(SOCK_B, 4_000, Established, FinWait1, srv, cli));
    t.apply(&tr(SOCK_B, 5_000, FinWait1, FinWait2, srv, cli));
    t.apply(&tr(SOCK_B, 6_000, FinWait2, Close, srv, cli));
    assert_eq!(tw_of(&t, Role::Server, 80), [1, 0]);
    // The client picks port 40000 again: the kernel hands the tuple to the new connection.
    t.apply(&tr(3, SEC, Listen, SynRecv, srv, "10.0.0.1:0"));
    t.apply(&tr(3, SEC, SynRecv, Established, srv, cli));
    assert_eq!(tw_of(&t, Role::Server, 80), [0, 0]);
    // Another tuple's would not have gone.
    t.apply(&tr(4, 2 * SEC, Listen, SynRecv, srv, "10.0.0.1:40001"));
    assert_eq!(tw_of(&t, Role::Server, 80), [0, 0]);
}
