//! The package definitions: every file the Debian and RPM metadata name
//! exists, the maintainer scripts are valid POSIX sh, the node package
//! (`gpuops-agent`, cargo-deb variant `agent`) holds the agent build and the
//! agent's files only, and (once `packaging/build-deb` has run) the built
//! .debs hold what the install guide promises. Reads files only (and runs
//! the node package's binary for its `--help`).
#![allow(clippy::disallowed_methods)] // tests spawn the real binary and external tools

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifest() -> toml::Table {
    let text = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    text.parse::<toml::Table>().expect("Cargo.toml parses")
}

fn metadata<'a>(m: &'a toml::Table, tool: &str) -> &'a toml::Table {
    m["package"]["metadata"][tool]
        .as_table()
        .unwrap_or_else(|| panic!("no [package.metadata.{tool}]"))
}

/// (source, dest) of every deb asset.
fn deb_assets() -> Vec<(String, String)> {
    let m = manifest();
    metadata(&m, "deb")["assets"]
        .as_array()
        .expect("deb assets")
        .iter()
        .map(|a| {
            let a = a.as_array().expect("asset triple");
            (
                a[0].as_str().expect("source").to_string(),
                a[1].as_str().expect("dest").to_string(),
            )
        })
        .collect()
}

/// The node package's cargo-deb variant, `[package.metadata.deb.variants.agent]`.
fn agent_variant(m: &toml::Table) -> &toml::Table {
    metadata(m, "deb")["variants"]["agent"]
        .as_table()
        .expect("no [package.metadata.deb.variants.agent]")
}

/// (source, dest) of every asset of the node package.
fn agent_deb_assets() -> Vec<(String, String)> {
    let m = manifest();
    agent_variant(&m)["assets"]
        .as_array()
        .expect("agent deb assets")
        .iter()
        .map(|a| {
            let a = a.as_array().expect("asset triple");
            (
                a[0].as_str().expect("source").to_string(),
                a[1].as_str().expect("dest").to_string(),
            )
        })
        .collect()
}

/// (source, dest) of every rpm asset.
fn rpm_assets() -> Vec<(String, String)> {
    let m = manifest();
    metadata(&m, "generate-rpm")["assets"]
        .as_array()
        .expect("rpm assets")
        .iter()
        .map(|a| {
            (
                a["source"].as_str().expect("source").to_string(),
                a["dest"].as_str().expect("dest").to_string(),
            )
        })
        .collect()
}

#[test]
fn every_packaged_source_file_exists() {
    let mut missing = Vec::new();
    for (src, _) in deb_assets()
        .into_iter()
        .chain(agent_deb_assets())
        .chain(rpm_assets())
        .chain(agent_rpm_assets())
    {
        // Built by cargo, and the runbooks (another part of the tree) are
        // checked by build-deb itself.
        if src.starts_with("target/") || src.contains('*') {
            continue;
        }
        if !repo().join(&src).is_file() {
            missing.push(src);
        }
    }
    assert!(missing.is_empty(), "packaged files missing: {missing:?}");
}

/// Installed paths, normalised (a deb dest ending in / keeps the file
/// name); lintian overrides are Debian metadata, not installed files of the RPM.
fn installed_paths(assets: Vec<(String, String)>) -> BTreeSet<String> {
    assets
        .into_iter()
        .map(|(src, dest)| {
            let dest = dest.trim_start_matches('/').to_string();
            if dest.ends_with('/') && !src.contains('*') {
                let name = src.rsplit('/').next().unwrap_or_default();
                format!("/{dest}{name}")
            } else {
                format!("/{dest}")
            }
        })
        .filter(|d| !d.starts_with("/usr/share/lintian/"))
        .collect()
}

#[test]
fn deb_and_rpm_install_the_same_files() {
    assert_eq!(installed_paths(deb_assets()), installed_paths(rpm_assets()));
}

/// (source, dest) of every asset of the node package's RPM.
fn agent_rpm_assets() -> Vec<(String, String)> {
    let m = manifest();
    metadata(&m, "generate-rpm")["variants"]["agent"]["assets"]
        .as_array()
        .expect("agent rpm assets")
        .iter()
        .map(|a| {
            (
                a["source"].as_str().expect("source").to_string(),
                a["dest"].as_str().expect("dest").to_string(),
            )
        })
        .collect()
}

