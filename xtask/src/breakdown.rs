//! `cargo xtask bench --breakdown`: the program rebuilt with one part left out, or one part done
//! another way, measured like the real one; then each beside the real one on the same churns,
//! whose paired ratios do not drift with the machine.
use std::path::Path;

use crate::Result;
use crate::bench::{AGENT_LISTEN, Agent, BPF_STATS, Bench, Measurement, Rebuild, RestoreFile};

/// Benchmark-only builds of the program (`TCPSTATE_BENCH_VARIANT`, read by `ebpf/`), each
/// leaving out one part, and what that part is.
pub(crate) const VARIANTS: &[(&str, &str)] = &[
    ("empty", "everything: the program returns at once"),
    ("copy", "all but the record copy and the protocol filter"),
    ("no-map", "the per-socket LRU map (entry time, namespace)"),
    ("no-clock", "the clock read (bpf_ktime_get_ns)"),
    ("no-ring", "the ring buffer: no event leaves the kernel"),
    // Alternatives: each keeps everything, done another way.
    (
        "no-common-lru",
        "(alternative) the LRU's shared list: per-CPU lists (BPF_F_NO_COMMON_LRU)",
    ),
    (
        "hash",
        "(alternative) the LRU: a preallocated hash of the same size",
    ),
    (
        "no-query",
        "(alternative) the per-event ring backlog query (the reader's timer drains)",
    ),
];

/// Rebuilds the program with each part left out in turn, measures each, and rebuilds the real
/// one at the end, whatever happens.
pub(crate) fn report(
    bench: &Bench,
    m: &Measurement,
    rounds: usize,
    variants: &[(&str, &str)],
    rebuild: Rebuild,
) -> Result {
    {
        // Whatever happens, leave the real agent behind.
        struct Restore<'a>(Rebuild<'a>);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                if let Err(e) = (self.0)(None) {
                    eprintln!("bench: rebuilding the real agent failed: {e}");
                }
            }
        }
        let restore = Restore(rebuild);
        let mut rows = Vec::new();
        let kept = bench
            .agent_bin
            .parent()
            .ok_or("no directory for the variants")?
            .join("bench-variants");
        std::fs::create_dir_all(&kept).map_err(|e| format!("{}: {e}", kept.display()))?;
        for (variant, left_out) in variants {
            rebuild(Some(variant))?;
            let v = bench.measure(rounds)?;
            rows.push((variant, left_out, v.ratio(), v.spread(), v.program_ns));
            let copy = kept.join(format!("tcpstate-{variant}"));
            std::fs::copy(&bench.agent_bin, &copy)
                .map_err(|e| format!("{}: {e}", copy.display()))?;
        }
        drop(restore);
        // Each variant's program beside the real one, on the same churn: the pairs' ratios do
        // not drift with the machine, which single rounds minutes apart do.
        let mut paired = Vec::new();
        for (variant, _) in variants {
            let (full, other) =
                bench.paired(&bench.agent_bin, &kept.join(format!("tcpstate-{variant}")))?;
            paired.push((variant, full, other));
        }
        println!();
        println!("## what each part of the program costs ({rounds} rounds per side each)");
        println!();
        // The floor: what any program on the tracepoint costs, measured in this same run.
        let empty = rows
            .iter()
            .find(|r| *r.0 == "empty")
            .map_or(f64::NAN, |r| r.4);
        println!(
            "| build | left out | throughput ratio (median) | rounds | program run time | x empty |"
        );
        println!("|---|---|---|---|---|---|");
        println!(
            "| full | nothing | {:.3} | {} | {:.0} ns | {:.2} |",
            m.ratio(),
            m.spread(),
            m.program_ns,
            m.program_ns / empty
        );
        for (variant, left_out, ratio, spread, ns) in rows {
            println!(
                "| {variant} | {left_out} | {ratio:.3} | {spread} | {ns:.0} ns | {:.2} |",
                ns / empty
            );
        }
        print_paired(&paired);
    }
    Ok(())
}

/// Each variant's run time against the real program's, measured side by side.
fn print_paired(paired: &[(&&str, f64, f64)]) {
    println!();
    println!("## each program beside the real one, on the same churn (kernel bpf_stats)");
    println!();
    println!("| build | its run time | the real one's | ratio |");
    println!("|---|---|---|---|");
    for (variant, full, other) in paired {
        println!(
            "| {variant} | {other:.0} ns | {full:.0} ns | {:.2} |",
            other / full
        );
    }
    if let Some((_, full, empty)) = paired.iter().find(|p| *p.0 == "empty") {
        println!();
        println!(
            "program run time, real / empty (paired): {:.2} (target <= 2.5)",
            full / empty
        );
    }
}

impl Bench {
    /// Run time per transition of the programs of two builds attached side by side to the
    /// same churns (two churns, each build attached first once): (a, b).
    fn paired(&self, a: &Path, b: &Path) -> Result<(f64, f64)> {
        let stats_was = std::fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into());
        let _restore = RestoreFile(BPF_STATS, stats_was.trim().to_string());
        std::fs::write(BPF_STATS, "1").map_err(|e| format!("{BPF_STATS}: {e}"))?;
        let second: Vec<String> = ["--socket", PAIRED_SOCKET]
            .iter()
            .map(|s| s.to_string())
            .chain(self.agent_args.iter().cloned())
            .collect();
        let (mut sum_a, mut sum_b) = ((0, 0), (0, 0));
        for a_first in [true, false] {
            let start = |bin: &Path, first: bool| {
                if first {
                    Agent::start_at(bin, AGENT_LISTEN, &self.agent_args)
                } else {
                    Agent::start_at(bin, PAIRED_LISTEN, &second)
                }
            };
            let (agent_a, agent_b) = if a_first {
                let x = start(a, true)?;
                (x, start(b, false)?)
            } else {
                let y = start(b, true)?;
                (start(a, false)?, y)
            };
            self.churn(self.connections)?;
            let (ra, rb) = (agent_a.program_run_time(), agent_b.program_run_time());
            agent_a.stop()?;
            agent_b.stop()?;
            sum_a = (sum_a.0 + ra.0, sum_a.1 + ra.1);
            sum_b = (sum_b.0 + rb.0, sum_b.1 + rb.1);
        }
        let per = |(ns, runs): (u64, u64)| ns as f64 / runs.max(1) as f64;
        Ok((per(sum_a), per(sum_b)))
    }
}

/// Where the second of two agents side by side listens.
const PAIRED_LISTEN: &str = "127.0.0.1:10692";
const PAIRED_SOCKET: &str = "/tmp/tcpstate-bench-paired.sock";
