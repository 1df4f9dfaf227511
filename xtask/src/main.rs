//! Project tasks: `cargo xtask <setup|build|run|test|bench>`.
//!
//! Std only, so that it builds in seconds on a fresh machine before anything else is installed.
//! Every step is idempotent: it checks before it installs.
use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

mod bench;
mod breakdown;
mod busy;
mod deb_vm;
mod dist;
mod image;
mod kernels;
mod kube;
mod setup;
// The agent harness the integration tests use, compiled here too: one way to start, scrape and
// stop the agent. Not every helper is needed here.
#[allow(dead_code)]
#[path = "../../agent/tests/integration/harness.rs"]
mod harness;

type Result<T = ()> = std::result::Result<T, String>;

const USAGE: &str = "usage: cargo xtask <command> [args]

commands:
  setup            install what the build and tests need (idempotent)
  build            setup, then build target/release/tcpstate
  run [ARGS...]    setup, build, run `tcpstate agent ARGS...` (default: all interfaces, port 10610)
  test             setup, build, fmt and clippy checks, every unit and integration test
  bench [ARGS...]  setup, build, run the churn benchmark (see `cargo xtask bench --help`)
  fuzz [--seconds N] [TARGET...]
                   run each fuzz target (agent/fuzz) for N seconds (default 60); `test` runs
                   every target for 10 s
  dist [--check]   setup, build the release artifacts in target/dist: a static binary and a
                   tarball; --check runs the release checks on them (`test` always does)
  test-kernels [KERNEL...]
                   setup, build, boot Debian's 5.10, 6.1 and 6.12 kernels under qemu (virtme-ng)
                   and run the tests inside each, and the .deb's install check on 6.1; `test`
                   runs it too, with the kernel-facing integration tests only
                   (KERNEL: bullseye, bookworm, trixie or 5.10, 6.1, 6.12)
  gen-rules        write deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/tcpstate-alerts.yml
";

/// The fuzz targets in agent/fuzz: the decoders of bytes that come from outside the agent.
const FUZZ_TARGETS: &[&str] = &[
    "ring_record",
    "tracefs_format",
    "btf",
    "api_request",
    "config_file",
];
/// The cargo-fuzz release installed for them.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

