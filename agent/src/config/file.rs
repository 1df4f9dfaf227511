//! The agent's TOML config file (`--config PATH`, default `/etc/tcpstate/tcpstate.toml` when it
//! exists). Every flag of `tcpstate agent` has a key of the same name with `_` for `-`; flags given
//! on the command line override the file. Unknown keys, wrong types and impossible values are
//! refused with the file, line and key named.
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::config::flags::{AgentArgs, LogFormat};
use crate::config::{self, AgentConfig};
use crate::model::linger::Thresholds;

/// Where the agent looks when `--config` is not given.
pub(crate) const DEFAULT_PATH: &str = "/etc/tcpstate/tcpstate.toml";

/// The file as written. Every field is optional: absent keys keep the flag's default.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub(crate) listen: Option<String>,
    pub(crate) max_ports: Option<i64>,
    pub(crate) ring_size: Option<Size>,
    pub(crate) max_sockets: Option<i64>,
    pub(crate) linger_after: Option<String>,
    pub(crate) close_wait_after: Option<String>,
    pub(crate) fin_wait2_after: Option<String>,
    pub(crate) linger_log_cap: Option<i64>,
    pub(crate) reconcile_interval: Option<String>,
    pub(crate) full_reconcile_interval: Option<String>,
    pub(crate) per_netns: Option<bool>,
    pub(crate) port_retire_after: Option<String>,
    pub(crate) histogram_ports: Option<i64>,
    pub(crate) duration_states: Option<Vec<String>>,
    pub(crate) socket: Option<PathBuf>,
    pub(crate) tracefs: Option<PathBuf>,
    pub(crate) log_level: Option<String>,
    pub(crate) log_format: Option<String>,
}

/// A size: bytes, or a string with a unit (`"4MiB"`).
#[derive(Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub(crate) enum Size {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{file}:{line}: key `{key}`: {message}")]
pub struct FileError {
    pub(crate) file: String,
    pub(crate) line: usize,
    pub(crate) key: String,
    pub(crate) message: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum LoadError {
    #[error(
        "config file {0} does not exist: create it (see deploy/tcpstate.toml) or drop --config"
    )]
    Missing(String),
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error(transparent)]
    Invalid(#[from] FileError),
}

/// Reads the file named by `--config`, or the default one if it exists.
pub(crate) fn load(explicit: Option<&Path>) -> Result<Option<(PathBuf, String)>, LoadError> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some((path, text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(LoadError::Missing(path.display().to_string()))
        }
        Err(e) => Err(LoadError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// The line (1-based) of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// The line where `key` is assigned, or 1.
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

/// Parses the file's text.
pub fn parse(file: &str, text: &str) -> Result<FileConfig, FileError> {
    toml::from_str::<FileConfig>(text).map_err(|e| {
        let message = e.message().to_string();
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        // serde names the offending key in backticks for unknown fields.
        let key = message
            .split('`')
            .nth(1)
            .filter(|_| message.starts_with("unknown field"))
            .map(str::to_string)
            .or_else(|| {
                let l = text.lines().nth(line - 1).unwrap_or("");
                l.split('=').next().map(|k| k.trim().to_string())
            })
            .unwrap_or_default();
        FileError {
            file: file.to_string(),
            line,
            key,
            message: message.trim().to_string(),
        }
    })
}

/// Whether a flag was given on the command line (or in its environment variable): then it
/// wins over the file.
pub trait Given {
    fn given(&self, flag: &str) -> bool;
}

/// Folds the file into `cfg` (built from the flags) for every key whose flag was not given.
/// Returns the log level and format the file asks for, if any.
pub fn apply(
    file: &str,
    text: &str,
    fc: &FileConfig,
    cfg: &mut AgentConfig,
    flags: &dyn Given,
) -> Result<(Option<String>, Option<String>), FileError> {
    let at = At { file, text, flags };
    apply_pipeline(&at, fc, cfg)?;
    apply_linger(&at, fc, cfg)?;
    apply_budget(&at, fc, cfg)?;
    apply_logging(&at, fc)
}

/// Where a key is read: to name it in errors, and to know whether a flag overrides it.
struct At<'a> {
    file: &'a str,
    text: &'a str,
    flags: &'a dyn Given,
}

impl At<'_> {
    fn err(&self, key: &str, message: String) -> FileError {
        FileError {
            file: self.file.to_string(),
            line: line_of_key(self.text, key),
            key: key.to_string(),
            message,
        }
    }

    /// The file's value counts unless the flag of the same name was given.
    fn take(&self, key: &str) -> bool {
        !self.flags.given(&key.replace('_', "-"))
    }

    fn duration(&self, key: &'static str, v: &str) -> Result<std::time::Duration, FileError> {
        config::parse_duration(key, v).map_err(|e| self.err(key, strip_key(&e.to_string())))
    }
}

