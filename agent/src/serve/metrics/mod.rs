//! Prometheus exposition, built at scrape time from a view of the table
//! ([`crate::model::query::View`]) and the pipeline's counters. Nothing here runs per event.
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, Registry, TextEncoder};
use tcpstate_common::TcpState;

use rustc_hash::FxHashMap;

use crate::model::linger::{LINGER_STATES, LingerAgg, LingerKey};
use crate::model::query::View;
use crate::model::state::STATES;
use crate::model::table::{BUCKETS_SECONDS, Hist, PortKey, PortStats, Role};

mod teardown;

/// Everything one scrape shows.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sources {
    pub(crate) view: View,
    /// Transitions read from the ring buffer.
    pub(crate) events: u64,
    /// Events lost in the kernel: the ring was full, or the program was skipped.
    pub(crate) lost_kernel: u64,
    /// Of those, runs the kernel skipped (recursion protection).
    pub(crate) recursion_misses: u64,
    /// Events the agent read but could not apply (table queue full).
    pub(crate) lost_agent: u64,
    pub(crate) decode_errors: u64,
    pub(crate) ring_bytes: u64,
}

/// A registry with the process collector (CPU, memory, fds), for the process metrics.
pub(crate) fn process_registry() -> Registry {
    let registry = Registry::new();
    let pc = prometheus::process_collector::ProcessCollector::for_self();
    // Registration only fails on duplicate descriptors, impossible in a fresh registry.
    let _ = registry.register(Box::new(pc));
    registry
}