use setup::setup;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match cmd {
        "setup" => setup().map(|_| ()),
        "build" => setup().and_then(|env| build(&env, None)),
        "run" => setup().and_then(|env| {
            build(&env, None)?;
            run(rest)
        }),
        "test" => setup().and_then(|env| test(&env)),
        "bench" => setup().and_then(|env| {
            build(&env, None)?;
            bench::main(&root(), rest, &|variant| build(&env, variant))?;
            // The linger detector's pass over 100k sockets and the owner lookup's /proc scan
            // over 2,000 processes (userspace, off the event path).
            sh(env.apply(
                Command::new("cargo")
                    .current_dir(root())
                    .args(["bench", "--quiet", "-p", "tcpstate", "--bench", "detector"])
                    .args(["--bench", "owner"]),
            ))
        }),
        "dist" => setup().and_then(|env| {
            let a = dist::build(&env)?;
            if rest.iter().any(|r| r == "--check") {
                let n = release_checks(&a)?;
                eprintln!("xtask: {n} release checks passed");
            }
            Ok(())
        }),
        "test-kernels" => setup().and_then(|env| {
            let a = dist::build(&env)?;
            kernels::test_kernels(&env, Some(&a.deb), rest, true).map(|_| ())
        }),
        "gen-rules" => gen_rules(),
        // Internal: the .deb's install check, run by test-kernels inside a kernel VM.
        "deb-check-inside" => deb_vm::main(rest),
        "fuzz" => setup().and_then(|env| fuzz_command(&env, rest)),
        // Internal: the benchmark's churn loop, run inside its network namespace.
        "churn-worker" => bench::worker(rest),
        // Internal: the busy-host scenario's connection holders, inside its namespace.
        "busy-worker" => busy::worker(rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("xtask: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs a command, echoing it, and fails with its name when it fails.
fn sh(cmd: &mut Command) -> Result {
    eprintln!("xtask: $ {}", show(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", show(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", show(cmd)))
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", show(cmd)))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed: {}",
            show(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().to_string();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Environment the builds need (which toolchain builds the eBPF crate).
#[derive(Default)]
struct BuildEnv {
    vars: Vec<(String, String)>,
    /// The toolchain that builds the eBPF crate and the fuzz targets (`nightly`, or `stable`
    /// with RUSTC_BOOTSTRAP=1).
    toolchain: String,
}

impl BuildEnv {
    fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }
}

/// Builds target/release/tcpstate; with `variant`, the eBPF program's benchmark variant
/// (`TCPSTATE_BENCH_VARIANT`, see `cargo xtask bench --breakdown`).
fn build(benv: &BuildEnv, variant: Option<&str>) -> Result {
    let mut cmd = Command::new("cargo");
    if let Some(v) = variant {
        cmd.env("TCPSTATE_BENCH_VARIANT", v);
    }
    sh(benv.apply(
        cmd.current_dir(root())
            .args(["build", "--release", "--bins"]),
    ))
}

fn run(args: &[String]) -> Result {
    // `cargo xtask run -- --listen ...`: the separator is for cargo, not for the agent.
    let args = match args.split_first() {
        Some((first, rest)) if first == "--" => rest,
        _ => args,
    };
    let bin = root().join("target/release/tcpstate");
    if !is_root() {
        eprintln!("xtask: not root: the agent needs CAP_BPF and CAP_PERFMON and will say so");
    }
    sh(Command::new(bin).arg("agent").args(args))
}

fn test(benv: &BuildEnv) -> Result {
    let root = root();
    sh(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]))?;
    sh(benv.apply(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])))?;
    if !is_root() {
        return Err(
            "the integration tests load eBPF programs and create network namespaces: run `cargo xtask test` as root"
                .into(),
        );
    }
    let mut cmd = Command::new("cargo");
    benv.apply(&mut cmd).current_dir(&root).args([
        "test",
        "--release",
        "--workspace",
        "--no-fail-fast",
    ]);
    let (passed, failed) = run_counting_tests(&mut cmd)?;
    // The release artifacts, built and checked the way a fleet gets them.
    let built = dist::build(benv);
    let released = built
        .as_ref()
        .map_err(Clone::clone)
        .and_then(release_checks);
    let (passed, failed) = match &released {
        Ok(n) => (passed + n, failed),
        Err(_) => (passed, failed + 1),
    };
    // The same tests on the kernels fleets run, and the .deb installed in one of them.
    let deb = built.as_ref().ok().map(|a| a.deb.as_path());
    let kerneled = kernels::test_kernels(benv, deb, &[], false);
    let (passed, failed) = match &kerneled {
        Ok(outcomes) => (
            passed + outcomes.iter().map(|o| o.passed).sum::<u64>(),
            failed,
        ),
        Err(_) => (passed, failed + 1),
    };
    // A short bounded run of every fuzz target: each must build and survive its seeds and
    // what it finds in 10 s.
    let fuzzed = fuzz(benv, FUZZ_TARGETS, 10);
    let (passed, failed) = match &fuzzed {
        Ok(_) => (passed + FUZZ_TARGETS.len() as u64, failed),
        Err(_) => (passed, failed + 1),
    };
    // Cargo's last line is often a doc-test binary with nothing in it: close on the total.
    println!("tests: {passed} passed, {failed} failed");
    released.map_err(|e| format!("release check failed: {e}"))?;
    kerneled.map_err(|e| format!("kernel tests failed: {e}"))?;
    fuzzed?;
    if passed == 0 {
        return Err("no test ran".into());
    }
    Ok(())
}

/// The checks of the artifacts on this host: the binary, the tarball and the .deb's contents,
/// then the image (loads, runs under the DaemonSet's context, plays as its pod template).
fn release_checks(a: &dist::Artifacts) -> Result<u64> {
    Ok(dist::check(a)? + image::check(&a.image, &root())?)
}

fn fuzz_command(benv: &BuildEnv, args: &[String]) -> Result {
    let mut seconds = 60u64;
    let mut targets: Vec<&str> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--seconds needs a whole number")?
            }
            t => match FUZZ_TARGETS.iter().find(|name| **name == t) {
                Some(name) => targets.push(name),
                None => {
                    return Err(format!(
                        "unknown fuzz target `{t}`: one of {}",
                        FUZZ_TARGETS.join(", ")
                    ));
                }
            },
        }
    }
    if targets.is_empty() {
        targets = FUZZ_TARGETS.to_vec();
    }
    fuzz(benv, &targets, seconds)
}