/// Where the agent listens and how it reads the kernel.
fn apply_pipeline(at: &At, fc: &FileConfig, cfg: &mut AgentConfig) -> Result<(), FileError> {
    let (err, take) = (|k: &str, m| at.err(k, m), |k: &str| at.take(k));

    if let (Some(v), true) = (&fc.listen, take("listen")) {
        cfg.listen = v.parse().map_err(|_| {
            err(
                "listen",
                format!("`{v}` is not ADDR:PORT, e.g. \"0.0.0.0:10610\""),
            )
        })?;
    }
    if let (Some(v), true) = (fc.max_ports, take("max_ports")) {
        if !(1..=65_536).contains(&v) {
            return Err(err("max_ports", format!("{v} is not between 1 and 65536")));
        }
        cfg.max_ports = v as u32;
    }
    if let (Some(v), true) = (&fc.ring_size, take("ring_size")) {
        let text = match v {
            Size::Bytes(n) => n.to_string(),
            Size::Text(s) => s.clone(),
        };
        cfg.ring_bytes = config::parse_ring_size(&text)
            .map_err(|e| err("ring_size", strip_key(&e.to_string())))?;
    }
    if let (Some(v), true) = (fc.max_sockets, take("max_sockets")) {
        if !(1024..=16_777_216).contains(&v) {
            return Err(err(
                "max_sockets",
                format!("{v} is not between 1024 and 16777216"),
            ));
        }
        cfg.max_sockets = v as u32;
    }
    if let (Some(v), true) = (&fc.reconcile_interval, take("reconcile_interval")) {
        cfg.reconcile_interval = at.duration("reconcile_interval", v)?;
    }
    if let (Some(v), true) = (&fc.full_reconcile_interval, take("full_reconcile_interval")) {
        cfg.full_reconcile_interval = at.duration("full_reconcile_interval", v)?;
    }
    if let (Some(v), true) = (fc.per_netns, take("per_netns")) {
        cfg.per_netns = v;
    }
    if let (Some(v), true) = (&fc.socket, take("socket")) {
        cfg.socket = v.clone();
    }
    if let (Some(v), true) = (&fc.tracefs, take("tracefs")) {
        cfg.tracefs = Some(v.clone());
    }
    Ok(())
}

/// When connections count as lingering, and how much of it is logged.
fn apply_linger(at: &At, fc: &FileConfig, cfg: &mut AgentConfig) -> Result<(), FileError> {
    let (err, take, duration) = (
        |k: &str, m| at.err(k, m),
        |k: &str| at.take(k),
        |k, v: &str| at.duration(k, v),
    );
    let flags = at.flags;
    let mut t: Thresholds = cfg.thresholds;
    if let (Some(v), true) = (&fc.linger_after, take("linger_after")) {
        let d = duration("linger_after", v)?;
        if !flags.given("close-wait-after") {
            t.close_wait = d;
        }
        if !flags.given("fin-wait2-after") {
            t.fin_wait2 = d;
        }
    }
    if let (Some(v), true) = (&fc.close_wait_after, take("close_wait_after")) {
        t.close_wait = duration("close_wait_after", v)?;
    }
    if let (Some(v), true) = (&fc.fin_wait2_after, take("fin_wait2_after")) {
        t.fin_wait2 = duration("fin_wait2_after", v)?;
    }
    cfg.thresholds = t;
    if let (Some(v), true) = (fc.linger_log_cap, take("linger_log_cap")) {
        if v < 0 {
            return Err(err("linger_log_cap", format!("{v} is negative")));
        }
        cfg.linger_log_cap = v as usize;
    }
    Ok(())
}

