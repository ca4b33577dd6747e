//! Binary resolution by name: a runbook names `scontrol`, not
//! `/usr/bin/scontrol`; [`resolve_argv`] finds it on a [`SearchPath`] (an
//! absolute, existing, executable file) and, for `sudo …`, resolves the
//! command sudo runs too, so the argv shown to an approver, signed by the
//! bot and run by the agent is the same absolute one. Read-only filesystem
//! calls only (`stat`); it spawns nothing and reads no file. Callers on a
//! request path run it off the async threads with a deadline.

use std::fmt;
use std::path::{Path, PathBuf};

/// The directories searched by default: [`crate::runbook::exec::SAFE_PATH`]
/// and Slurm's usual prefix.
pub const DEFAULT_SEARCH_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/slurm/bin";

/// sudo's options that take a value as the next argument.
const SUDO_OPTIONS_WITH_VALUE: &[&str] = &[
    "-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-T", "-U", "-R",
];

/// Where binaries named by name are looked for, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchPath {
    dirs: Vec<PathBuf>,
}

impl Default for SearchPath {
    fn default() -> SearchPath {
        SearchPath::new(
            DEFAULT_SEARCH_PATH
                .split(':')
                .map(PathBuf::from)
                .collect::<Vec<_>>(),
        )
    }
}

impl SearchPath {
    /// Exactly these directories (relative ones are dropped: a search path
    /// never depends on the working directory).
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> SearchPath {
        let mut out: Vec<PathBuf> = Vec::new();
        for d in dirs {
            if d.is_absolute() && !out.contains(&d) {
                out.push(d);
            }
        }
        SearchPath { dirs: out }
    }

    /// The default directories followed by `extra` (`[exec] path`).
    pub fn default_and(extra: &[PathBuf]) -> SearchPath {
        let mut dirs = SearchPath::default().dirs;
        dirs.extend(extra.iter().cloned());
        SearchPath::new(dirs)
    }

    /// `extra` first, then the default directories (tests put fake binaries first).
    pub fn first_then_default(first: &[PathBuf]) -> SearchPath {
        let mut dirs: Vec<PathBuf> = first.to_vec();
        dirs.extend(SearchPath::default().dirs);
        SearchPath::new(dirs)
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The first executable file `name` in the directories.
    pub fn find(&self, name: &str) -> Option<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| is_executable_file(p))
    }
}

impl fmt::Display for SearchPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        f.write_str(&parts.join(":"))
    }
}

/// Why an argv cannot run here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unrunnable {
    #[error("the step has no command")]
    Empty,
    #[error("{name} not found on the PATH ({path})")]
    NotFound { name: String, path: String },
    #[error("{path} does not exist or is not an executable file")]
    NotExecutable { path: String },
    #[error("{name}: a command is named by name or by absolute path, never by a relative path")]
    Relative { name: String },
    #[error("sudo is given no command to run")]
    SudoWithoutCommand,
}

impl Unrunnable {
    /// The reason worded for the machine it was resolved on: `where_` is
    /// a node name (`gpu-node-17`) or `the bot`.
    pub fn reason_on(&self, where_: &str) -> String {
        match self {
            Unrunnable::NotFound { name, path } => {
                format!("{name} not found on {where_}'s PATH ({path})")
            }
            Unrunnable::NotExecutable { path } => {
                format!("{path} does not exist on {where_} or is not an executable file")
            }
            other => other.to_string(),
        }
    }
}

/// `argv` with `argv[0]` (and, after `sudo` and its options, the command
/// sudo runs) replaced by absolute paths found on `path`. An absolute name
/// is kept when it is an executable file. Arguments are never changed.
pub fn resolve_argv(argv: &[String], path: &SearchPath) -> Result<Vec<String>, Unrunnable> {
    let Some(first) = argv.first() else {
        return Err(Unrunnable::Empty);
    };
    let mut out = argv.to_vec();
    out[0] = resolve_one(first, path)?;
    if is_sudo(first) {
        let Some(i) = sudo_command_index(argv) else {
            return Err(Unrunnable::SudoWithoutCommand);
        };
        out[i] = resolve_one(&argv[i], path)?;
    }
    Ok(out)
}

/// Whether `argv0` names sudo (`sudo` or a path ending in `/sudo`).
pub fn is_sudo(argv0: &str) -> bool {
    argv0 == "sudo" || argv0.ends_with("/sudo")
}

