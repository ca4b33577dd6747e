//! The memory collector: usage and swap (/proc/meminfo), allocation stalls
//! (/proc/vmstat), pressure stall (/proc/pressure/memory) and EDAC memory
//! controller error counts.
//!
//! Reads only through [`crate::host`]; a value that cannot be read is left
//! out, never exported as 0.

use std::sync::Arc;

use crate::collector::cpu::export_psi;
use crate::collector::{Collector, Context, Error, Sink};
use std::path::Path;

use crate::host::{parse_keyed, HostRoots, ReadError};

const NAME: &str = "memory";

pub struct MemoryCollector;

impl MemoryCollector {
    pub fn new(_ctx: &Arc<Context>) -> MemoryCollector {
        MemoryCollector
    }
}

impl Collector for MemoryCollector {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Reads only in-kernel /proc and /sys text: shares the scrape's procfs thread.
    fn may_block(&self) -> bool {
        false
    }

    fn collect(&self, ctx: &Context, sink: &mut Sink) -> Result<(), Error> {
        let roots = &ctx.roots;
        let path = roots.proc_path("meminfo");
        let meminfo = roots
            .read_kept(&path)
            .and_then(|text| parse_meminfo(&path, &text));
        if let Some(m) = sink.read(NAME, meminfo) {
            export_meminfo(sink, &m);
        }
        // Shared with the oom collector: one read of /proc/vmstat a scrape.
        let stalls = sink.shared_proc_text(roots, "vmstat").and_then(|text| {
            parse_keyed(&roots.proc_path("vmstat"), &text, |k| {
                k == "allocstall" || k.starts_with("allocstall_")
            })
        });
        if let Some(stalls) = sink.read(NAME, stalls) {
            export_allocation_stalls(sink, &stalls);
        }
        export_psi(
            sink,
            NAME,
            roots,
            "pressure/memory",
            "memory_pressure_stall_seconds_total",
            "Time some (or all) non-idle tasks stalled waiting for memory (/proc/pressure/memory total).",
        );
        export_edac(sink, roots);
        Ok(())
    }
}

/// The fields of /proc/meminfo the collector exports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meminfo {
    mem_total: u64,
    /// Absent before Linux 3.14.
    mem_available: Option<u64>,
    swap_total: u64,
    swap_free: u64,
}

/// Reads the four fields the collector needs, instead of `procfs::Meminfo`'s
/// map of all fifty. A field that is there must be a number (of kB); all but
/// `MemAvailable` must be there.
fn parse_meminfo(path: &Path, text: &str) -> Result<Meminfo, ReadError> {
    let (mut total, mut available, mut swap_total, mut swap_free) = (None, None, None, None);
    for (n, line) in text.lines().enumerate() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            "SwapTotal" => &mut swap_total,
            "SwapFree" => &mut swap_free,
            _ => continue,
        };
        let mut f = rest.split_ascii_whitespace();
        let value = f.next().and_then(|v| v.parse::<u64>().ok());
        let scale = match f.next() {
            Some("kB") => Some(1024),
            None => Some(1),
            Some(_) => None,
        };
        let (Some(value), Some(scale)) = (value, scale) else {
            return Err(ReadError::parse(
                path,
                format!(
                    "line {}: {key}: expected a number of kB, found {:?}",
                    n + 1,
                    rest.trim()
                ),
            ));
        };
        *slot = Some(value.saturating_mul(scale));
    }
    let need = |v: Option<u64>, key: &str| {
        v.ok_or_else(|| ReadError::parse(path, format!("no {key} line")))
    };
    Ok(Meminfo {
        mem_total: need(total, "MemTotal")?,
        mem_available: available,
        swap_total: need(swap_total, "SwapTotal")?,
        swap_free: need(swap_free, "SwapFree")?,
    })
}

fn export_meminfo(sink: &mut Sink, m: &Meminfo) {
    sink.gauge(
        "memory_total_bytes",
        "Usable RAM (/proc/meminfo MemTotal).",
        &[],
        m.mem_total as f64,
    );
    if let Some(avail) = m.mem_available {
        sink.gauge(
            "memory_available_bytes",
            "Memory available for new work without swapping (/proc/meminfo MemAvailable).",
            &[],
            avail as f64,
        );
        sink.gauge(
            "memory_used_bytes",
            "Memory in use (/proc/meminfo MemTotal - MemAvailable).",
            &[],
            m.mem_total.saturating_sub(avail) as f64,
        );
    }
    sink.gauge(
        "memory_swap_total_bytes",
        "Swap space (/proc/meminfo SwapTotal).",
        &[],
        m.swap_total as f64,
    );
    sink.gauge(
        "memory_swap_used_bytes",
        "Swap in use (/proc/meminfo SwapTotal - SwapFree).",
        &[],
        m.swap_total.saturating_sub(m.swap_free) as f64,
    );
}