/// What a port costs: retirement, histograms.
fn apply_budget(at: &At, fc: &FileConfig, cfg: &mut AgentConfig) -> Result<(), FileError> {
    let (err, take, duration) = (
        |k: &str, m| at.err(k, m),
        |k: &str| at.take(k),
        |k, v: &str| at.duration(k, v),
    );
    if let (Some(v), true) = (&fc.port_retire_after, take("port_retire_after")) {
        cfg.port_retire_after = duration("port_retire_after", v)?;
    }
    if let (Some(v), true) = (fc.histogram_ports, take("histogram_ports")) {
        if !(0..=65_536).contains(&v) {
            return Err(err(
                "histogram_ports",
                format!("{v} is not between 0 and 65536"),
            ));
        }
        cfg.histogram_ports = v as u32;
    }
    if let (Some(v), true) = (&fc.duration_states, take("duration_states")) {
        cfg.duration_states = config::parse_states("duration_states", &v.join(","))
            .map_err(|e| err("duration_states", strip_key(&e.to_string())))?;
    }
    Ok(())
}

/// The log level and format, when the file sets them (the caller installs the logger).
fn apply_logging(at: &At, fc: &FileConfig) -> Result<(Option<String>, Option<String>), FileError> {
    let (err, take) = (|k: &str, m| at.err(k, m), |k: &str| at.take(k));
    let level = match (&fc.log_level, take("log_level")) {
        (Some(v), true) => {
            tracing_subscriber::EnvFilter::try_new(v)
                .map_err(|e| err("log_level", format!("`{v}` is not a log filter ({e})")))?;
            Some(v.clone())
        }
        _ => None,
    };
    let format = match (&fc.log_format, take("log_format")) {
        (Some(v), true) if v == "text" || v == "json" => Some(v.clone()),
        (Some(v), true) => {
            return Err(err(
                "log_format",
                format!("`{v}` is neither \"text\" nor \"json\""),
            ));
        }
        _ => None,
    };
    Ok((level, format))
}

/// The agent's settings from its flags and its config file, and where they came from.
#[derive(Debug)]
pub struct Resolved {
    pub config: AgentConfig,
    pub log_level: String,
    pub log_format: LogFormat,
    /// `flags and defaults`, or `PATH and flags`.
    pub source: String,
}

/// Folds the config file (the one `--config` names, else the default path if it exists) into
/// the flags' settings; flags given on the command line win. Errors name the file, line and key.
pub fn resolve(args: &AgentArgs, given: &dyn Given) -> Result<Resolved, String> {
    let mut resolved = Resolved {
        config: args.config(),
        log_level: args.log_level.clone(),
        log_format: args.log_format,
        source: "flags and defaults".to_string(),
    };
    let Some((path, text)) = load(args.config.as_deref()).map_err(|e| e.to_string())? else {
        return Ok(resolved);
    };
    let shown = path.display().to_string();
    let fc = parse(&shown, &text).map_err(|e| e.to_string())?;
    let (level, format) =
        apply(&shown, &text, &fc, &mut resolved.config, given).map_err(|e| e.to_string())?;
    if let Some(l) = level {
        resolved.log_level = l;
    }
    if let Some(f) = format {
        resolved.log_format = if f == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
    }
    resolved.source = format!("{shown} and flags");
    Ok(resolved)
}