#[test]
fn agent_deb_and_rpm_install_the_same_files() {
    let m = manifest();
    let rpm = &metadata(&m, "generate-rpm")["variants"]["agent"];
    assert_eq!(rpm["name"].as_str(), Some("gpuops-agent"));
    assert!(rpm["conflicts"]
        .as_table()
        .is_some_and(|c| c.contains_key("gpuops")));
    for script in [
        "post_install_script",
        "pre_uninstall_script",
        "post_uninstall_script",
    ] {
        let path = rpm[script].as_str().expect(script);
        let text = std::fs::read_to_string(repo().join(path)).expect(path);
        assert!(!text.contains("gpuops-bot"), "{path} names the bot");
    }
    assert_eq!(
        installed_paths(agent_deb_assets()),
        installed_paths(agent_rpm_assets())
    );
}

#[test]
fn deb_installs_the_promised_paths() {
    let dests: BTreeSet<String> = deb_assets().into_iter().map(|(_, d)| d).collect();
    for wanted in [
        "usr/bin/",
        "usr/lib/systemd/system/",
        "usr/lib/sysusers.d/gpuops.conf",
        "usr/lib/tmpfiles.d/gpuops.conf",
        "etc/gpuops/agent.toml",
        "etc/gpuops/bot.toml",
        "usr/share/gpuops/runbooks/",
        "usr/share/gpuops/prometheus/rules/",
        "usr/share/gpuops/alertmanager/",
        "usr/share/gpuops/grafana/",
    ] {
        assert!(dests.contains(wanted), "no asset installs to {wanted}");
    }
}