/// Runs each target for `seconds` with libFuzzer (cargo-fuzz, address sanitizer), from its
/// seeds (agent/fuzz/seeds/TARGET, committed; every target has at least one) and the corpus it
/// grew so far (agent/fuzz/corpus/TARGET, not committed). A crash fails with the input's path; the
/// figures go in a table.
fn fuzz(benv: &BuildEnv, targets: &[&str], seconds: u64) -> Result {
    let root = root();
    setup::cargo_install("fuzz", "cargo-fuzz", CARGO_FUZZ_VERSION)?;
    let dir = root.join("agent/fuzz");
    println!("| fuzz target | seconds | inputs tried | new inputs | corpus | crashes or hangs |");
    println!("|---|---|---|---|---|---|");
    for target in targets {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        // libFuzzer rewrites and deletes inputs in the folders it is given: it gets copies of
        // the committed seeds, never the seeds themselves.
        let seeds = dir.join("seeds").join(target);
        for seed in std::fs::read_dir(&seeds)
            .map_err(|e| format!("{}: {e}", seeds.display()))?
            .flatten()
        {
            let copy = corpus.join(format!("seed-{}", seed.file_name().to_string_lossy()));
            std::fs::copy(seed.path(), &copy).map_err(|e| format!("{}: {e}", copy.display()))?;
        }
        let mut cmd = Command::new("cargo");
        benv.apply(&mut cmd)
            .current_dir(&root)
            .arg(format!("+{}", benv.toolchain))
            .args(["fuzz", "run", "--fuzz-dir"])
            .arg(&dir)
            .arg(target)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // An input that takes this long is a hang, and fails the run like a crash.
            .arg("-timeout=10")
            .arg("-print_final_stats=1");
        eprintln!("xtask: $ {}", show(&cmd));
        let out = cmd
            .stdout(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "fuzz target {target} failed ({}):\n{}",
                out.status,
                tail.join("\n")
            ));
        }
        println!(
            "| {target} | {seconds} | {} | {} | {} | 0 |",
            stat("stat::number_of_executed_units:"),
            stat("stat::new_units_added:"),
            std::fs::read_dir(&corpus).map_or(0, |d| d.count()),
        );
    }
    Ok(())
}

/// Runs a test command, echoing its output, and sums cargo's `test result:` lines.
fn run_counting_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::BufRead;
    eprintln!("xtask: $ {}", show(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", show(cmd)))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        println!("{line}");
        if let Some((p, f)) = test_result_counts(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        println!("tests: {passed} passed, {failed} failed");
        return Err(format!("`{}` failed ({status})", show(cmd)));
    }
    Ok((passed, failed))
}

/// The counts of one of cargo test's `test result: ok. 7 passed; 0 failed; ...` lines.
pub fn test_result_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(['.', ';'])
            .find_map(|p| p.trim().strip_suffix(word))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((count(" passed"), count(" failed")))
}

/// The PrometheusRule of the Kubernetes manifests, generated from the Prometheus rule file so
/// that there is one source: its `spec` is the file's `groups`, indented.
pub fn prometheus_rule(rules: &str) -> Result<String> {
    let start = rules
        .lines()
        .position(|l| l.starts_with("groups:"))
        .ok_or("the rule file has no top-level `groups:`")?;
    let mut out = String::from(
        "# Generated by `cargo xtask gen-rules` from deploy/prometheus/tcpstate-alerts.yml: edit that\n\
         # file, not this one (a test fails when they differ).\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: tcpstate\n\
         spec:\n",
    );
    for line in rules.lines().skip(start) {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

fn gen_rules() -> Result {
    let root = root();
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/tcpstate-alerts.yml"))
        .map_err(|e| format!("deploy/prometheus/tcpstate-alerts.yml: {e}"))?;
    let out = root.join("deploy/kubernetes/prometheusrule.yaml");
    std::fs::write(&out, prometheus_rule(&rules)?)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!("xtask: wrote {}", out.display());
    Ok(())
}