/// Why a scrape could not be rendered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RenderError {
    #[error("encoding the metrics failed: {0}")]
    Encode(#[from] prometheus::Error),
    #[error("the exposition is not UTF-8: {0}")]
    Utf8(#[from] std::string::FromUtf8Error),
}

/// The text exposition of `sources` plus whatever `registry` gathers.
pub(crate) fn render(registry: &Registry, sources: &Sources) -> Result<String, RenderError> {
    let mut families = families(sources);
    families.extend(registry.gather());
    let mut out = Vec::with_capacity(64 * 1024);
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// The agent's own metric families. Empty families are left out (the encoder rejects them).
pub(crate) fn families(s: &Sources) -> Vec<MetricFamily> {
    let mut ports = PortFamilies::new();
    let linger = s.view.linger.by_key();
    for (role, key, stats) in &s.view.table.ports {
        ports.add(s, &linger, *role, *key, stats);
    }
    let mut out = ports.finish();
    // The budget's families come between the counts and the lingering ones.
    let lingering = out.split_off(5);
    out.extend(budget(s));
    out.extend(lingering);
    out.extend(teardown::families(&s.view));
    out.push(linger_thresholds(s));
    out.extend(pipeline(s));
    out.push(build_info());
    out.into_iter()
        .filter(|f| !f.get_metric().is_empty())
        .collect()
}

/// The per-port families, filled port by port.
struct PortFamilies {
    connections: MetricFamily,
    transitions: MetricFamily,
    state_durations: MetricFamily,
    lifetimes: MetricFamily,
    lingering: MetricFamily,
    oldest: MetricFamily,
    detected: MetricFamily,
    /// Seeded connections per role and state, summed over ports.
    seeded: [[u64; STATES]; 2],
}

impl PortFamilies {
    fn new() -> PortFamilies {
        PortFamilies {
            connections: family(
                "tcpstate_connections",
                "TCP sockets currently in each state, per service port and role (every state the port has held since it got its slot, 0 included).",
                MetricType::GAUGE,
            ),
            transitions: family(
                "tcpstate_transitions_total",
                "TCP state transitions, per service port and role.",
                MetricType::COUNTER,
            ),
            state_durations: family(
                "tcpstate_state_duration_seconds",
                "Time TCP sockets spent in a state, observed when they left it (port=\"other\" gathers the ports without histograms of their own).",
                MetricType::HISTOGRAM,
            ),
            lifetimes: family(
                "tcpstate_connection_duration_seconds",
                "Lifetime of TCP connections from open to close (only connections whose open the agent saw; port=\"other\" gathers the ports without histograms of their own).",
                MetricType::HISTOGRAM,
            ),
            lingering: family(
                "tcpstate_lingering_connections",
                "Connections in close_wait or fin_wait2 for longer than that state's threshold (ports that have had one).",
                MetricType::GAUGE,
            ),
            oldest: family(
                "tcpstate_lingering_oldest_seconds",
                "Time in state of the oldest lingering connection, 0 when none.",
                MetricType::GAUGE,
            ),
            detected: family(
                "tcpstate_lingering_detected_total",
                "Connections that crossed their state's linger threshold.",
                MetricType::COUNTER,
            ),
            seeded: [[0; STATES]; 2],
        }
    }

    fn add(
        &mut self,
        s: &Sources,
        linger: &FxHashMap<LingerKey, LingerAgg>,
        role: Role,
        key: PortKey,
        stats: &PortStats,
    ) {
        let port = key.label();
        let netns = key.netns().map(|n| n.to_string());
        let labels = |more: &[(&'static str, &'static str)]| {
            port_labels(&port, role.label(), netns.as_deref(), more)
        };
        for state in stats.seen.states() {
            let n = stats.current[state.index()] as f64;
            self.connections
                .mut_metric()
                .push(gauge(&labels(&[("state", state.label())]), n));
        }
        for (total, n) in self.seeded[role as usize].iter_mut().zip(stats.seeded) {
            *total += n;
        }
        for from in TcpState::ALL {
            for to in TcpState::ALL {
                let n = stats.transitions[from.index()][to.index()];
                if n > 0 {
                    let l = labels(&[("from", from.label()), ("to", to.label())]);
                    self.transitions.mut_metric().push(counter(&l, n as f64));
                }
            }
        }
        for state in TcpState::ALL {
            let h = &stats.state_durations[state.index()];
            if h.count > 0 {
                let l = labels(&[("state", state.label())]);
                self.state_durations.mut_metric().push(histogram(&l, h));
            }
        }
        if stats.lifetimes.count > 0 {
            let l = labels(&[]);
            self.lifetimes
                .mut_metric()
                .push(histogram(&l, &stats.lifetimes));
        }
        for (which, state) in LINGER_STATES.into_iter().enumerate() {
            let agg = linger
                .get(&LingerKey { role, key, state })
                .copied()
                .unwrap_or_default();
            let n = stats.lingering_detected[which];
            // Only ports that have had a lingering connection: then 0 until the port retires.
            if n == 0 && agg.count == 0 {
                continue;
            }
            let l = labels(&[("state", state.label())]);
            self.lingering
                .mut_metric()
                .push(gauge(&l, agg.count as f64));
            let age = if agg.count > 0 {
                s.view.now_ns.saturating_sub(agg.oldest_since_ns) as f64 / 1e9
            } else {
                0.0
            };
            self.oldest.mut_metric().push(gauge(&l, age));
            self.detected.mut_metric().push(counter(&l, n as f64));
        }
    }

    /// The families: the counts and seeded totals (five), then the three lingering ones.
    fn finish(self) -> Vec<MetricFamily> {
        let mut seeded = family(
            "tcpstate_seeded_connections",
            "Of tcpstate_connections, those known from a sock_diag dump rather than their transitions, per role and state: their age in state is a lower bound.",
            MetricType::GAUGE,
        );
        for role in Role::ALL {
            for state in TcpState::ALL {
                seeded.mut_metric().push(gauge(
                    &[("role", role.label()), ("state", state.label())],
                    self.seeded[role as usize][state.index()] as f64,
                ));
            }
        }
        vec![
            self.connections,
            self.transitions,
            self.state_durations,
            self.lifetimes,
            seeded,
            self.lingering,
            self.oldest,
            self.detected,
        ]
    }
}

/// The port budget: ports tracked, the limit, slots freed.
fn budget(s: &Sources) -> Vec<MetricFamily> {
    let mut tracked_ports = family(
        "tcpstate_tracked_ports",
        "Service ports with series of their own, per role (at most tcpstate_max_ports; the rest are counted under port=\"other\").",
        MetricType::GAUGE,
    );
    for role in Role::ALL {
        tracked_ports.mut_metric().push(gauge(
            &[("role", role.label())],
            s.view.table.ports_tracked[role as usize] as f64,
        ));
    }
    let mut max_ports = family(
        "tcpstate_max_ports",
        "The port budget per role (--max-ports).",
        MetricType::GAUGE,
    );
    max_ports
        .mut_metric()
        .push(gauge(&[], s.view.table.max_ports as f64));
    let mut freed = family(
        "tcpstate_port_slots_freed_total",
        "Port slots given back: reason=idle (no socket and no transition for --port-retire-after), reason=evicted (a port without connections made room for a port that matters).",
        MetricType::COUNTER,
    );
    let c = s.view.table.counters;
    for (reason, n) in [("idle", c.ports_retired), ("evicted", c.ports_evicted)] {
        freed
            .mut_metric()
            .push(counter(&[("reason", reason)], n as f64));
    }
    vec![tracked_ports, max_ports, freed]
}

fn linger_thresholds(s: &Sources) -> MetricFamily {
    let mut thresholds = family(
        "tcpstate_linger_threshold_seconds",
        "Time after which a connection in this state counts as lingering.",
        MetricType::GAUGE,
    );
    for state in LINGER_STATES {
        let t = s.view.thresholds.for_state(state).unwrap_or_default();
        thresholds
            .mut_metric()
            .push(gauge(&[("state", state.label())], t.as_secs_f64()));
    }
    thresholds
}

/// The pipeline's health: reconciliations, events, losses, the table's inconsistencies.
fn pipeline(s: &Sources) -> Vec<MetricFamily> {
    let (one, by) = (single, labelled);
    let r = s.view.table.reconcile;
    let c = s.view.table.counters;
    vec![
        by(
            "tcpstate_reconcile_corrections_total",
            "Repairs of the connection table from sock_diag: kind=stale (gone from the kernel), missing (added), state (state corrected).",
            "kind",
            &[
                ("stale", r.corrections.stale),
                ("missing", r.corrections.missing),
                ("state", r.corrections.state),
            ],
        ),
        one(
            "tcpstate_reconciliations_total",
            "sock_diag dumps reconciled with the table, light and full (the first one seeds it).",
            MetricType::COUNTER,
            r.runs,
        ),
        one(
            "tcpstate_full_reconciliations_total",
            "Full sock_diag dumps (every socket; they repair the table): at start, after a loss, and every --full-reconcile-interval.",
            MetricType::COUNTER,
            r.full_runs,
        ),
        one(
            "tcpstate_events_total",
            "TCP state transition events read from the kernel.",
            MetricType::COUNTER,
            s.events,
        ),
        by(
            "tcpstate_events_lost_total",
            "Transition events lost: stage=kernel when the ring buffer was full or the kernel skipped the program, stage=agent when the table could not keep up.",
            "stage",
            &[("kernel", s.lost_kernel), ("agent", s.lost_agent)],
        ),
        one(
            "tcpstate_program_recursion_misses_total",
            "Transitions the kernel did not run the program for, because another BPF program was running on that CPU (included in tcpstate_events_lost_total{stage=\"kernel\"}).",
            MetricType::COUNTER,
            s.recursion_misses,
        ),
        one(
            "tcpstate_decode_errors_total",
            "Ring buffer records that could not be decoded.",
            MetricType::COUNTER,
            s.decode_errors,
        ),
        one(
            "tcpstate_tracked_sockets",
            "TCP sockets in the agent's connection table.",
            MetricType::GAUGE,
            s.view.table.tracked_sockets as u64,
        ),
        by(
            "tcpstate_table_inconsistencies_total",
            "Transitions that did not follow from the table's state: kind=state_mismatch and kind=stale_socket mean events were lost, kind=first_seen_midlife counts sockets opened before the agent saw them.",
            "kind",
            &[
                ("state_mismatch", c.state_mismatches),
                ("stale_socket", c.stale_replaced),
                ("first_seen_midlife", c.first_seen_midlife),
            ],
        ),
        one(
            "tcpstate_ring_buffer_size_bytes",
            "Size of the kernel-to-agent ring buffer.",
            MetricType::GAUGE,
            s.ring_bytes,
        ),
    ]
}

/// A family of one unlabelled series.
fn single(name: &str, help: &str, ty: MetricType, v: u64) -> MetricFamily {
    let mut f = family(name, help, ty);
    f.mut_metric().push(if ty == MetricType::COUNTER {
        counter(&[], v as f64)
    } else {
        gauge(&[], v as f64)
    });
    f
}

/// A counter family with one series per value of `label`.
fn labelled(name: &str, help: &str, label: &str, values: &[(&str, u64)]) -> MetricFamily {
    let mut f = family(name, help, MetricType::COUNTER);
    for (v, n) in values {
        f.mut_metric().push(counter(&[(label, v)], *n as f64));
    }
    f
}

fn build_info() -> MetricFamily {
    let mut build = family(
        "tcpstate_build_info",
        "Build information of the running agent; the value is always 1.",
        MetricType::GAUGE,
    );
    build.mut_metric().push(gauge(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("revision", env!("TCPSTATE_REVISION")),
            ("rustc", env!("TCPSTATE_RUSTC")),
        ],
        1.0,
    ));
    build
}

/// Labels of a per-port series: port, role, the namespace under `--per-netns`, then `more`.
fn port_labels<'a>(
    port: &'a str,
    role: &'a str,
    netns: Option<&'a str>,
    more: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![("port", port), ("role", role)];
    if let Some(n) = netns {
        v.push(("netns", n));
    }
    v.extend_from_slice(more);
    v
}