#[test]
fn maintainer_scripts_are_executable_posix_sh() {
    use std::os::unix::fs::PermissionsExt as _;
    for name in [
        "packaging/debian/postinst",
        "packaging/debian/prerm",
        "packaging/debian/postrm",
        "packaging/debian/agent/postinst",
        "packaging/debian/agent/prerm",
        "packaging/debian/agent/postrm",
        "packaging/build-deb",
        "packaging/build-rpm",
        "packaging/check-deb-install",
        "packaging/privileged/check-sudoers",
    ] {
        let path = repo().join(name);
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{name} is not executable");
        let shell = if name.starts_with("packaging/build") {
            "bash"
        } else {
            "sh"
        };
        let out = Command::new(shell)
            .arg("-n")
            .arg(&path)
            .output()
            .expect("run sh -n");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for name in [
        "packaging/rpm/post_install.sh",
        "packaging/rpm/pre_uninstall.sh",
        "packaging/rpm/post_uninstall.sh",
        "packaging/rpm/agent/post_install.sh",
        "packaging/rpm/agent/pre_uninstall.sh",
        "packaging/rpm/agent/post_uninstall.sh",
    ] {
        let out = Command::new("sh")
            .arg("-n")
            .arg(repo().join(name))
            .output()
            .expect("run sh -n");
        assert!(out.status.success(), "{name}");
    }
}

#[test]
fn postinst_enables_the_agent_but_not_the_bot() {
    let text = std::fs::read_to_string(repo().join("packaging/debian/postinst")).expect("postinst");
    assert!(text.contains("deb-systemd-helper enable 'gpuops-agent.service'"));
    assert!(text.contains("deb-systemd-invoke start 'gpuops-agent.service'"));
    for line in text.lines().filter(|l| l.contains("gpuops-bot")) {
        let l = line.trim();
        assert!(
            l.starts_with('#')
                || l.contains("update-state")
                || l.contains("deb-systemd-invoke try-restart"),
            "postinst touches the bot beyond remembering it: {l}"
        );
    }
    assert!(text.contains("systemd-sysusers gpuops.conf"));
}

/// Issue 23: the node package holds the agent build and the agent's files
/// only, and it and the full package, which install the same paths, are
/// alternatives (each conflicts with and replaces the other).
#[test]
fn agent_deb_is_the_agent_build_with_the_agent_files_only() {
    let m = manifest();
    let full = metadata(&m, "deb");
    let agent = agent_variant(&m);
    assert_eq!(agent["name"].as_str(), Some("gpuops-agent"));
    assert_eq!(agent["default-features"].as_bool(), Some(false));
    let features: Vec<&str> = agent["features"]
        .as_array()
        .expect("features")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert_eq!(features, ["agent"]);
    // Its own profile, so the node build never overwrites target/release/gpuops.
    let profile = agent["profile"].as_str().expect("profile");
    assert_ne!(profile, "release");
    assert!(
        m["profile"][profile].is_table(),
        "no [profile.{profile}] in Cargo.toml"
    );
    let maint = agent["maintainer-scripts"]
        .as_str()
        .expect("maintainer-scripts");
    assert_ne!(
        maint.trim_end_matches('/'),
        full["maintainer-scripts"]
            .as_str()
            .unwrap_or("")
            .trim_end_matches('/'),
        "the node package would run the full package's scripts (which name the bot)"
    );
    assert_eq!(agent["conflicts"].as_str(), Some("gpuops"));
    assert_eq!(agent["replaces"].as_str(), Some("gpuops"));
    assert_eq!(full["conflicts"].as_str(), Some("gpuops-agent"));
    assert_eq!(full["replaces"].as_str(), Some("gpuops-agent"));

    let assets = agent_deb_assets();
    let dests: BTreeSet<&str> = assets.iter().map(|(_, d)| d.as_str()).collect();
    for wanted in [
        "usr/bin/",
        "usr/lib/systemd/system/",
        "usr/lib/sysusers.d/gpuops.conf",
        "usr/lib/tmpfiles.d/gpuops.conf",
        "etc/gpuops/agent.toml",
        "usr/share/gpuops/runbooks/",
        "usr/share/gpuops/privileged/",
    ] {
        assert!(
            dests.contains(wanted),
            "the node package installs nothing to {wanted}"
        );
    }
    let sources: BTreeSet<&str> = assets.iter().map(|(s, _)| s.as_str()).collect();
    for wanted in [
        "target/release/gpuops",
        "systemd/gpuops-agent.service",
        "packaging/agent.toml",
        "runbooks/*.yaml",
        "packaging/privileged/sudoers",
        "packaging/privileged/gpuops-agent-privileged.conf",
    ] {
        assert!(sources.contains(wanted), "the node package lacks {wanted}");
    }
    for (src, dest) in &assets {
        for bot in ["bot", "prometheus", "alertmanager", "grafana", "fonts"] {
            assert!(
                !src.contains(bot) && !dest.contains(bot),
                "the node package installs the bot host's {src} -> {dest}"
            );
        }
    }
    // The same layout as the full package, so one replaces the other in place.
    let full_dests: BTreeSet<String> = deb_assets().into_iter().map(|(_, d)| d).collect();
    for dest in dests
        .iter()
        .filter(|d| !d.starts_with("usr/share/lintian/"))
    {
        assert!(
            full_dests.contains(*dest),
            "the node package installs {dest}, the full package does not"
        );
    }
}

#[test]
fn agent_postinst_enables_the_agent_and_never_names_the_bot() {
    for name in ["postinst", "prerm", "postrm"] {
        let text = std::fs::read_to_string(repo().join("packaging/debian/agent").join(name))
            .unwrap_or_else(|e| panic!("packaging/debian/agent/{name}: {e}"));
        assert!(!text.contains("gpuops-bot"), "agent {name} names the bot");
        assert!(text.contains("'gpuops-agent.service'"), "agent {name}");
    }
    let text =
        std::fs::read_to_string(repo().join("packaging/debian/agent/postinst")).expect("postinst");
    assert!(text.contains("deb-systemd-helper enable 'gpuops-agent.service'"));
    assert!(text.contains("deb-systemd-invoke start 'gpuops-agent.service'"));
    assert!(text.contains("systemd-sysusers gpuops.conf"));
}

/// The newest .deb of `package` (`gpuops` or `gpuops-agent`) that
/// `packaging/build-deb` wrote.
fn built_deb_of(package: &str) -> PathBuf {
    let dir = repo().join("target/debian");
    let prefix = format!("{package}_");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; run packaging/build-deb first", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    debs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    debs.pop().unwrap_or_else(|| {
        panic!(
            "no {prefix}*.deb in {}; run packaging/build-deb first",
            dir.display()
        )
    })
}

/// The full package.
fn built_deb() -> PathBuf {
    built_deb_of("gpuops")
}

