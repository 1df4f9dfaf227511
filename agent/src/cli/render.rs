//! How the CLI shows replies to people. Pure, so that golden files can pin the layout.
use std::io::IsTerminal;

use crate::serve::api::protocol::{ConnRow, EventRow, PortRow, Status};

/// Whether to colour: only on a terminal, and not when NO_COLOR is set.
pub(crate) fn use_colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn state_name(label: &str) -> String {
    label.to_ascii_uppercase()
}

/// Left-aligned columns separated by two spaces; the rows flagged `true` are highlighted.
fn table(header: &[&str], rows: &[(Vec<String>, bool)], colour: bool) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for (r, _) in rows {
        for (i, cell) in r.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    out.push('\n');
    for (r, hot) in rows {
        let l = line(r);
        if *hot && colour {
            out.push_str(&format!("\x1b[31m{l}\x1b[0m"));
        } else {
            out.push_str(&l);
        }
        out.push('\n');
    }
    out
}

/// `tcpstate ports`.
pub(crate) fn ports(rows: &[PortRow], colour: bool) -> String {
    if rows.is_empty() {
        return "no connections tracked yet\n".into();
    }
    let netns = rows.iter().any(|r| r.netns.is_some());
    let mut header = vec!["PORT", "ROLE"];
    if netns {
        header.push("NETNS");
    }
    header.extend([
        "TOTAL",
        "ESTAB",
        "CLOSE_WAIT",
        "FIN_WAIT2",
        "TIME_WAIT",
        "OTHER",
        "LINGERING",
        "OLDEST",
        "RESETS",
        "FAILED",
    ]);
    let body: Vec<(Vec<String>, bool)> = rows
        .iter()
        .map(|r| {
            let n = |s: &str| r.states.get(s).copied().unwrap_or(0);
            let named = n("established") + n("close_wait") + n("fin_wait2") + n("time_wait");
            let mut cells = vec![r.port.clone(), r.role.clone()];
            if netns {
                cells.push(r.netns.map_or("-".into(), |n| n.to_string()));
            }
            cells.extend([
                r.total.to_string(),
                n("established").to_string(),
                n("close_wait").to_string(),
                n("fin_wait2").to_string(),
                n("time_wait").to_string(),
                (r.total - named).to_string(),
                r.lingering.to_string(),
                if r.lingering > 0 {
                    human_duration(r.oldest_lingering_seconds)
                } else {
                    "-".into()
                },
                if r.closes > 0 {
                    format!("{}/{}", r.resets, r.closes)
                } else {
                    "-".into()
                },
                r.connect_failures.to_string(),
            ]);
            (cells, r.lingering > 0)
        })
        .collect();
    table(&header, &body, colour)
}

fn owner_text(r: &ConnRow) -> String {
    match r.owners.first() {
        Some(o) => {
            let mut s = format!("{} {}", o.pid, o.command);
            if let Some(c) = &o.container {
                s.push_str(&format!(" ({})", &c[..12.min(c.len())]));
            }
            if r.owners.len() > 1 {
                s.push_str(&format!(" +{}", r.owners.len() - 1));
            }
            s
        }
        None if r.opened_by_pid != 0 => format!("{} (connected)", r.opened_by_pid),
        None => "-".into(),
    }
}

/// `tcpstate conns`.
pub(crate) fn conns(rows: &[ConnRow], colour: bool) -> String {
    if rows.is_empty() {
        return "no matching connections\n".into();
    }
    // A namespace column when the rows come from more than one network namespace.
    let netns = rows.iter().any(|r| r.netns != rows[0].netns);
    let body: Vec<(Vec<String>, bool)> = rows
        .iter()
        .map(|r| {
            let age = format!(
                "{}{}",
                if r.age_is_lower_bound { ">" } else { "" },
                human_duration(r.age_seconds)
            );
            let mut cells = vec![
                r.local.clone(),
                r.remote.clone(),
                state_name(&r.state),
                age,
                r.role.clone(),
                r.service_port.to_string(),
            ];
            if netns {
                cells.push(r.netns.to_string());
            }
            cells.push(if r.lingering {
                "yes".into()
            } else {
                "-".into()
            });
            cells.push(owner_text(r));
            (cells, r.lingering)
        })
        .collect();
    let mut header = vec!["LOCAL", "REMOTE", "STATE", "AGE", "ROLE", "PORT"];
    if netns {
        header.push("NETNS");
    }
    header.extend(["LINGERING", "OWNER"]);
    let mut out = table(&header, &body, colour);
    if rows.iter().any(|r| r.age_is_lower_bound) {
        out.push_str(
            "> age is a lower bound: the socket was there before the agent saw it change\n",
        );
    }
    out
}

/// One line of `tcpstate watch`.
pub(crate) fn event(e: &EventRow) -> String {
    let secs = e.time_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let spent = e
        .spent_seconds
        .map_or(String::new(), |s| format!("  after {}", human_duration(s)));
    format!(
        "{h:02}:{m:02}:{s:02}.{:03}  {} -> {}  {} -> {}{spent}",
        e.time_ms % 1000,
        state_name(&e.from),
        state_name(&e.to),
        e.local,
        e.remote
    )
}

