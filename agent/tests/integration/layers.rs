//! The architecture, checked on the source: `agent/src` is layered (model <- kernel <- engine
//! <- serve <- agent), the two servers never import each other, the CLI speaks only the API
//! protocol, the model stays pure, no two modules import each other in a cycle, no file grows
//! past 600 lines and no function past 80. It reads the `use` lines and `crate::`/`super::`
//! paths of the code that ships (unit tests excluded), so keep imports explicit.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest source file, in lines.
const MAX_FILE_LINES: usize = 600;
/// Longest function, in lines, signature to closing brace.
const MAX_FN_LINES: usize = 80;

/// Which modules each layer may use (besides itself and its own submodules). A module matches a
/// rule by its path prefix (`serve::api::protocol`).
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("clock", &[]),
    ("memory", &[]),
    ("kernel", &["model"]),
    ("engine", &["model", "kernel", "clock"]),
    // The servers: HTTP (and the metrics it serves) and the API never import each other.
    ("serve", &["model", "kernel", "engine", "clock"]),
    (
        "serve::http",
        &["model", "kernel", "engine", "clock", "serve::metrics"],
    ),
    ("serve::metrics", &["model", "kernel", "engine"]),
    ("serve::api", &["model", "kernel", "engine", "clock"]),
    // The protocol is what both ends share: pure.
    ("serve::api::protocol", &["model"]),
    // Settings: the model's vocabulary (states, thresholds) and where the API socket lives.
    ("config", &["model", "serve::api::protocol"]),
    ("cli", &["serve::api::protocol"]),
    ("args", &["cli", "config"]),
    ("testing", &["model"]),
    (
        "agent",
        &[
            "model", "kernel", "engine", "serve", "config", "clock", "memory",
        ],
    ),
];

/// What the pure model must not touch.
const IMPURE: &[&str] = &[
    "tokio",
    "aya",
    "aya_log",
    "netlink",
    "nix",
    "libc",
    "std::fs",
    "std::process",
    "tracing",
    "axum",
    "prometheus",
    "caps",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// `model/table/apply.rs` -> `model::table::apply`; `model/table/mod.rs` -> `model::table`.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// Unit-test code: a `tests.rs`/`tests/` module, or everything after `#[cfg(test)]`.
fn is_test_file(file: &Path) -> bool {
    file.iter().any(|p| p == "tests" || p == "tests.rs") || file.ends_with("testing.rs")
}

/// The code that ships: comments and unit tests left out.
fn shipped_lines(file: &Path) -> Vec<String> {
    if is_test_file(file) {
        return Vec::new();
    }
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        out.push(code.to_string());
    }
    out
}

/// The crate modules a file refers to: `crate::a::b` paths, and `super::` paths resolved.
fn references(file: &Path, known: &BTreeSet<String>) -> BTreeSet<String> {
    let module = module_of(file);
    let is_dir_module = file.ends_with("mod.rs");
    let mut out = BTreeSet::new();
    let text = shipped_lines(file).join("\n");
    // `use a::{b, c::{d}}` groups: read the whole statement and expand the braces shallowly.
    let mut paths: Vec<String> = Vec::new();
    for stmt in text.split(';') {
        let stmt = stmt.trim();
        if let Some(rest) = stmt
            .strip_prefix("use ")
            .or_else(|| stmt.strip_prefix("pub use "))
            .or_else(|| stmt.strip_prefix("pub(crate) use "))
        {
            paths.extend(expand(&rest.split_whitespace().collect::<String>()));
        }
    }
    for word in text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("crate::") || word.starts_with("super::") {
            paths.push(word.to_string());
        }
    }
    for p in paths {
        let absolute = if let Some(rest) = p.strip_prefix("crate::") {
            rest.to_string()
        } else if p.starts_with("super::") {
            let mut base: Vec<&str> = module.split("::").collect();
            let mut rest = p.as_str();
            // `super` of a file module is its folder's module; of `mod.rs`, the folder's parent.
            if !is_dir_module {
                base.pop();
            }
            while let Some(r) = rest.strip_prefix("super::") {
                if is_dir_module || base.len() < module.split("::").count() - 1 {
                    base.pop();
                }
                rest = r;
                if !rest.starts_with("super::") {
                    break;
                }
            }
            let base = base.join("::");
            if base.is_empty() {
                rest.to_string()
            } else {
                format!("{base}::{rest}")
            }
        } else {
            continue;
        };
        // The longest known module the path starts with.
        let segs: Vec<&str> = absolute.split("::").collect();
        if let Some(m) = (1..=segs.len())
            .rev()
            .map(|n| segs[..n].join("::"))
            .find(|m| known.contains(m))
        {
            out.insert(m);
        }
    }
    out.remove(&module);
    out
}

/// `a::{b, c::{d, e}}` -> `a::b`, `a::c::d`, `a::c::e` (whitespace already removed).
fn expand(path: &str) -> Vec<String> {
    let Some(open) = path.find('{') else {
        return vec![path.trim_end_matches("::*").to_string()];
    };
    let prefix = &path[..open];
    let inner = &path[open + 1..path.len() - 1];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(&format!("{prefix}{p}")))
        .map(|p| p.trim_end_matches("::self").to_string())
        .collect()
}

/// The shipped modules and the modules each one uses.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let all = files(&src());
    let known: BTreeSet<String> = all
        .iter()
        .filter(|f| !is_test_file(f) && !f.ends_with("main.rs"))
        .map(|f| module_of(f))
        .collect();
    all.iter()
        .filter(|f| !is_test_file(f) && !f.ends_with("main.rs") && !f.ends_with("lib.rs"))
        .map(|f| (module_of(f), references(f, &known)))
        .collect()
}