/// A control field of a built package (`dpkg-deb --field`).
fn deb_field(deb: &std::path::Path, field: &str) -> String {
    let out = Command::new("dpkg-deb")
        .arg("--field")
        .arg(deb)
        .arg(field)
        .output()
        .expect("dpkg-deb --field");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The node binary's size budget (issue 23: ≤ 8 MB).
const NODE_BINARY_MAX_BYTES: u64 = 8_000_000;

/// The node package as built: the agent build's binary (no bot
/// subcommand, `gpuops bot` refused, within its size budget), the agent's unit and files, no bot
/// unit, configuration or Prometheus/Grafana files, conflicting with the
/// full package.
#[test]
#[ignore = "needs target/debian/gpuops-agent_*.deb from packaging/build-deb; run by .ci/run"]
fn built_agent_deb_holds_the_agent_build_and_nothing_of_the_bot() {
    let deb = built_deb_of("gpuops-agent");
    assert_eq!(deb_field(&deb, "Package"), "gpuops-agent");
    assert_eq!(deb_field(&deb, "Conflicts"), "gpuops");
    assert_eq!(deb_field(&deb, "Replaces"), "gpuops");
    assert_eq!(deb_field(&built_deb(), "Conflicts"), "gpuops-agent");

    let contents = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(&deb)
        .output()
        .expect("dpkg-deb --contents");
    let listing = String::from_utf8_lossy(&contents.stdout);
    for path in [
        "./usr/bin/gpuops",
        "./usr/lib/systemd/system/gpuops-agent.service",
        "./usr/lib/sysusers.d/gpuops.conf",
        "./usr/lib/tmpfiles.d/gpuops.conf",
        "./etc/gpuops/agent.toml",
        "./usr/share/gpuops/runbooks/gpu-xid.yaml",
        "./usr/share/gpuops/privileged/sudoers",
        "./usr/share/gpuops/privileged/gpuops-agent-privileged.conf",
        "./usr/share/doc/gpuops/ops.md",
        "./usr/share/doc/gpuops-agent/copyright",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} not in {}:\n{listing}",
            deb.display()
        );
    }
    for absent in [
        "gpuops-bot",
        "bot.toml",
        "prometheus",
        "alertmanager",
        "grafana",
        "DejaVu",
    ] {
        assert!(
            !listing.contains(absent),
            "{absent} in the node package {}:\n{listing}",
            deb.display()
        );
    }
    let conffiles = Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles")
        .output()
        .expect("dpkg-deb --info conffiles");
    let conffiles = String::from_utf8_lossy(&conffiles.stdout);
    let conffiles: Vec<&str> = conffiles.lines().map(str::trim).collect();
    assert_eq!(conffiles, ["/etc/gpuops/agent.toml"]);

    // The packaged binary: the agent's subcommands only.
    let dir = tempfile::tempdir().expect("tempdir");
    let x = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.path())
        .status()
        .expect("dpkg-deb -x");
    assert!(x.success());
    let bin = dir.path().join("usr/bin/gpuops");
    // Issue 23's budget for the binary on every node (11.1 MB with the
    // release profile, 6.9 MB with release-agent's size settings and no h2).
    let size = std::fs::metadata(&bin).expect("usr/bin/gpuops").len();
    assert!(
        size <= NODE_BINARY_MAX_BYTES,
        "the node binary is {size} bytes, over {NODE_BINARY_MAX_BYTES}"
    );
    let help = Command::new(&bin)
        .arg("--help")
        .output()
        .expect("gpuops --help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("without the bot") && !help.contains("chat-ops bot"),
        "the node build's --help describes the full build:\n{help}"
    );
    let subcommands: Vec<&str> = help
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| !w.starts_with('-'))
        .collect();
    assert_eq!(
        subcommands,
        ["agent", "collect", "check-config", "runbook", "help"],
        "{help}"
    );
    let bot = Command::new(&bin).arg("bot").output().expect("gpuops bot");
    assert_eq!(bot.status.code(), Some(2), "gpuops bot in the node build");
    assert!(String::from_utf8_lossy(&bot.stderr).contains("unrecognized subcommand"));
    let check = Command::new(&bin)
        .args(["check-config", "--bot", "bot.toml"])
        .output()
        .expect("gpuops check-config --bot");
    assert_eq!(
        check.status.code(),
        Some(2),
        "check-config --bot in the node build"
    );
}

