//! How connections end, per port: the transitions into `CLOSE` a port has counted, read by
//! [`CloseHow`].
use tcpstate_common::TcpState;

pub(crate) use super::ending::CloseHow;
use super::table::PortStats;

/// A port's teardown counts, since it got its slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Teardown {
    /// Per [`CloseHow::ALL`].
    pub(crate) closes: [u64; 4],
    /// `SYN_SENT -> CLOSE` (clients) or `SYN_RECV -> CLOSE` (servers).
    pub(crate) connect_failures: u64,
    /// Connections that opened: `CLOSE -> SYN_SENT` or `LISTEN -> SYN_RECV`.
    pub(crate) opens: u64,
}

impl Teardown {
    pub(crate) fn of(stats: &PortStats) -> Teardown {
        use TcpState::*;
        let into_close = |from: TcpState| stats.transitions[from.index()][Close.index()];
        let mut closes = [0; 4];
        for from in TcpState::ALL {
            if let Some(how) = CloseHow::of(from) {
                closes[how as usize] += into_close(from);
            }
        }
        Teardown {
            closes,
            connect_failures: into_close(SynSent) + into_close(SynRecv),
            opens: stats.transitions[Close.index()][SynSent.index()]
                + stats.transitions[Listen.index()][SynRecv.index()],
        }
    }

    pub(crate) fn closed(&self) -> u64 {
        self.closes.iter().sum()
    }

    pub(crate) fn resets(&self) -> u64 {
        self.closes[CloseHow::Reset as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::table::{DEFAULT_EPHEMERAL, PortKey, Role, Table};
    use crate::testing::tr;
    use TcpState::*;

    const C: &str = "10.0.0.1:40000";
    const S: &str = "10.0.0.2:80";

    /// One client connection to port 80 through `path` (its states after `SYN_SENT`).
    fn client_through(t: &mut Table, sock: u64, path: &[TcpState]) {
        t.apply(&tr(sock, 1, Close, SynSent, "10.0.0.1:0", S));
        let mut old = SynSent;
        for (i, &new) in path.iter().enumerate() {
            t.apply(&tr(sock, 2 + i as u64, old, new, C, S));
            old = new;
        }
    }

    fn teardown(t: &Table) -> Teardown {
        let snap = t.snapshot();
        let (_, _, stats) = snap
            .ports
            .iter()
            .find(|(r, k, _)| (*r, *k) == (Role::Client, PortKey::Port(80)))
            .expect("port 80 counted");
        Teardown::of(stats)
    }

    #[test]
    fn each_way_of_ending_is_told_apart() {
        let cases: [(&[TcpState], Option<CloseHow>); 7] = [
            (
                &[Established, FinWait1, FinWait2, Close],
                Some(CloseHow::LocalFirst),
            ),
            (
                &[Established, CloseWait, LastAck, Close],
                Some(CloseHow::RemoteFirst),
            ),
            (
                &[Established, FinWait1, Closing, Close],
                Some(CloseHow::Simultaneous),
            ),
            (&[Established, Close], Some(CloseHow::Reset)),
            (&[Established, CloseWait, Close], Some(CloseHow::Reset)),
            (&[Established, FinWait1, Close], Some(CloseHow::Reset)),
            (&[Close], None),
        ];
        for (path, how) in cases {
            let mut t = Table::new(16, DEFAULT_EPHEMERAL);
            client_through(&mut t, 1, path);
            let td = teardown(&t);
            let mut want = [0; 4];
            if let Some(h) = how {
                want[h as usize] = 1;
            }
            assert_eq!(td.closes, want, "{path:?}");
            assert_eq!(td.connect_failures, u64::from(how.is_none()), "{path:?}");
            assert_eq!(td.opens, 1);
        }
    }

    #[test]
    fn counts_add_up_over_connections_and_listeners_are_not_closes() {
        let mut t = Table::new(16, DEFAULT_EPHEMERAL);
        client_through(&mut t, 1, &[Established, Close]);
        client_through(&mut t, 2, &[Established, Close]);
        client_through(&mut t, 3, &[Established, FinWait1, FinWait2, Close]);
        client_through(&mut t, 4, &[Close]);
        let td = teardown(&t);
        assert_eq!((td.resets(), td.closed(), td.connect_failures), (2, 3, 1));
        assert_eq!(td.opens, 4);

        let mut t = Table::new(16, DEFAULT_EPHEMERAL);
        t.apply(&tr(9, 1, Close, Listen, "0.0.0.0:80", "0.0.0.0:0"));
        t.apply(&tr(9, 2, Listen, Close, "0.0.0.0:80", "0.0.0.0:0"));
        let snap = t.snapshot();
        let stats = &snap.ports[0].2;
        assert_eq!(Teardown::of(stats), Teardown::default());
    }
}
