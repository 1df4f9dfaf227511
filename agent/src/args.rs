//! The command line: `tcpstate agent` and the client commands, as one clap definition.
use clap::{Parser, Subcommand};

use crate::cli::args::{ClientArgs, ConnsArgs, DoctorArgs, WatchArgs};
use crate::config::flags::AgentArgs;

#[derive(Debug, Parser)]
#[command(
    name = "tcpstate",
    version,
    about = "Watch every TCP state transition and find connections stuck in CLOSE_WAIT or FIN_WAIT_2",
    long_about = "tcpstate follows every TCP state transition on this host with an eBPF program on \
the tracepoint sock:inet_sock_set_state, keeps a live table of connections per service port, and \
exports it as Prometheus metrics.",
    after_help = "Examples:\n  sudo tcpstate agent\n  tcpstate ports\n  tcpstate conns --port 8080 --lingering\n  tcpstate watch --state close_wait\n  curl -s localhost:10610/metrics | grep close_wait"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load the eBPF program and serve metrics until SIGINT/SIGTERM.
    #[command(
        after_help = "Needs root, or CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH (tracefs is root's).\nOptional: CAP_SYS_ADMIN to mount a missing tracefs and to dump other network namespaces,\nCAP_SYS_PTRACE to name sockets' owners in other users' processes.\ndeploy/systemd/tcpstate.service grants exactly these.\n\nExamples:\n  sudo tcpstate agent --listen 127.0.0.1:10610\n  tcpstate agent --check-config --config /etc/tcpstate/tcpstate.toml"
    )]
    Agent(Box<AgentArgs>),
    /// Per service port and role: connections per state, lingering, oldest lingering age.
    #[command(
        after_help = "Sorted by lingering connections, then by total.\n\nExample:\n  tcpstate ports\n  tcpstate ports --json | jq '.[] | select(.lingering > 0)'"
    )]
    Ports(ClientArgs),
    /// The connections: addresses, state, age in state, role, owner.
    #[command(
        after_help = "Ages marked > are lower bounds (the socket existed before the agent saw it change).\n\nExample:\n  tcpstate conns --port 8080 --state close_wait\n  tcpstate conns --lingering --json"
    )]
    Conns(ConnsArgs),
    /// Live transitions, one line each, with the time spent in the state left.
    #[command(
        after_help = "Runs until interrupted. A watch that cannot keep up is disconnected by the agent.\n\nExample:\n  tcpstate watch --port 8080\n  tcpstate watch --state close_wait --json"
    )]
    Watch(WatchArgs),
    /// The agent: version, uptime, kernel, event rate, losses, tracked sockets.
    #[command(after_help = "Example:\n  tcpstate status")]
    Status(ClientArgs),
    /// What is wrong, in plain words: leaks, half-closed connections, port exhaustion, resets,
    /// failed connects; where, who, why and what to do. The most severe first.
    #[command(
        after_help = "Exit status: 0 no findings, 1 warnings, 2 critical findings, 3 the agent could not be asked.\n\nExample:\n  tcpstate doctor\n  tcpstate doctor --port 8080 --json"
    )]
    Doctor(DoctorArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linger::Thresholds;
    use std::time::Duration;

    #[test]
    fn the_agent_help_names_every_capability_the_agent_checks() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("agent")
            .unwrap()
            .render_long_help()
            .to_string();
        for cap in [
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_DAC_READ_SEARCH",
            "CAP_SYS_ADMIN",
            "CAP_SYS_PTRACE",
        ] {
            assert!(help.contains(cap), "`tcpstate agent --help` omits {cap}");
        }
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["tcpstate", "agent"]).unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("agent")
        };
        let c = a.config();
        assert_eq!(c.listen, "0.0.0.0:10610".parse().unwrap());
        assert_eq!(c.max_ports, 512);
        assert_eq!(c.ring_bytes, 4 << 20);
        assert_eq!(c.wakeup_bytes(), 1 << 20);
        assert_eq!(c.thresholds, Thresholds::default());
    }

    #[test]
    fn linger_after_sets_both_and_per_state_flags_override() {
        let cli = Cli::try_parse_from([
            "tcpstate",
            "agent",
            "--linger-after",
            "500ms",
            "--fin-wait2-after",
            "5m",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("agent")
        };
        let t = a.config().thresholds;
        assert_eq!(t.close_wait, Duration::from_millis(500));
        assert_eq!(t.fin_wait2, Duration::from_secs(300));
    }

    #[test]
    fn bad_flags_are_rejected_with_their_name() {
        for args in [
            vec!["tcpstate", "agent", "--ring-size", "3MiB"],
            vec!["tcpstate", "agent", "--max-ports", "0"],
            vec!["tcpstate", "agent", "--listen", "nowhere"],
            vec!["tcpstate", "agent", "--bogus"],
            vec!["tcpstate", "agent", "--linger-after", "0s"],
            vec!["tcpstate", "agent", "--close-wait-after", "later"],
        ] {
            let err = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
            let flag = args[2];
            assert!(err.to_string().contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn client_filters_are_typed_and_unknown_ones_refused() {
        let cli = Cli::try_parse_from([
            "tcpstate",
            "conns",
            "--state",
            "CLOSE-WAIT",
            "--role",
            "client",
        ])
        .unwrap();
        let Command::Conns(a) = cli.command else {
            panic!("conns")
        };
        assert_eq!(
            a.state.map(|s| s.0),
            Some(tcpstate_common::TcpState::CloseWait)
        );
        assert_eq!(a.role, Some(crate::model::table::Role::Client));
        for (args, want) in [
            (
                ["tcpstate", "conns", "--role", "servant"],
                "unknown role `servant`",
            ),
            (
                ["tcpstate", "conns", "--state", "napping"],
                "unknown state `napping`",
            ),
            (
                ["tcpstate", "watch", "--state", "napping"],
                "unknown state `napping`",
            ),
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
            assert!(err.to_string().contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
