//! The OOM collector: the kernel's OOM-kill counter (/proc/vmstat `oom_kill`)
//! and the time of the latest kill seen in the kernel log, plus the parser
//! that recognises OOM-kill kernel messages for the kernel-log watcher.
//!
//! The kernel reports one kill in two lines: `oom-kill:...,task_memcg=...,
//! task=NAME,pid=N,uid=N` (with the cgroup) and `... Killed process N (NAME)
//! total-vm:...`. Both are parsed; [`crate::collector::kmsg::KernelEvents`]
//! merges them into one event by pid, so a kill is never reported twice.
//! Reads only through [`crate::host`].

use std::sync::Arc;

use crate::collector::{Collector, Context, Error, Sink};
use crate::events::EventKind;
use crate::host::parse_keyed;

const NAME: &str = "oom";

pub struct OomCollector;

impl OomCollector {
    pub fn new(_ctx: &Arc<Context>) -> OomCollector {
        OomCollector
    }
}

impl Collector for OomCollector {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Reads only in-kernel /proc and /sys text: shares the scrape's procfs thread.
    fn may_block(&self) -> bool {
        false
    }

    fn collect(&self, ctx: &Context, sink: &mut Sink) -> Result<(), Error> {
        // Shared with the memory collector: one read of /proc/vmstat a scrape.
        let kills = sink
            .shared_proc_text(&ctx.roots, "vmstat")
            .and_then(|text| {
                parse_keyed(&ctx.roots.proc_path("vmstat"), &text, |k| k == "oom_kill")
            });
        match sink.read(NAME, kills).as_deref() {
            Some([(_, n), ..]) => sink.counter(
                "oom_kills_total",
                "Processes killed by the kernel OOM killer since boot (/proc/vmstat oom_kill).",
                &[],
                *n as f64,
            ),
            Some([]) => {
                tracing::debug!(
                    collector = NAME,
                    "no oom_kill in /proc/vmstat (kernel before 4.13), left out"
                );
            }
            None => {}
        }
        if let Some(t) = ctx.events.oom_last_timestamp() {
            sink.gauge(
                "oom_kill_last_timestamp_seconds",
                "Unix time of the latest OOM kill in the kernel log (/dev/kmsg \"Killed process\" and \"oom-kill:\" lines).",
                &[],
                t,
            );
        }
        Ok(())
    }
}

