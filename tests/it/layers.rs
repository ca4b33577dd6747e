//! The layer rule of ARCHITECTURE.md ("Layers"): a module imports only from
//! its own layer and the layers below it, never from above. This test reads
//! every `src/` file's production code (before its `#[cfg(test)]` module),
//! collects the `crate::…` paths it names (in `use` lines, grouped
//! `use crate::{…}` lines and inline paths; comments are skipped) and checks
//! each against [`LAYERS`]. Change the table in ARCHITECTURE.md first.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Lowest first. A module is `src/X.rs` or `src/X/`: `bot` is the shared
/// state (a leaf the handlers import), `bot_role` the role's wiring.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "base",
        &[
            "cli",
            "config",
            "secret",
            "telemetry",
            "signing",
            "deadline",
            "escape",
            "host",
            "events",
            "exec_auth",
            "web",
        ],
    ),
    ("agent side", &["gpu", "kubelet", "collector", "exporter"]),
    ("runbooks", &["runbook", "rbac"]),
    ("bot leaves", &["routing", "message"]),
    ("bot seams", &["store", "notify"]),
    (
        "bot services",
        &["alertmanager", "inventory", "lifecycle", "bot"],
    ),
    (
        "bot handlers",
        &["alert", "outbox", "paging", "chat", "report", "found"],
    ),
    ("roles", &["agent", "bot_role", "store_cmd"]),
];

/// Layers whose modules must not import each other either (the store and
/// the notifiers are two seams side by side: no SQL in a notifier, no wire
/// format in the store).
const NO_SIBLINGS: &[&str] = &["bot seams"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file belongs to (`None` for `main.rs` and `lib.rs`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts = rel.iter().map(|p| p.to_string_lossy().to_string());
    let top = parts.next()?.trim_end_matches(".rs").to_string();
    match top.as_str() {
        "main" | "lib" => None,
        _ => Some(top),
    }
}

/// The modules named by `crate::…` paths in a file's production code.
fn imports_of(text: &str) -> BTreeSet<String> {
    let prod = text.split("#[cfg(test)]").next().unwrap_or("");
    let code: String = prod
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let path = regex::Regex::new(r"crate::(\w+)").unwrap();
    for c in path.captures_iter(&code) {
        let top = &c[1];
        out.insert(top.to_string());
    }
    let group = regex::Regex::new(r"use crate::\{([^}]*)\}").unwrap();
    let first = regex::Regex::new(r"(?:^|,)\s*(\w+)").unwrap();
    for g in group.captures_iter(&code) {
        for n in first.captures_iter(&g[1]) {
            out.insert(n[1].to_string());
        }
    }
    out
}

/// Every import that goes against the table, as `file: module (layer) imports
/// other (layer)`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in &files {
        let Some(module) = module_of(src, file) else {
            continue;
        };
        let Some(own) = layer_of(&module) else {
            out.push(format!(
                "{}: module {module} is in no layer (add it to the table in ARCHITECTURE.md and tests/it/layers.rs)",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for import in imports_of(&text) {
            if import == module {
                continue;
            }
            let Some(theirs) = layer_of(&import) else {
                continue; // not a module (e.g. a macro or a crate-root item)
            };
            let sibling = theirs == own && NO_SIBLINGS.contains(&LAYERS[own].0);
            if theirs > own || sibling {
                out.push(format!(
                    "{}: {module} ({}) imports {import} ({})",
                    file.display(),
                    LAYERS[own].0,
                    LAYERS[theirs].0
                ));
            }
        }
    }
    out
}

#[test]
fn no_module_imports_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(
        bad.is_empty(),
        "imports against the layers of ARCHITECTURE.md:\n{}",
        bad.join("\n")
    );
}

#[test]
fn a_wrong_import_is_caught() {
    let dir = std::env::temp_dir().join(format!("gpuops-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bot")).unwrap();
    std::fs::write(
        dir.join("config.rs"),
        "//! crate::store in a comment is fine\nuse crate::store::Store;\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("notify.rs"),
        "use crate::{message, store::Store};\n#[cfg(test)]\nuse crate::alert;\n",
    )
    .unwrap();
    std::fs::write(dir.join("alert.rs"), "use crate::bot::state::BotState;\n").unwrap();
    std::fs::write(dir.join("bot/state.rs"), "use crate::alert::x;\n").unwrap();
    let bad = violations(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let want = [
        "bot/state.rs: bot (bot services) imports alert (bot handlers)",
        "config.rs: config (base) imports store (bot seams)",
        "notify.rs: notify (bot seams) imports store (bot seams)",
    ];
    let got: Vec<String> = bad
        .iter()
        .map(|l| l.replace(&format!("{}/", dir.display()), ""))
        .collect();
    assert_eq!(got, want.iter().map(|s| s.to_string()).collect::<Vec<_>>());
}