/// `memory_pressure_events_total`: the sum of the `allocstall_*` counters
/// (one per memory zone; `allocstall` on kernels before 4.10).
fn export_allocation_stalls(sink: &mut Sink, stalls: &[(String, u64)]) {
    if stalls.is_empty() {
        tracing::debug!(
            collector = NAME,
            "no allocstall counters in /proc/vmstat, left out"
        );
        return;
    }
    let sum = stalls.iter().fold(0u64, |a, (_, v)| a.saturating_add(*v));
    sink.counter(
        "memory_pressure_events_total",
        "Direct-reclaim allocation stalls, summed over zones (/proc/vmstat allocstall_*).",
        &[],
        sum as f64,
    );
}

/// `memory_errors_total{type,controller}` from
/// `<sysfs>/devices/system/edac/mc/mc*/{ce_count,ue_count}`.
fn export_edac(sink: &mut Sink, roots: &HostRoots) {
    let dir = roots.sys_path("devices/system/edac/mc");
    let Some(names) = sink.read(NAME, roots.list_dir(&dir)) else {
        return;
    };
    let help = "Memory errors reported by the EDAC memory controller (/sys/devices/system/edac/mc/mc*/ce_count, ue_count).";
    for mc in names.iter().filter(|n| {
        n.strip_prefix("mc")
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
    }) {
        for (file, kind) in [("ce_count", "correctable"), ("ue_count", "uncorrectable")] {
            if let Some(v) = sink.read(NAME, roots.read_u64(&dir.join(mc).join(file))) {
                sink.counter(
                    "memory_errors_total",
                    help,
                    &[("type", kind), ("controller", mc)],
                    v as f64,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::testutil::{context, scrape};
    use expect_test::{expect, Expect};

    fn check(scenario: &str, expect: Expect) {
        let ctx = context(scenario, |_| {});
        expect.assert_eq(&scrape(&MemoryCollector::new(&ctx), &ctx));
    }

    #[test]
    fn full_fixture() {
        check(
            "full",
            expect![[r#"
            memory_available_bytes 41943040000
            memory_errors_total{type="correctable",controller="mc0"} 4
            memory_errors_total{type="uncorrectable",controller="mc0"} 0
            memory_errors_total{type="correctable",controller="mc1"} 1
            memory_errors_total{type="uncorrectable",controller="mc1"} 2
            memory_pressure_events_total 50
            memory_pressure_stall_seconds_total{kind="some"} 2.5
            memory_pressure_stall_seconds_total{kind="full"} 1.25
            memory_swap_total_bytes 8589934592
            memory_swap_used_bytes 1073741824
            memory_total_bytes 67108864000
            memory_used_bytes 25165824000
        "#]],
        );
    }

    #[test]
    fn missing_files_leave_series_out_without_failing() {
        check("missing", expect![[r#""#]]);
    }

    #[test]
    fn malformed_files_fail_and_leave_series_out() {
        check(
            "malformed",
            expect![[r#"
                FAILED F/malformed/proc/meminfo: line 1: MemTotal: expected a number of kB, found "lots kB"
                FAILED F/malformed/proc/vmstat: line 2: allocstall_normal: expected an unsigned integer, found "many"
                FAILED F/malformed/proc/pressure/memory: bad total "notanumber"
                FAILED F/malformed/sys/devices/system/edac/mc/mc0/ce_count: expected an unsigned integer, found "x"
                FAILED F/malformed/sys/devices/system/edac/mc/mc0/ue_count: expected an unsigned integer, found "-1"
            "#]],
        );
    }

    #[test]
    fn meminfo_is_read_as_the_procfs_crate_reads_it() {
        for f in [
            crate::collector::testutil::fixture("full/proc/meminfo"),
            std::path::PathBuf::from("/proc/meminfo"),
        ] {
            let text = std::fs::read_to_string(&f).unwrap();
            let ours = parse_meminfo(&f, &text).unwrap();
            let theirs: procfs::Meminfo = crate::host::parse_proc_text(&f, &text).unwrap();
            assert_eq!(
                ours,
                Meminfo {
                    mem_total: theirs.mem_total,
                    mem_available: theirs.mem_available,
                    swap_total: theirs.swap_total,
                    swap_free: theirs.swap_free,
                },
                "{}",
                f.display()
            );
        }
        let f = Path::new("/x/meminfo");
        assert!(parse_meminfo(f, "MemTotal: 1 kB\nSwapTotal: 0 kB\n").is_err());
        assert!(parse_meminfo(f, "MemTotal: 1 MB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n").is_err());
    }

    #[test]
    fn meminfo_without_mem_available_leaves_used_out() {
        let dir = tempfile::tempdir().unwrap();
        let full = crate::collector::testutil::fixture("full/proc/meminfo");
        let text: String = std::fs::read_to_string(full)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("MemAvailable:"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(dir.path().join("meminfo"), text).unwrap();
        let roots = HostRoots {
            procfs: dir.path().to_path_buf(),
            ..HostRoots::default()
        };
        let path = roots.proc_path("meminfo");
        let m = parse_meminfo(&path, &roots.read_text(&path).unwrap()).unwrap();
        let mut sink = Sink::new();
        export_meminfo(&mut sink, &m);
        let names: Vec<_> = sink
            .into_families()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "memory_swap_total_bytes",
                "memory_swap_used_bytes",
                "memory_total_bytes"
            ]
        );
    }
}
