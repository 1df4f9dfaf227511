//! The diagnosis families: how connections end, failed connects, and ephemeral ports in use
//! per destination. Built from the same view as the rest, at scrape time.
use prometheus::proto::{MetricFamily, MetricType};

use super::{counter, family, gauge, port_labels};
use crate::model::query::View;
use crate::model::table::ephemeral::EXPORT_SHARE;
use crate::model::teardown::{CloseHow, Teardown};

pub(super) fn families(view: &View) -> Vec<MetricFamily> {
    let mut closes = family(
        "tcpstate_closes_total",
        "Connections that ended, per service port and role, by how: local_first (this side sent FIN first), remote_first (the peer did), simultaneous (both at once), reset (no orderly FIN exchange: RST sent or received).",
        MetricType::COUNTER,
    );
    let mut failures = family(
        "tcpstate_connect_failures_total",
        "Connections that never completed their handshake, per port that had one: SYN_SENT -> CLOSE for clients (refused, unreachable, timed out); SYN_RECV -> CLOSE for servers, which the kernel shows only for full sockets (a handshake that never completes stays in a request socket the tracepoint does not see).",
        MetricType::COUNTER,
    );
    for (role, key, stats) in &view.table.ports {
        let td = Teardown::of(stats);
        let port = key.label();
        let netns = key.netns().map(|n| n.to_string());
        let labels = |more: &[(&'static str, &'static str)]| {
            port_labels(&port, role.label(), netns.as_deref(), more)
        };
        for how in CloseHow::ALL {
            let n = td.closes[how as usize];
            if n > 0 {
                let l = labels(&[("how", how.label())]);
                closes.mut_metric().push(counter(&l, n as f64));
            }
        }
        // Only ports that had one: a series per client port would cost as much as the
        // connection counts.
        if td.connect_failures > 0 {
            let n = td.connect_failures as f64;
            failures.mut_metric().push(counter(&labels(&[]), n));
        }
    }
    let mut in_use = family(
        "tcpstate_ephemeral_ports_in_use",
        "Local ports from ip_local_port_range held toward the most used destination (address and port) of this service port, TIME_WAIT included, for ports where that is at least 10% of the range; connect() fails with EADDRNOTAVAIL when it reaches tcpstate_ephemeral_port_range_size.",
        MetricType::GAUGE,
    );
    let mut range = family(
        "tcpstate_ephemeral_port_range_size",
        "Ports in ip_local_port_range of the namespace of that destination's clients.",
        MetricType::GAUGE,
    );
    for d in view
        .table
        .ephemeral
        .by_port
        .iter()
        .filter(|d| d.share() >= EXPORT_SHARE)
    {
        let port = d.key.label();
        let netns = d.key.netns().map(|n| n.to_string());
        let mut l = vec![("port", port.as_str())];
        if let Some(n) = netns.as_deref() {
            l.push(("netns", n));
        }
        in_use.mut_metric().push(gauge(&l, d.in_use as f64));
        range.mut_metric().push(gauge(&l, d.range as f64));
    }
    vec![closes, failures, in_use, range]
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, TextEncoder};
    use tcpstate_common::TcpState::*;

    use super::*;
    use crate::model::table::{DEFAULT_EPHEMERAL, Table};
    use crate::testing::tr;

    fn text(t: &Table) -> String {
        let mut table = t.snapshot();
        table.ephemeral = t.ephemeral_use();
        let view = View {
            table,
            ..View::default()
        };
        let fams: Vec<_> = families(&view)
            .into_iter()
            .filter(|f| !f.get_metric().is_empty())
            .collect();
        let mut out = Vec::new();
        TextEncoder::new().encode(&fams, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn closes_failures_and_ephemeral_use_are_exported_per_port() {
        let mut t = Table::new(16, DEFAULT_EPHEMERAL);
        // Four ephemeral ports: the one connection left open holds 25% of them.
        t.set_ephemeral_ranges([(0, 40000..=40003)]);
        let (c, s) = ("10.0.0.1:40000", "10.0.0.2:80");
        // A reset, a failed connect, and one connection still open toward 10.0.0.2:80.
        t.apply(&tr(1, 1, Close, SynSent, "10.0.0.1:0", s));
        t.apply(&tr(1, 2, SynSent, Established, c, s));
        t.apply(&tr(1, 3, Established, Close, c, s));
        t.apply(&tr(2, 4, Close, SynSent, "10.0.0.1:0", s));
        t.apply(&tr(2, 5, SynSent, Close, "10.0.0.1:40001", s));
        t.apply(&tr(3, 6, Close, SynSent, "10.0.0.1:0", s));
        t.apply(&tr(3, 7, SynSent, Established, "10.0.0.1:40002", s));
        // A server port with an orderly close and no failure: no failure series.
        let (l, r) = ("10.0.0.1:8080", "10.0.0.9:50000");
        let path = [Listen, SynRecv, Established, CloseWait, LastAck, Close];
        for (i, w) in path.windows(2).enumerate() {
            t.apply(&tr(4, 8 + i as u64, w[0], w[1], l, r));
        }
        // A client port whose connections all succeed, toward a destination that holds less
        // than a tenth of its range: no failure series, no ephemeral series.
        t.apply(&tr(5, 13, Close, SynSent, "10.0.0.1:0", "10.0.0.3:443"));
        t.apply(&tr(
            5,
            14,
            SynSent,
            Established,
            "10.0.0.1:45000",
            "10.0.0.3:443",
        ));
        let out = text(&t);
        let size = 4;
        for line in [
            "tcpstate_closes_total{port=\"80\",role=\"client\",how=\"reset\"} 1".to_string(),
            "tcpstate_closes_total{port=\"8080\",role=\"server\",how=\"remote_first\"} 1".into(),
            "tcpstate_connect_failures_total{port=\"80\",role=\"client\"} 1".into(),
            "tcpstate_ephemeral_ports_in_use{port=\"80\"} 1".into(),
            format!("tcpstate_ephemeral_port_range_size{{port=\"80\"}} {size}"),
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
        assert!(!out.contains("how=\"local_first\""), "{out}");
        assert!(
            !out.contains("connect_failures_total{port=\"8080\""),
            "{out}"
        );
        assert!(!out.contains("{port=\"443\""), "{out}");
    }
}