/// Error texts of the flag parsers start with the flag's name; in a file the key says it.
fn strip_key(message: &str) -> String {
    message
        .split_once(": ")
        .map_or(message, |(_, rest)| rest)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;
    use std::time::Duration;

    struct NoFlags;
    impl Given for NoFlags {
        fn given(&self, _: &str) -> bool {
            false
        }
    }
    struct Flags(&'static [&'static str]);
    impl Given for Flags {
        fn given(&self, flag: &str) -> bool {
            self.0.contains(&flag)
        }
    }

    fn defaults() -> AgentConfig {
        let cli = Cli::try_parse_from(["tcpstate", "agent"]).unwrap();
        let Command::Agent(a) = cli.command else {
            panic!()
        };
        a.config()
    }

    fn load_text(text: &str, flags: &dyn Given) -> Result<AgentConfig, FileError> {
        let fc = parse("t.toml", text)?;
        let mut cfg = defaults();
        apply("t.toml", text, &fc, &mut cfg, flags)?;
        Ok(cfg)
    }

    #[test]
    fn every_key_is_read() {
        let text = r#"
listen = "127.0.0.1:9999"
max_ports = 64
ring_size = "8MiB"
max_sockets = 4096
linger_after = "30s"
fin_wait2_after = "2m"
linger_log_cap = 5
reconcile_interval = "5s"
per_netns = true
socket = "/tmp/x.sock"
tracefs = "/sys/kernel/tracing"
log_level = "debug"
log_format = "json"
port_retire_after = "10m"
histogram_ports = 2
duration_states = ["close_wait", "FIN-WAIT-2"]
"#;
        let cfg = load_text(text, &NoFlags).unwrap();
        assert_eq!(cfg.port_retire_after, Duration::from_secs(600));
        assert_eq!(cfg.histogram_ports, 2);
        assert_eq!(
            cfg.duration_states,
            crate::model::state::StateSet::of(&[
                tcpstate_common::TcpState::CloseWait,
                tcpstate_common::TcpState::FinWait2
            ])
        );
        assert_eq!(cfg.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(
            (cfg.max_ports, cfg.ring_bytes, cfg.max_sockets),
            (64, 8 << 20, 4096)
        );
        assert_eq!(cfg.thresholds.close_wait, Duration::from_secs(30));
        assert_eq!(cfg.thresholds.fin_wait2, Duration::from_secs(120));
        assert_eq!(cfg.linger_log_cap, 5);
        assert_eq!(cfg.reconcile_interval, Duration::from_secs(5));
        assert!(cfg.per_netns);
        assert_eq!(cfg.socket, PathBuf::from("/tmp/x.sock"));
    }

    #[test]
    fn flags_on_the_command_line_win() {
        let cfg = load_text(
            "max_ports = 64\nlinger_after = \"30s\"\n",
            &Flags(&["max-ports", "close-wait-after"]),
        )
        .unwrap();
        assert_eq!(
            cfg.max_ports, 512,
            "the flag's value (here its default) stays"
        );
        assert_eq!(cfg.thresholds.fin_wait2, Duration::from_secs(30));
        assert_eq!(
            cfg.thresholds.close_wait,
            Duration::from_secs(60),
            "close_wait flag given"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let e = load_text("max_ports = 64\n\nlinger_afterr = \"30s\"\n", &NoFlags).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (3, "linger_afterr"), "{e}");
        assert!(
            e.to_string().starts_with("t.toml:3: key `linger_afterr`"),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_are_named_with_their_line() {
        let e = load_text("listen = \"0.0.0.0:1\"\nmax_ports = \"many\"\n", &NoFlags).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (2, "max_ports"), "{e}");
        let e = load_text("per_netns = 1\n", &NoFlags).unwrap_err();
        assert_eq!(e.key, "per_netns", "{e}");
    }

    #[test]
    fn impossible_values_are_named_with_their_line() {
        for (text, key, line) in [
            ("\nlinger_after = \"0s\"\n", "linger_after", 2),
            ("max_ports = 70000\n", "max_ports", 1),
            ("ring_size = \"3MiB\"\n", "ring_size", 1),
            ("listen = \"nowhere\"\n", "listen", 1),
            ("close_wait_after = \"soon\"\n", "close_wait_after", 1),
            ("log_format = \"xml\"\n", "log_format", 1),
            ("max_sockets = 10\n", "max_sockets", 1),
            ("\nduration_states = [\"napping\"]\n", "duration_states", 2),
            ("histogram_ports = -1\n", "histogram_ports", 1),
            ("port_retire_after = \"0s\"\n", "port_retire_after", 1),
        ] {
            let e = load_text(text, &NoFlags).unwrap_err();
            assert_eq!((e.key.as_str(), e.line), (key, line), "{text}: {e}");
        }
    }

    #[test]
    fn the_shipped_example_is_valid_and_lists_every_key() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/tcpstate.toml");
        let text = std::fs::read_to_string(path).unwrap();
        load_text(&text, &NoFlags).unwrap();
        // Every key appears, commented out or not.
        for key in [
            "listen",
            "max_ports",
            "ring_size",
            "max_sockets",
            "linger_after",
            "close_wait_after",
            "fin_wait2_after",
            "linger_log_cap",
            "reconcile_interval",
            "full_reconcile_interval",
            "per_netns",
            "socket",
            "tracefs",
            "log_level",
            "log_format",
        ] {
            assert!(
                text.lines().any(|l| l
                    .trim_start_matches(['#', ' '])
                    .starts_with(&format!("{key} ="))),
                "{key} missing"
            );
        }
    }
}