/// The index of the command a sudo argv runs: the first argument after
/// sudo's own options (and `NAME=value` assignments, and `--`).
pub fn sudo_command_index(argv: &[String]) -> Option<usize> {
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].as_str();
        if a == "--" {
            return (i + 1 < argv.len()).then_some(i + 1);
        }
        if SUDO_OPTIONS_WITH_VALUE.contains(&a) {
            i += 2;
            continue;
        }
        if a.starts_with('-') || (a.contains('=') && !a.starts_with('/')) {
            i += 1;
            continue;
        }
        return Some(i);
    }
    None
}

/// The argv that asks sudo whether the caller may run a resolved sudo
/// argv, without running it: `sudo <its options> -n -l <command and args>`.
pub fn sudo_list_argv(resolved: &[String]) -> Option<Vec<String>> {
    let i = sudo_command_index(resolved)?;
    let mut out: Vec<String> = resolved[..i].to_vec();
    if !out.iter().skip(1).any(|a| a == "-n") {
        out.push("-n".into());
    }
    out.push("-l".into());
    out.extend(resolved[i..].iter().cloned());
    Some(out)
}

fn resolve_one(name: &str, path: &SearchPath) -> Result<String, Unrunnable> {
    if name.is_empty() {
        return Err(Unrunnable::Empty);
    }
    if name.starts_with('/') {
        return if is_executable_file(Path::new(name)) {
            Ok(name.to_string())
        } else {
            Err(Unrunnable::NotExecutable {
                path: name.to_string(),
            })
        };
    }
    if name.contains('/') {
        return Err(Unrunnable::Relative {
            name: name.to_string(),
        });
    }
    path.find(name)
        .map(|p| p.display().to_string())
        .ok_or_else(|| Unrunnable::NotFound {
            name: name.to_string(),
            path: path.to_string(),
        })
}

/// A regular file (symbolic links followed) with an execute bit set.
fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn fake_bin(dir: &Path, name: &str) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    }

    #[test]
    fn names_resolve_on_the_search_path_and_sudo_resolves_its_command() {
        let dir = tempfile::tempdir().unwrap();
        let sudo = fake_bin(dir.path(), "sudo");
        let scontrol = fake_bin(dir.path(), "scontrol");
        std::fs::write(dir.path().join("not-exec"), "x").unwrap();
        let path = SearchPath::new([dir.path().to_path_buf()]);
        assert_eq!(
            resolve_argv(
                &v(&["sudo", "-n", "-u", "root", "scontrol", "update"]),
                &path
            )
            .unwrap(),
            v(&[&sudo, "-n", "-u", "root", &scontrol, "update"])
        );
        assert_eq!(
            resolve_argv(&v(&[&scontrol, "x"]), &path).unwrap(),
            v(&[&scontrol, "x"])
        );
        let e = resolve_argv(&v(&["kubectl", "cordon"]), &path).unwrap_err();
        assert_eq!(
            e.reason_on("gpu-node-17"),
            format!(
                "kubectl not found on gpu-node-17's PATH ({})",
                dir.path().display()
            )
        );
        assert!(matches!(
            resolve_argv(&v(&["not-exec"]), &path),
            Err(Unrunnable::NotFound { .. })
        ));
        assert!(matches!(
            resolve_argv(&v(&["sudo", "-n", "kubectl"]), &path),
            Err(Unrunnable::NotFound { .. })
        ));
        assert_eq!(
            resolve_argv(&v(&["sudo", "-n"]), &path),
            Err(Unrunnable::SudoWithoutCommand)
        );
        assert!(matches!(
            resolve_argv(&v(&["/nonexistent/gpuops/x"]), &path),
            Err(Unrunnable::NotExecutable { .. })
        ));
        assert!(matches!(
            resolve_argv(&v(&["./x"]), &path),
            Err(Unrunnable::Relative { .. })
        ));
        assert_eq!(resolve_argv(&[], &path), Err(Unrunnable::Empty));
    }

    #[test]
    fn sudo_list_asks_without_running() {
        assert_eq!(
            sudo_list_argv(&v(&[
                "/usr/bin/sudo",
                "-n",
                "/opt/slurm/bin/scontrol",
                "update"
            ])),
            Some(v(&[
                "/usr/bin/sudo",
                "-n",
                "-l",
                "/opt/slurm/bin/scontrol",
                "update"
            ]))
        );
        assert_eq!(
            sudo_list_argv(&v(&["/usr/bin/sudo", "/bin/true"])),
            Some(v(&["/usr/bin/sudo", "-n", "-l", "/bin/true"]))
        );
    }

    #[test]
    fn the_default_search_path_includes_slurm() {
        assert_eq!(SearchPath::default().to_string(), DEFAULT_SEARCH_PATH);
        assert!(DEFAULT_SEARCH_PATH.starts_with(crate::runbook::exec::SAFE_PATH));
    }
}
