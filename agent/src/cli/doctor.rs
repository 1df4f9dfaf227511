//! `tcpstate doctor`: asks the agent for its findings and prints them, the most severe first.
//! The exit status says the worst: 0 none, 1 warnings, 2 critical, 3 the agent could not be
//! asked, so that scripts can use it.
use std::process::ExitCode;

use super::args::DoctorArgs;
use super::client::Client;
use crate::serve::api::protocol::{Command, DoctorReport, FindingRow, OwnerRow};

/// Exit statuses.
pub const HEALTHY: u8 = 0;
pub const WARNINGS: u8 = 1;
pub const CRITICAL: u8 = 2;
pub const UNREACHABLE: u8 = 3;

/// Width the explanations are wrapped to.
const WIDTH: usize = 100;

pub fn doctor(args: &DoctorArgs) -> ExitCode {
    let command = Command::Doctor { port: args.port };
    let reply = match Client::connect(&args.client.socket).and_then(|mut c| c.ask(command)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tcpstate: {e}");
            return ExitCode::from(UNREACHABLE);
        }
    };
    let report = reply.doctor.unwrap_or_default();
    if args.client.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", render(&report));
    }
    ExitCode::from(status(&report))
}

/// The exit status a report gives.
pub fn status(r: &DoctorReport) -> u8 {
    if r.findings.iter().any(|f| f.severity == "critical") {
        CRITICAL
    } else if r.findings.is_empty() {
        HEALTHY
    } else {
        WARNINGS
    }
}

fn title(kind: &str) -> &str {
    match kind {
        "close_wait_leak" => "CLOSE_WAIT leak",
        "fin_wait2_held" => "FIN_WAIT_2 held open",
        "fin_wait2_orphaned" => "orphaned FIN_WAIT_2",
        "ephemeral_ports_exhausting" => "ephemeral ports running out",
        "resets" => "connections reset",
        "connect_failures" => "connects failing",
        other => other,
    }
}

fn owner(o: &OwnerRow) -> String {
    let command = if o.command.is_empty() {
        "exited"
    } else {
        &o.command
    };
    let mut s = format!("pid {} ({command})", o.pid);
    if let Some(c) = &o.container {
        s.push_str(&format!(" in container {}", &c[..12.min(c.len())]));
    }
    s
}

fn where_text(f: &FindingRow) -> String {
    let mut s = format!("port {}, {} side", f.port, f.role);
    if let Some(d) = &f.destination {
        s.push_str(&format!(", toward {d}"));
    }
    if !f.netns.is_empty() {
        let ns: Vec<String> = f.netns.iter().map(|n| n.to_string()).collect();
        s.push_str(&format!(", netns {}", ns.join(", ")));
    }
    if !f.peers.is_empty() && f.destination.is_none() {
        let peers: Vec<String> = f
            .peers
            .iter()
            .map(|p| format!("{} ({})", p.address, p.count))
            .collect();
        s.push_str(&format!("; peers {}", peers.join(", ")));
    }
    s
}

fn who_text(f: &FindingRow) -> String {
    if !f.owners.is_empty() {
        let held: Vec<String> = f.owners.iter().map(owner).collect();
        let verb = match f.kind.as_str() {
            "close_wait_leak" | "fin_wait2_held" => "holding them",
            _ => "listening on the port",
        };
        return format!("{}, {verb}", held.join("; "));
    }
    if !f.opened_by.is_empty() {
        let by: Vec<String> = f.opened_by.iter().map(owner).collect();
        return format!("{}, which connected them", by.join("; "));
    }
    match f.kind.as_str() {
        "fin_wait2_orphaned" => "no process: the kernel holds orphaned sockets".into(),
        "ephemeral_ports_exhausting" => format!(
            "no process holds TIME_WAIT sockets; `tcpstate conns --port {} --role client` names the owners of the live ones",
            f.port
        ),
        _ => "unknown (the process is gone, or not ours to read)".into(),
    }
}

/// One labelled paragraph, wrapped and indented under its label.
fn paragraph(label: &str, text: &str) -> String {
    let first = format!("  {label:<6} ");
    let rest = " ".repeat(first.len());
    let options = textwrap::Options::new(WIDTH)
        .initial_indent(&first)
        .subsequent_indent(&rest);
    let mut s = textwrap::fill(text, options);
    s.push('\n');
    s
}