fn family(name: &str, help: &str, ty: MetricType) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(ty);
    f
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

fn gauge(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::from_label(labels(pairs));
    m.set_gauge(g);
    m
}

fn counter(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn histogram(pairs: &[(&str, &str)], h: &Hist) -> Metric {
    let cumulative = h.cumulative();
    let buckets = BUCKETS_SECONDS
        .iter()
        .zip(cumulative)
        .map(|(&bound, count)| {
            let mut b = Bucket::default();
            b.set_upper_bound(bound);
            b.set_cumulative_count(count);
            b
        })
        .collect();
    let mut p = Histogram::default();
    p.set_sample_count(h.count);
    p.set_sample_sum(h.sum_seconds);
    p.set_bucket(buckets);
    let mut m = Metric::from_label(labels(pairs));
    m.set_histogram(p);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::table::{DEFAULT_EPHEMERAL, Table};
    use crate::testing::tr;
    use TcpState::*;

    fn sources() -> Sources {
        let mut t = Table::new(16, DEFAULT_EPHEMERAL);
        let (c, s) = ("127.0.0.1:40000", "127.0.0.1:8080");
        t.apply(&tr(1, 0, Close, SynSent, c, s).with_pid(1));
        t.apply(
            &tr(1, 1_000, SynSent, Established, c, s)
                .with_pid(1)
                .with_prev(1_000),
        );
        let fin = tr(1, 400_001_000, Established, FinWait1, c, s).with_pid(1);
        t.apply(&fin.with_prev(400_000_000));
        Sources {
            view: View {
                table: t.snapshot(),
                ..View::default()
            },
            events: 3,
            lost_kernel: 2,
            recursion_misses: 1,
            lost_agent: 1,
            decode_errors: 0,
            ring_bytes: 1 << 22,
        }
    }

    #[test]
    fn renders_the_states_a_port_has_held_and_the_counters() {
        let text = render(&Registry::new(), &sources()).unwrap();
        // Held: syn_sent (now 0: the drop to zero is shown), established (0), fin_wait1.
        for (state, n) in [("syn_sent", 0), ("established", 0), ("fin_wait1", 1)] {
            let line = format!(
                "tcpstate_connections{{port=\"8080\",role=\"client\",state=\"{state}\"}} {n}\n"
            );
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        // Never held: no series.
        assert!(
            !text.contains(
                "tcpstate_connections{port=\"8080\",role=\"client\",state=\"close_wait\"}"
            ),
            "{text}"
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("tcpstate_connections{"))
                .count(),
            3
        );
        // Seeded counts are per role and state, without a port.
        assert!(
            text.contains("tcpstate_seeded_connections{role=\"client\",state=\"established\"} 0\n")
        );
        assert!(!text.contains("tcpstate_seeded_connections{port="));
        // The port never lingered: no lingering series for it.
        assert!(!text.contains("tcpstate_lingering_connections{"), "{text}");
        assert!(text.contains("tcpstate_tracked_ports{role=\"client\"} 1\n"));
        assert!(text.contains("tcpstate_max_ports 16\n"));
        assert!(text.contains(
            "tcpstate_connections{port=\"8080\",role=\"client\",state=\"fin_wait1\"} 1\n"
        ));
        assert!(text.contains(
            "tcpstate_transitions_total{port=\"8080\",role=\"client\",from=\"established\",to=\"fin_wait1\"} 1\n"
        ));
        assert!(text.contains("tcpstate_events_lost_total{stage=\"kernel\"} 2\n"));
        assert!(text.contains("tcpstate_events_lost_total{stage=\"agent\"} 1\n"));
        assert!(text.contains("tcpstate_program_recursion_misses_total 1\n"));
        assert!(text.contains("tcpstate_tracked_sockets 1\n"));
        assert!(text.contains("tcpstate_build_info{version=\""));
    }

    #[test]
    fn histograms_are_cumulative_with_inf() {
        let text = render(&Registry::new(), &sources()).unwrap();
        let prefix = "tcpstate_state_duration_seconds_bucket{port=\"8080\",role=\"client\",state=\"established\"";
        assert!(
            text.contains(&format!("{prefix},le=\"0.25\"}} 0\n")),
            "{text}"
        );
        assert!(text.contains(&format!("{prefix},le=\"1\"}} 1\n")));
        assert!(text.contains(&format!("{prefix},le=\"3600\"}} 1\n")));
        assert!(text.contains(&format!("{prefix},le=\"+Inf\"}} 1\n")));
        assert!(text.contains(
            "tcpstate_state_duration_seconds_count{port=\"8080\",role=\"client\",state=\"established\"} 1\n"
        ));
        // No connection closed yet: the lifetime family is absent rather than empty.
        assert!(!text.contains("tcpstate_connection_duration_seconds"));
    }
}