fn within(module: &str, prefix: &str) -> bool {
    module == prefix || module.starts_with(&format!("{prefix}::"))
}

/// The most specific rule for a module.
fn rule(module: &str) -> (&'static str, &'static [&'static str]) {
    *ALLOWED
        .iter()
        .filter(|(layer, _)| within(module, layer))
        .max_by_key(|(layer, _)| layer.len())
        .unwrap_or_else(|| panic!("module {module} is in no layer: add it to ALLOWED"))
}

#[test]
fn each_layer_uses_only_the_layers_below_it() {
    let mut wrong = Vec::new();
    for (module, uses) in graph() {
        let (layer, allowed) = rule(&module);
        for used in uses {
            let ok = within(&used, layer)
                || allowed.iter().any(|a| within(&used, a))
                || within(&module, &used); // a part of a folder module uses its own folder
            if !ok {
                wrong.push(format!(
                    "{module} uses {used} (layer {layer} may use {allowed:?})"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_graph_the_layering_test_reads_is_the_real_one() {
    // Guards the reader above: edges we know exist must be found, or every check passes vacuously.
    let g = graph();
    for (from, to) in [
        ("agent", "engine::table_task"),
        ("engine::table_task", "model::table"),
        ("model::table::apply", "model::table::stats"),
        ("serve::http", "serve::metrics"),
        ("cli::client", "serve::api::protocol"),
        ("kernel::ring", "kernel::decode"),
    ] {
        assert!(
            g.get(from).is_some_and(|u| u.contains(to)),
            "{from} -> {to} not found; the graph is {g:#?}"
        );
    }
}

/// An edge between two modules, lifted to the children of their closest common parent:
/// `model::table::stats -> model::linger` is `model::table -> model::linger`. A parent and its
/// own parts (a folder module) are one unit, so edges between them are none.
fn lift(a: &str, b: &str) -> Option<(String, String)> {
    let (sa, sb): (Vec<&str>, Vec<&str>) = (a.split("::").collect(), b.split("::").collect());
    let common = sa.iter().zip(&sb).take_while(|(x, y)| x == y).count();
    if common == sa.len() || common == sb.len() {
        return None;
    }
    Some((sa[..=common].join("::"), sb[..=common].join("::")))
}

#[test]
fn no_two_modules_import_each_other_in_a_cycle() {
    let mut lifted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, uses) in graph() {
        for to in uses {
            if let Some((a, b)) = lift(&from, &to) {
                lifted.entry(a).or_default().insert(b);
            }
        }
    }
    // Depth-first search; a node met again on the current path closes a cycle.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, g, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in lifted.keys() {
        if let Some(cycle) = visit(m, &lifted, &mut done, &mut Vec::new()) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn lifting_makes_folder_modules_one_unit() {
    assert_eq!(
        lift("model::table::stats", "model::linger"),
        Some(("model::table".into(), "model::linger".into()))
    );
    assert_eq!(lift("model::table::stats", "model::table"), None);
    assert_eq!(
        lift("serve::http", "engine::handle"),
        Some(("serve".into(), "engine".into()))
    );
}

#[test]
fn the_model_is_pure() {
    let mut wrong = Vec::new();
    for file in files(&src().join("model")) {
        for (n, line) in shipped_lines(&file).iter().enumerate() {
            for bad in IMPURE {
                let used = line.contains(&format!("{bad}::"))
                    || line.trim_start().starts_with(&format!("use {bad}"));
                if used {
                    wrong.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the model must not do I/O or log:\n{}",
        wrong.join("\n")
    );
}

/// `(lines, file:line, signature)` of every function longer than `MAX_FN_LINES` in `text`.
fn long_functions(file: &Path, text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let t = t
            .strip_prefix("pub ")
            .or_else(|| t.strip_prefix("pub(crate) "))
            .unwrap_or(t);
        let t = t.strip_prefix("async ").unwrap_or(t);
        let t = t.strip_prefix("const ").unwrap_or(t);
        let t = t.strip_prefix("unsafe ").unwrap_or(t);
        if !t.starts_with("fn ") {
            continue;
        }
        let indent = &l[..l.len() - l.trim_start().len()];
        let Some(open) = (i..lines.len()).find(|&j| lines[j].trim_end().ends_with(['{', ';']))
        else {
            continue;
        };
        if lines[open].trim_end().ends_with(';') {
            continue; // a declaration without a body
        }
        let close = (open + 1..lines.len())
            .find(|&k| lines[k] == format!("{indent}}}"))
            .unwrap_or(lines.len() - 1);
        let n = close - i + 1;
        if n > MAX_FN_LINES {
            out.push(format!(
                "{n} lines: {}:{} {}",
                file.display(),
                i + 1,
                l.trim()
            ));
        }
    }
    out
}

#[test]
fn files_and_functions_stay_short() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut wrong = Vec::new();
    for dir in [
        "agent/src",
        "agent/tests",
        "agent/benches",
        "common/src",
        "ebpf/src",
        "xtask/src",
    ] {
        for file in files(&root.join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            let n = text.lines().count();
            if n > MAX_FILE_LINES {
                wrong.push(format!("{n} lines: {}", file.display()));
            }
            // The eBPF program's body stays inline: the verifier wants it in one function.
            if !file.ends_with("ebpf/src/main.rs") {
                wrong.extend(long_functions(&file, &text));
            }
        }
    }
    assert!(wrong.is_empty(), "too long:\n{}", wrong.join("\n"));
}