#[test]
#[ignore = "needs target/debian/*.deb from packaging/build-deb; run by .ci/run"]
fn built_deb_holds_binary_units_conffiles_and_ops_files() {
    let deb = built_deb();
    let contents = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(&deb)
        .output()
        .expect("dpkg-deb --contents");
    let listing = String::from_utf8_lossy(&contents.stdout);
    for path in [
        "./usr/bin/gpuops",
        "./usr/lib/systemd/system/gpuops-agent.service",
        "./usr/lib/systemd/system/gpuops-bot.service",
        "./usr/lib/sysusers.d/gpuops.conf",
        "./usr/lib/tmpfiles.d/gpuops.conf",
        "./etc/gpuops/agent.toml",
        "./etc/gpuops/bot.toml",
        "./usr/share/gpuops/runbooks/gpu-xid.yaml",
        "./usr/share/gpuops/runbooks/gpu-fell-off-bus.yaml",
        "./usr/share/gpuops/prometheus/rules/gpuops-alerts.yml",
        "./usr/share/gpuops/prometheus/rules/gpuops-recording.yml",
        "./usr/share/gpuops/alertmanager/alertmanager.yml",
        "./usr/share/gpuops/grafana/gpuops-node.json",
        "./usr/share/gpuops/privileged/sudoers",
        "./usr/share/doc/gpuops/ops.md",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} not in {}:\n{listing}",
            deb.display()
        );
    }
    let conffiles = Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles")
        .output()
        .expect("dpkg-deb --info conffiles");
    let conffiles = String::from_utf8_lossy(&conffiles.stdout);
    for c in ["/etc/gpuops/agent.toml", "/etc/gpuops/bot.toml"] {
        assert!(
            conffiles.lines().any(|l| l.trim() == c),
            "{c} is not a conffile: {conffiles}"
        );
    }
    let info = Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .output()
        .expect("dpkg-deb --info");
    let info = String::from_utf8_lossy(&info.stdout);
    for script in ["postinst", "prerm", "postrm"] {
        assert!(info.contains(script), "no {script} in {info}");
    }
    assert_eq!(deb_field(&deb, "Package"), "gpuops");
    assert_eq!(deb_field(&deb, "Conflicts"), "gpuops-agent");
}

/// Issue 22, observations 7, 8 and 10: the packaged `bot.toml` had no
/// `[rbac]` and no `[runbooks] dir`, named the Prometheus job `gpuops` (the
/// shipped job is `gpuops-agent`), and the store was `gpuops.db` in the
/// package but `bot.db` in the example and docs/ops.md.
#[test]
fn packaged_bot_toml_names_the_packaged_runbooks_the_shipped_job_and_one_store_file() {
    let read = |p: &str| std::fs::read_to_string(repo().join(p)).expect(p);
    let packaged: toml::Table = read("packaging/bot.toml").parse().expect("bot.toml");
    let example: toml::Table = read("config/bot.example.toml")
        .parse()
        .expect("bot.example.toml");

    // The runbooks the package installs.
    let dir = packaged["runbooks"]["dir"]
        .as_str()
        .expect("[runbooks] dir");
    assert_eq!(dir, "/usr/share/gpuops/runbooks");
    assert!(
        deb_assets()
            .iter()
            .any(|(src, dest)| src.starts_with("runbooks/")
                && format!("/{dest}") == format!("{dir}/")),
        "no deb asset installs runbooks/ into {dir}"
    );
    // [rbac], its placeholders explained.
    let rbac = packaged["rbac"].as_table().expect("[rbac]");
    assert!(rbac.contains_key("admins") && rbac.contains_key("operators"));
    assert!(read("packaging/bot.toml").contains("Copy member ID"));

    // One job name: the shipped Prometheus job.
    let prom: serde_norway::Value =
        serde_norway::from_str(&read("config/prometheus/prometheus.yml")).expect("prometheus.yml");
    let jobs: Vec<&str> = prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .filter_map(|j| j["job_name"].as_str())
        .collect();
    let job = packaged["agents"]["prometheus_job"]
        .as_str()
        .expect("[agents] prometheus_job");
    assert_eq!(job, "gpuops-agent");
    assert!(
        jobs.contains(&job),
        "{job} is not a job of prometheus.yml: {jobs:?}"
    );
    assert_eq!(example["agents"]["prometheus_job"].as_str(), Some(job));
    let named = regex::Regex::new(r#"prometheus_job = "([^"]*)""#).unwrap();
    for file in [
        "README.md",
        "docs/ops.md",
        "config/bot.example.toml",
        "packaging/bot.toml",
    ] {
        for c in named.captures_iter(&read(file)) {
            assert_eq!(&c[1], job, "{file}: prometheus_job = {:?}", &c[1]);
        }
    }

    // One store file name (`gpuops-bot.db` is the run-without-config default in the working directory).
    let store = packaged["store"]["path"].as_str().expect("[store] path");
    let name = store.rsplit('/').next().unwrap_or(store);
    assert_eq!(example["store"]["path"].as_str(), Some(store));
    let db = regex::Regex::new(r"[A-Za-z0-9_-]+\.db\b").unwrap();
    for file in [
        "README.md",
        "docs/ops.md",
        "config/bot.example.toml",
        "packaging/bot.toml",
    ] {
        for m in db.find_iter(&read(file)) {
            assert!(
                m.as_str() == name || m.as_str() == "gpuops-bot.db",
                "{file} names the store {}, the package {name}",
                m.as_str()
            );
        }
    }
}