/// `tcpstate status`.
pub(crate) fn status(s: &Status) -> String {
    let rows = [
        ("version", format!("{} (API v{})", s.version, s.api_version)),
        ("uptime", human_duration(s.uptime_seconds)),
        ("kernel", s.kernel.clone()),
        (
            "events",
            format!("{} ({:.0}/s)", s.events_total, s.events_per_second),
        ),
        (
            "lost events",
            format!(
                "{} in the kernel, {} in the agent",
                s.events_lost_kernel, s.events_lost_agent
            ),
        ),
        ("tracked sockets", s.tracked_sockets.to_string()),
        ("lingering", s.lingering.to_string()),
        ("ring buffer", format!("{} KiB", s.ring_buffer_bytes / 1024)),
        (
            "last reconciliation",
            s.last_reconcile_seconds_ago.map_or("not yet".into(), |a| {
                format!("{} ago ({} so far)", human_duration(a), s.reconciliations)
            }),
        ),
    ];
    rows.iter()
        .map(|(k, v)| format!("{:<20} {v}\n", format!("{k}:")))
        .collect()
}

/// Formats seconds for people: `450ms`, `12s`, `3m12s`, `2h03m`, `4d07h`.
pub(crate) fn human_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    if secs < 0.001 {
        return format!("{}µs", (secs * 1e6).round() as u64);
    }
    if secs < 1.0 {
        return format!("{}ms", (secs * 1000.0).round() as u64);
    }
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::serve::api::protocol::OwnerRow;

    fn port_rows() -> Vec<PortRow> {
        vec![
            PortRow {
                port: "8080".into(),
                role: "server".into(),
                netns: None,
                states: [("established", 12), ("close_wait", 3), ("listen", 1)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                total: 16,
                lingering: 3,
                lingering_close_wait: 3,
                lingering_fin_wait2: 0,
                oldest_lingering_seconds: 192.4,
                closes: 250,
                resets: 31,
                connect_failures: 0,
            },
            PortRow {
                port: "5432".into(),
                role: "client".into(),
                netns: None,
                states: [("established", 40), ("time_wait", 7)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                total: 47,
                closes: 900,
                connect_failures: 12,
                ..PortRow::default()
            },
        ]
    }

    fn conn_rows() -> Vec<ConnRow> {
        vec![
            ConnRow {
                local: "10.0.0.2:8080".into(),
                remote: "10.0.0.7:51234".into(),
                state: "close_wait".into(),
                age_seconds: 192.4,
                age_is_lower_bound: true,
                role: "server".into(),
                service_port: 8080,
                netns: 4026531840,
                lingering: true,
                inode: 4242,
                owners: vec![OwnerRow {
                    pid: 1234,
                    command: "nginx".into(),
                    cgroup: "/system.slice/docker-3f9c.scope".into(),
                    container: Some(
                        "3f9c2d4e5b6a7980c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192".into(),
                    ),
                }],
                opened_by_pid: 0,
            },
            ConnRow {
                local: "10.0.0.2:45000".into(),
                remote: "10.0.0.3:5432".into(),
                state: "established".into(),
                age_seconds: 3.2,
                age_is_lower_bound: false,
                role: "client".into(),
                service_port: 5432,
                netns: 4026531840,
                lingering: false,
                inode: 0,
                owners: vec![],
                opened_by_pid: 777,
            },
        ]
    }

    /// Compares with `tests/golden/NAME`; `UPDATE_GOLDEN=1` rewrites the file instead.
    pub(crate) fn golden(name: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, actual).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
                path.display()
            )
        });
        assert_eq!(
            actual, expected,
            "{name} changed; if intended, run `UPDATE_GOLDEN=1 cargo test -p tcpstate golden`"
        );
    }

    #[test]
    fn golden_ports_layout() {
        golden("ports.txt", &ports(&port_rows(), false));
    }

    #[test]
    fn golden_conns_layout() {
        golden("conns.txt", &conns(&conn_rows(), false));
    }

    #[test]
    fn golden_conns_layout_across_namespaces() {
        let mut rows = conn_rows();
        rows[1].netns = 4026532246;
        golden("conns-netns.txt", &conns(&rows, false));
    }

    #[test]
    fn colour_only_marks_lingering_rows() {
        let plain = ports(&port_rows(), false);
        let coloured = ports(&port_rows(), true);
        assert!(!plain.contains('\x1b'));
        assert_eq!(coloured.matches("\x1b[31m").count(), 1, "one lingering row");
    }

    #[test]
    fn events_and_status_read_well() {
        let e = EventRow {
            time_ms: 3_723_004,
            from: "established".into(),
            to: "close_wait".into(),
            local: "10.0.0.2:8080".into(),
            remote: "10.0.0.7:51234".into(),
            spent_seconds: Some(0.3),
            netns: 0,
            pid: 0,
        };
        assert_eq!(
            event(&e),
            "01:02:03.004  ESTABLISHED -> CLOSE_WAIT  10.0.0.2:8080 -> 10.0.0.7:51234  after 300ms"
        );
        let s = status(&Status {
            version: "0.1.0".into(),
            api_version: 1,
            uptime_seconds: 3700.0,
            events_total: 10,
            ..Status::default()
        });
        assert!(s.contains("uptime:              1h01m\n"), "{s}");
        assert!(s.contains("last reconciliation: not yet\n"), "{s}");
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(human_duration(0.45), "450ms");
        assert_eq!(human_duration(0.000_012), "12µs");
        assert_eq!(human_duration(12.9), "12s");
        assert_eq!(human_duration(192.0), "3m12s");
        assert_eq!(human_duration(7380.0), "2h03m");
        assert_eq!(human_duration(4.0 * 86_400.0 + 7.0 * 3600.0), "4d07h");
        assert_eq!(human_duration(-1.0), "-");
    }
}