/// The report for people.
pub(crate) fn render(r: &DoctorReport) -> String {
    let tracked = format!("{} connections tracked", r.tracked_sockets);
    if r.findings.is_empty() {
        return format!("healthy: no findings ({tracked})\n");
    }
    let count = |sev: &str| r.findings.iter().filter(|f| f.severity == sev).count();
    let (crit, warn) = (count("critical"), count("warning"));
    let warnings = if warn == 1 { "warning" } else { "warnings" };
    let mut out = format!("tcpstate doctor: {crit} critical, {warn} {warnings} ({tracked})\n");
    for f in &r.findings {
        out.push('\n');
        let sev = f.severity.to_ascii_uppercase();
        out.push_str(&format!(
            "{sev:<9} {} on port {} ({})\n",
            title(&f.kind),
            f.port,
            f.role
        ));
        out.push_str(&paragraph("what", &f.what));
        out.push_str(&paragraph("where", &where_text(f)));
        out.push_str(&paragraph("who", &who_text(f)));
        out.push_str(&paragraph("why", &f.why));
        out.push_str(&paragraph("fix", &f.fix));
    }
    if !r.destinations.is_empty() {
        out.push_str("\nephemeral ports in use, by destination:\n");
        for d in &r.destinations {
            out.push_str(&format!(
                "  {:<24} {:>6} of {:<6} {:>4.0}%\n",
                d.destination,
                d.in_use,
                d.range_size,
                d.share * 100.0
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::render::tests::golden;
    use crate::serve::api::protocol::{DestinationRow, PeerRow};

    fn leak() -> FindingRow {
        FindingRow {
            severity: "critical".into(),
            kind: "close_wait_leak".into(),
            port: "8080".into(),
            role: "server".into(),
            netns: vec![4026531840],
            count: 120,
            oldest_seconds: Some(723.0),
            peers: vec![
                PeerRow {
                    address: "10.0.0.5".into(),
                    count: 80,
                },
                PeerRow {
                    address: "10.0.0.6".into(),
                    count: 40,
                },
            ],
            owners: vec![OwnerRow {
                pid: 4242,
                command: "python3".into(),
                cgroup: "/system.slice/app.service".into(),
                container: None,
            }],
            what: "120 connections in CLOSE_WAIT for longer than 1 min 0 s; the oldest for 12 min 3 s".into(),
            why: "the peer closed its side (sent FIN) and the process holding the socket has not called close() or shutdown(): it never read to EOF, or read EOF and forgot to close, often on an error path.".into(),
            fix: "fix the application: close the socket once a read returns EOF.".into(),
            ..FindingRow::default()
        }
    }

    fn exhaustion() -> FindingRow {
        FindingRow {
            severity: "warning".into(),
            kind: "ephemeral_ports_exhausting".into(),
            port: "443".into(),
            role: "client".into(),
            count: 150,
            share: Some(0.75),
            destination: Some("10.0.0.9:443".into()),
            range_size: Some(200),
            peers: vec![PeerRow {
                address: "10.0.0.9".into(),
                count: 150,
            }],
            what: "150 of 200 local ports (75%) in use toward 10.0.0.9:443, TIME_WAIT included"
                .into(),
            why: "each connection takes a local port.".into(),
            fix: "reuse connections.".into(),
            ..FindingRow::default()
        }
    }

    fn report() -> DoctorReport {
        DoctorReport {
            findings: vec![leak(), exhaustion()],
            destinations: vec![DestinationRow {
                destination: "10.0.0.9:443".into(),
                port: "443".into(),
                netns: None,
                in_use: 150,
                range_size: 200,
                share: 0.75,
            }],
            tracked_sockets: 1234,
        }
    }

    #[test]
    fn golden_doctor_layout() {
        golden("doctor.txt", &render(&report()));
    }

    #[test]
    fn a_healthy_host_says_so_in_one_line_and_exits_0() {
        let healthy = DoctorReport {
            tracked_sockets: 12,
            ..DoctorReport::default()
        };
        assert_eq!(
            render(&healthy),
            "healthy: no findings (12 connections tracked)\n"
        );
        assert_eq!(status(&healthy), HEALTHY);
    }

    #[test]
    fn the_exit_status_is_the_worst_finding() {
        let mut r = report();
        assert_eq!(status(&r), CRITICAL);
        r.findings.remove(0);
        assert_eq!(status(&r), WARNINGS);
    }
}
