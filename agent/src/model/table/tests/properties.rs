//! Properties: whatever the events and dumps, the counts equal the sockets held.
use super::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Apply(u64, TcpState, TcpState, u16, u16),
    Dump(Vec<(TcpState, u16, u16, bool)>),
    Retire(u64),
}

fn state() -> impl Strategy<Value = TcpState> {
    prop::sample::select(TcpState::ALL.to_vec())
}

fn port() -> impl Strategy<Value = u16> {
    prop::sample::select(vec![0u16, 22, 80, 8080, 40_000, 40_001, 50_000])
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // A handful of kernel addresses, so that they are reused.
        6 => (0u64..5, state(), state(), port(), port())
            .prop_map(|(s, o, n, l, r)| Op::Apply(SOCK_A + s * 0x100, o, n, l, r)),
        1 => prop::collection::vec((state(), port(), port(), any::<bool>()), 0..6)
            .prop_map(Op::Dump),
        1 => (0u64..400).prop_map(Op::Retire),
    ]
}

/// `current` and `seeded` of every port equal the sockets the table holds there.
fn check(t: &Table) -> Result<(), TestCaseError> {
    let mut want: FxHashMap<(Role, PortKey), ([u64; STATES], [u64; STATES])> = FxHashMap::default();
    for c in t.conns.values() {
        let e = want.entry((c.role, c.key)).or_default();
        e.0[c.state.index()] += 1;
        if c.seeded {
            e.1[c.state.index()] += 1;
        }
        prop_assert!(
            t.stats.contains_key(&(c.role, c.key)),
            "no aggregate for {c:?}"
        );
    }
    for (k, s) in &t.stats {
        let (cur, seeded) = want.get(k).copied().unwrap_or_default();
        prop_assert_eq!(s.current, cur, "current of {:?}", k);
        prop_assert_eq!(s.seeded, seeded, "seeded of {:?}", k);
    }
    let slots = t.stats.keys().filter(|(_, k)| !k.is_other()).count();
    prop_assert_eq!(slots, t.slots[0] + t.slots[1]);
    prop_assert!(t.slots.iter().all(|&n| n <= t.max_ports));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]
    #[test]
    fn counts_always_equal_the_sockets_held(ops in prop::collection::vec(op(), 1..60)) {
        let mut t = Table::new(3, DEFAULT_EPHEMERAL);
        let mut now = 0u64;
        for op in ops {
            now += SEC;
            match op {
                Op::Apply(sock, old, new, l, r) => {
                    let mut e = tr(sock, now, old, new, "10.0.0.1:0", "10.0.0.2:0");
                    e.local.set_port(l);
                    e.remote.set_port(r);
                    t.apply(&e);
                }
                Op::Dump(socks) => {
                    let dump: Vec<KernelSocket> = socks
                        .into_iter()
                        .map(|(st, l, r, tw)| {
                            let mut d = diag(st, "10.0.0.1:0", "10.0.0.2:0");
                            d.netns = 0;
                            d.local.set_port(l);
                            d.remote.set_port(r);
                            d.timewait = tw && matches!(st, TimeWait | FinWait2);
                            d
                        })
                        .collect();
                    t.reconcile(&dump, now - SEC / 2, now, FIN);
                }
                Op::Retire(idle) => {
                    t.retire_idle(now, idle * SEC);
                }
            }
            check(&t)?;
        }
    }
}
