//! Ephemeral ports per destination: live clients and dumped timewait sockets, against the
//! range of their namespace.
use super::*;

const NS: u32 = 4026531840;

#[test]
fn ports_in_use_are_counted_per_destination_against_the_namespace_range() {
    let mut t = table().netns_in_events(true);
    t.set_ephemeral_ranges([(NS, 40000..=40199)]);
    // Two live clients toward 10.0.0.2:80 and one toward 10.0.0.3:80, one toward :443.
    let live = [
        (1, "10.0.0.1:40001", "10.0.0.2:80"),
        (2, "10.0.0.1:40002", "10.0.0.2:80"),
        (3, "10.0.0.1:40003", "10.0.0.3:80"),
        (4, "10.0.0.1:40004", "10.0.0.2:443"),
    ];
    for (sock, local, remote) in live {
        let mut open = tr(sock, 1, Close, SynSent, "10.0.0.1:0", remote);
        open.netns = NS;
        t.apply(&open);
        let mut up = tr(sock, 2, SynSent, Established, local, remote);
        up.netns = NS;
        t.apply(&up);
    }
    // A server's accepted socket is not a client; a local port outside the range is not
    // ephemeral (an explicit bind()).
    let mut accepted = tr(5, 3, Listen, SynRecv, "10.0.0.1:80", "10.0.0.9:40005");
    accepted.netns = NS;
    t.apply(&accepted);
    let mut bound = tr(6, 3, Close, SynSent, "10.0.0.1:0", "10.0.0.2:80");
    bound.netns = NS;
    t.apply(&bound);
    let mut bound = tr(6, 4, SynSent, Established, "10.0.0.1:1234", "10.0.0.2:80");
    bound.netns = NS;
    t.apply(&bound);
    // Three TIME_WAIT toward 10.0.0.2:80 in the dump.
    let dump: Vec<KernelSocket> = (0..3)
        .map(|i| timewait(&format!("10.0.0.1:{}", 40100 + i), "10.0.0.2:80"))
        .collect();
    t.reconcile(&dump, 0, 10, FIN);

    let e = t.ephemeral_use();
    let at80 = e
        .by_port
        .iter()
        .find(|d| d.key == PortKey::Port(80))
        .unwrap();
    assert_eq!(at80.remote.addr(), "10.0.0.2:80".parse().unwrap());
    assert_eq!((at80.in_use, at80.range, at80.netns), (5, 200, NS));
    assert!((at80.share() - 0.025).abs() < 1e-9);
    let at443 = e
        .by_port
        .iter()
        .find(|d| d.key == PortKey::Port(443))
        .unwrap();
    assert_eq!(at443.in_use, 1);
    assert_eq!(e.by_port.len(), 2, "{e:?}");
    let top: Vec<(String, u64)> = e
        .top
        .iter()
        .map(|d| (d.remote.to_string(), d.in_use))
        .collect();
    assert_eq!(
        top,
        [
            ("10.0.0.2:80".to_string(), 5),
            ("10.0.0.3:80".to_string(), 1),
            ("10.0.0.2:443".to_string(), 1),
        ]
    );
    // The next dump, with the timewait sockets gone, replaces the timewait part.
    let dump: Vec<KernelSocket> = live
        .iter()
        .map(|(_, local, remote)| diag(Established, local, remote))
        .collect();
    t.reconcile(&dump, 20, 30, FIN);
    let e = t.ephemeral_use();
    let total: u64 = e.top.iter().map(|d| d.in_use).sum();
    assert_eq!(total, 4, "{e:?}");
}

#[test]
fn without_a_range_from_the_dump_the_agent_range_is_used() {
    let mut t = table();
    let dump = [timewait("10.0.0.1:40000", "10.0.0.2:80")];
    t.reconcile(&dump, 0, 10, FIN);
    let e = t.ephemeral_use();
    assert_eq!(e.top.len(), 1);
    let size = u64::from(*DEFAULT_EPHEMERAL.end() - *DEFAULT_EPHEMERAL.start()) + 1;
    assert_eq!(e.top[0].range, size);
}