/// Recognises an OOM-kill kernel message:
/// `Out of memory: Killed process 1234 (python) total-vm:...`,
/// `Memory cgroup out of memory: Killed process 1234 (python) ...` and
/// `oom-kill:constraint=...,oom_memcg=/a,task_memcg=/a/b,task=python,pid=1234,uid=0`.
pub fn parse_kmsg(message: &str) -> Option<EventKind> {
    if let Some(rest) = message.strip_prefix("oom-kill:") {
        return parse_oom_kill_line(rest);
    }
    let at = message.find("Killed process ")?;
    let rest = &message[at + "Killed process ".len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let pid: u32 = rest[..digits].parse().ok()?;
    let after = rest[digits..].strip_prefix(" (")?;
    // The name may itself hold ')': it ends at the ')' before " total-vm" if printed.
    let head = match after.find(") total-vm") {
        Some(i) => &after[..i],
        None => &after[..after.rfind(')')?],
    };
    Some(EventKind::OomKill {
        pid: Some(pid),
        process: Some(head.to_string()),
        cgroup: None,
    })
}

fn parse_oom_kill_line(rest: &str) -> Option<EventKind> {
    // task= holds the command name, which may contain ','; pid and uid follow it.
    let task_at = rest
        .rfind(",task=")
        .map(|i| i + 1)
        .or_else(|| rest.starts_with("task=").then_some(0))?;
    let before = &rest[..task_at];
    let tail = &rest[task_at + "task=".len()..];
    let pid_at = tail.rfind(",pid=")?;
    let process = &tail[..pid_at];
    let pid_text = &tail[pid_at + ",pid=".len()..];
    let pid = pid_text.split(',').next()?.trim().parse::<u32>().ok()?;
    let field = |key: &str| {
        before
            .split(',')
            .find_map(|f| f.strip_prefix(key))
            .filter(|v| !v.is_empty() && *v != "(null)")
            .map(str::to_string)
    };
    Some(EventKind::OomKill {
        pid: Some(pid),
        process: Some(process.to_string()).filter(|p| !p.is_empty()),
        cgroup: field("task_memcg=").or_else(|| field("oom_memcg=")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(message: &str, expect: Option<(u32, &str, Option<&str>)>) {
        let want = expect.map(|(pid, process, cgroup)| EventKind::OomKill {
            pid: Some(pid),
            process: Some(process.to_string()),
            cgroup: cgroup.map(str::to_string),
        });
        assert_eq!(parse_kmsg(message), want, "{message}");
    }

    #[test]
    fn parses_oom_kill_messages() {
        check(
            "Out of memory: Killed process 1234 (python) total-vm:9861072kB, anon-rss:8192000kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:16384kB oom_score_adj:0",
            Some((1234, "python", None)),
        );
        check(
            "Memory cgroup out of memory: Killed process 4321 (trainer (rank 0)) total-vm:100kB, anon-rss:50kB, file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:8kB oom_score_adj:999",
            Some((4321, "trainer (rank 0)", None)),
        );
        check(
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=cri-containerd-ab12.scope,mems_allowed=0-1,oom_memcg=/kubepods/burstable/pod5f0c,task_memcg=/kubepods/burstable/pod5f0c/ab12,task=python,pid=1234,uid=0",
            Some((1234, "python", Some("/kubepods/burstable/pod5f0c/ab12"))),
        );
        check(
            "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/user.slice/user-1000.slice,task=a,b,pid=77,uid=1000",
            Some((77, "a,b", Some("/user.slice/user-1000.slice"))),
        );
        // Older kernels: "Killed process" without the "Out of memory:" prefix.
        check(
            "Killed process 99 (java) total-vm:1kB, anon-rss:1kB, file-rss:0kB",
            Some((99, "java", None)),
        );
    }

    #[test]
    fn ignores_other_messages() {
        for m in [
            "Out of memory: Kill process 1234 (python) score 900 or sacrifice child",
            "oom_reaper: reaped process 1234 (python), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
            "python invoked oom-killer: gfp_mask=0x100cca(GFP_HIGHUSER_MOVABLE), order=0, oom_score_adj=0",
            "Killed process x (y)",
            "oom-kill:constraint=CONSTRAINT_NONE,task=python,pid=notanumber,uid=0",
            "I/O error, dev sda, sector 1",
        ] {
            assert_eq!(parse_kmsg(m), None, "{m}");
        }
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;
    use crate::collector::testutil::{context, scrape};
    use expect_test::{expect, Expect};

    fn check(scenario: &str, expect: Expect) {
        let ctx = context(scenario, |_| {});
        expect.assert_eq(&scrape(&OomCollector::new(&ctx), &ctx));
    }

    #[test]
    fn full_fixture() {
        // btime 1700000000 + the last kill's record at 3600.5 s after boot.
        check(
            "full",
            expect![[r#"
            oom_kill_last_timestamp_seconds 1700003600.5
            oom_kills_total 5
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
                FAILED F/malformed/proc/vmstat: line 3: oom_kill: expected an unsigned integer, found "three"
            "#]],
        );
    }

    #[test]
    fn kernel_log_victims_are_one_event_per_kill() {
        let ctx = context("full", |_| {});
        let victims: Vec<_> = ctx
            .events
            .since(0.0)
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::OomKill {
                    pid,
                    process,
                    cgroup,
                } => Some((e.timestamp, pid, process, cgroup)),
                _ => None,
            })
            .collect();
        expect![[r#"
            [
                (
                    1700001800.0001,
                    Some(
                        4242,
                    ),
                    Some(
                        "python3",
                    ),
                    Some(
                        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f0c.slice/cri-containerd-9f8e.scope",
                    ),
                ),
                (
                    1700003600.4,
                    Some(
                        5151,
                    ),
                    Some(
                        "trainer",
                    ),
                    Some(
                        "/system.slice/trainer.service",
                    ),
                ),
            ]
        "#]]
        .assert_debug_eq(&victims);
    }
}
