//! Finding tracefs and reading the layout of `sock:inet_sock_set_state` from its format file.
//!
//! The record layout of the tracepoint is not stable (see `tcpstate_common::Layout`), so the
//! agent parses `events/sock/inet_sock_set_state/format` at start and hands the offsets to the
//! eBPF program as a global before load.
use std::path::{Path, PathBuf};

use tcpstate_common::{Layout, MAX_SPAN, TRACEPOINT_CATEGORY, TRACEPOINT_NAME};
use thiserror::Error;

/// Where tracefs normally lives, and where the agent mounts it when it is missing.
pub(crate) const DEFAULT_TRACEFS: &str = "/sys/kernel/tracing";
/// The old location, below debugfs.
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted at {path} and mounting it failed ({source}): run `mount -t tracefs nodev {path}` as root, or give the agent CAP_SYS_ADMIN"
    )]
    Mount { path: String, source: nix::Error },
    #[error(
        "{path} is not a tracefs mount (no events/ directory): pass --tracefs with the right path"
    )]
    NotTracefs { path: String },
    #[error(
        "this kernel has no tracepoint {TRACEPOINT_CATEGORY}:{TRACEPOINT_NAME} ({path} is missing): tcpstate needs Linux 5.8 or newer (the tracepoint came in 4.16, the BPF ring buffer in 5.8) with CONFIG_TRACEPOINTS"
    )]
    NoTracepoint { path: String },
    #[error("cannot read {path}: {source}; run as root or grant read access to tracefs")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source}")]
    Format { path: String, source: FormatError },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` has size {size}, expected {expected}")]
    Size {
        field: &'static str,
        size: u32,
        expected: &'static str,
    },
    #[error("field `{field}` has offset {offset}, beyond what the program reads")]
    Offset { field: &'static str, offset: u32 },
    #[error("the fields span {len} bytes, more than the {MAX_SPAN} the program copies")]
    Span { len: u32 },
    #[error("line {line}: cannot read `{text}`")]
    Syntax { line: usize, text: String },
}

/// Returns the tracefs mount to use: `explicit` if given, else the standard path, else the old
/// debugfs path; when neither is mounted, mounts tracefs at the standard path.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, TracefsError> {
    if let Some(path) = explicit {
        return if path.join("events").is_dir() {
            Ok(path.to_path_buf())
        } else {
            Err(TracefsError::NotTracefs {
                path: path.display().to_string(),
            })
        };
    }
    for candidate in [DEFAULT_TRACEFS, DEBUGFS_TRACING] {
        let p = Path::new(candidate);
        if p.join("events").is_dir() {
            return Ok(p.to_path_buf());
        }
    }
    let target = Path::new(DEFAULT_TRACEFS);
    nix::mount::mount(
        Some("nodev"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| TracefsError::Mount {
        path: DEFAULT_TRACEFS.to_string(),
        source,
    })?;
    tracing::info!(path = DEFAULT_TRACEFS, "mounted tracefs");
    Ok(target.to_path_buf())
}

/// Path of the tracepoint's format file below a tracefs mount.
pub(crate) fn format_path(tracefs: &Path) -> PathBuf {
    tracefs
        .join("events")
        .join(TRACEPOINT_CATEGORY)
        .join(TRACEPOINT_NAME)
        .join("format")
}

/// Reads and parses the tracepoint's layout below a tracefs mount.
pub fn read_layout(tracefs: &Path) -> Result<Layout, TracefsError> {
    let path = format_path(tracefs);
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TracefsError::NoTracepoint { path: shown });
        }
        Err(source) => {
            return Err(TracefsError::Read {
                path: shown,
                source,
            });
        }
    };
    parse_format(&text).map_err(|source| TracefsError::Format {
        path: shown,
        source,
    })
}

/// Largest offset the program may be told to read at: the record is far smaller, and offsets
/// travel as `u16`.
const MAX_OFFSET: u32 = 4096;

/// Parses a tracepoint format file into the offsets of the fields the program reads.
///
/// Lines look like `\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;`. Unknown fields (such as
/// a distribution's extra `common_*` fields) are skipped; their only effect is on the offsets.
pub fn parse_format(text: &str) -> Result<Layout, FormatError> {
    let fields = fields(text)?;

    let find = |name: &'static str, sizes: &[u32], expected: &'static str| {
        let (_, offset, size) = fields
            .iter()
            .find(|(n, _, _)| n == name)
            .ok_or(FormatError::Missing(name))?;
        if !sizes.contains(size) {
            return Err(FormatError::Size {
                field: name,
                size: *size,
                expected,
            });
        }
        if *offset > MAX_OFFSET {
            return Err(FormatError::Offset {
                field: name,
                offset: *offset,
            });
        }
        Ok((*offset as u16, *size as u16))
    };

    let (protocol, protocol_size) = find("protocol", &[1, 2], "1 or 2")?;
    let mut layout = Layout {
        skaddr: find("skaddr", &[8], "8")?.0,
        oldstate: find("oldstate", &[4], "4")?.0,
        newstate: find("newstate", &[4], "4")?.0,
        sport: find("sport", &[2], "2")?.0,
        dport: find("dport", &[2], "2")?.0,
        family: find("family", &[2], "2")?.0,
        protocol,
        protocol_size,
        saddr: find("saddr", &[4], "4")?.0,
        daddr: find("daddr", &[4], "4")?.0,
        saddr_v6: find("saddr_v6", &[16], "16")?.0,
        daddr_v6: find("daddr_v6", &[16], "16")?.0,
        span_start: 0,
        span_len: 0,
    };
    // The span from the first to the end of the last field the program reads: one copy.
    let needed = [
        "skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol", "saddr", "daddr",
        "saddr_v6", "daddr_v6",
    ];
    let spans = fields
        .iter()
        .filter(|(n, _, _)| needed.contains(&n.as_str()));
    let start = spans.clone().map(|(_, o, _)| *o).min().unwrap_or(0);
    let end = spans.map(|(_, o, s)| o + s).max().unwrap_or(0);
    if (end - start) as usize > MAX_SPAN {
        return Err(FormatError::Span { len: end - start });
    }
    layout.span_start = start as u16;
    layout.span_len = (end - start) as u16;
    Ok(layout)
}

/// Every `field:` line of a format file as (name, offset, size).
fn fields(text: &str) -> Result<Vec<(String, u32, u32)>, FormatError> {
    let mut fields: Vec<(String, u32, u32)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let syntax = || FormatError::Syntax {
            line: i + 1,
            text: line.to_string(),
        };
        let mut parts = rest.split(';').map(str::trim);
        let decl = parts.next().ok_or_else(syntax)?;
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = Some(v.parse::<u32>().map_err(|_| syntax())?);
            } else if let Some(v) = part.strip_prefix("size:") {
                size = Some(v.parse::<u32>().map_err(|_| syntax())?);
            }
        }
        let (Some(offset), Some(size)) = (offset, size) else {
            return Err(syntax());
        };
        // The name is the last word of the declaration, without an array suffix.
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .ok_or_else(syntax)?;
        let name = name.split('[').next().unwrap_or(name);
        fields.push((name.to_string(), offset, size));
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux 5.6 and later (read on the project's 6.18 machine).
    const SINCE_5_6: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s protocol=%s\", REC->family, REC->protocol
";

    /// Before Linux 5.6: `protocol` is one byte, so every address field sits one byte earlier.
    const BEFORE_5_6: &str = "format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u8 protocol;\toffset:30;\tsize:1;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:31;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:35;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:39;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:55;\tsize:16;\tsigned:0;
";

    /// A distribution kernel with an extra common field that shifts every field by 8.
    const EXTRA_COMMON: &str = "format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;
\tfield:unsigned char common_preempt_lazy_count;\toffset:8;\tsize:1;\tsigned:0;

\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:28;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:34;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:36;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:38;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:40;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:44;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:48;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:64;\tsize:16;\tsigned:0;
";

    #[test]
    fn parses_the_layout_since_5_6() {
        let l = parse_format(SINCE_5_6).unwrap();
        assert_eq!(
            l,
            Layout {
                skaddr: 8,
                oldstate: 16,
                newstate: 20,
                sport: 24,
                dport: 26,
                family: 28,
                protocol: 30,
                protocol_size: 2,
                saddr: 32,
                daddr: 36,
                saddr_v6: 40,
                daddr_v6: 56,
                span_start: 8,
                span_len: 64,
            }
        );
    }

    #[test]
    fn parses_the_one_byte_protocol_before_5_6() {
        let l = parse_format(BEFORE_5_6).unwrap();
        assert_eq!((l.protocol, l.protocol_size), (30, 1));
        assert_eq!((l.saddr, l.daddr, l.saddr_v6, l.daddr_v6), (31, 35, 39, 55));
        assert_eq!((l.span_start, l.span_len), (8, 63));
    }

    #[test]
    fn follows_an_extra_common_field() {
        let l = parse_format(EXTRA_COMMON).unwrap();
        assert_eq!((l.skaddr, l.oldstate, l.newstate), (16, 24, 28));
        assert_eq!((l.protocol, l.protocol_size, l.daddr_v6), (38, 2, 64));
        assert_eq!((l.span_start, l.span_len), (16, 64));
    }

    #[test]
    fn names_a_missing_field() {
        let text = SINCE_5_6.replace("field:__u16 dport;", "field:__u16 dst_port;");
        assert_eq!(parse_format(&text), Err(FormatError::Missing("dport")));
    }

    #[test]
    fn rejects_a_field_of_the_wrong_size() {
        let text = SINCE_5_6.replace("offset:8;\tsize:8;", "offset:8;\tsize:4;");
        assert!(matches!(
            parse_format(&text),
            Err(FormatError::Size {
                field: "skaddr",
                size: 4,
                ..
            })
        ));
    }

    #[test]
    fn rejects_garbage_in_a_field_line() {
        let text = SINCE_5_6.replace("offset:24;", "offset:x;");
        assert!(matches!(
            parse_format(&text),
            Err(FormatError::Syntax { .. })
        ));
    }

    #[test]
    fn a_missing_tracepoint_is_named() {
        let dir = std::env::temp_dir().join(format!("tcpstate-tracefs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("events")).unwrap();
        let err = read_layout(&dir).unwrap_err();
        assert!(err.to_string().contains("inet_sock_set_state"), "{err}");
        assert!(locate(Some(&dir)).is_ok());
        assert!(locate(Some(&dir.join("nope"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
