//! The kernel-log watcher and the store of recent kernel events.
//!
//! A thread follows `--kmsg` (default `/dev/kmsg`, records
//! `prio,seq,usec,flags;message`) and hands each message to the parsers of
//! the collectors that care (OOM kills, block I/O errors, NVIDIA XIDs). Records
//! already in the ring buffer when the agent starts are kept for
//! `GET /v1/events` but not counted, so a restart does not inflate counters;
//! when `--kmsg` names a regular file every record in it counts (tests feed the
//! agent that way, and may append to the file while it runs).
//! This module reads only the kernel log; it exports nothing but its own health.
//! The events themselves are kept in `crate::events` (re-exported here).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use crate::events::{unix_now, EventKind, KernelEvent, KernelEvents, XidSource};

use crate::collector::{Collector, Context, Error, Sink};
use crate::host::HostRoots;

/// A message parser: returns the event a kernel message describes, if any.
type Parser = fn(&str) -> Option<EventKind>;

/// Every parser, tried in order; the first match wins.
const PARSERS: &[Parser] = &[
    crate::collector::oom::parse_kmsg,
    crate::collector::storage::parse_kmsg,
    crate::gpu::xid::parse_kmsg,
];

impl KernelEvents {
    /// Parses one raw record (`prio,seq,usec,flags;message` plus continuation
    /// lines) and records the event it describes, if any.
    pub fn ingest_record(&self, record: &str, boot_time: f64, counted: bool) {
        let Some(rec) = parse_record(record) else {
            return;
        };
        if counted {
            self.count_record();
        }
        let Some(kind) = PARSERS.iter().find_map(|p| p(rec.message)) else {
            return;
        };
        self.record(KernelEvent {
            timestamp: boot_time + rec.usec as f64 / 1e6,
            counted,
            kind,
            message: rec.message.to_string(),
        });
    }
}

/// One parsed kernel-log record.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub priority: u8,
    pub seq: u64,
    pub usec: u64,
    pub message: &'a str,
}

/// Parses `prio,seq,usec,flags[,more];message`; continuation lines are dropped.
pub fn parse_record(raw: &str) -> Option<Record<'_>> {
    let first = raw.lines().next()?;
    let (header, message) = first.split_once(';')?;
    let mut fields = header.split(',');
    let prio: u32 = fields.next()?.trim().parse().ok()?;
    let seq = fields.next()?.trim().parse().ok()?;
    let usec = fields.next()?.trim().parse().ok()?;
    Some(Record {
        priority: (prio & 7) as u8,
        seq,
        usec,
        message: message.trim_end(),
    })
}

/// Splits a text of records (one per line, continuation lines start with a space).
fn split_records(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with(' ') {
            if let Some(last) = out.last_mut() {
                last.push('\n');
                last.push_str(line);
            }
        } else if !line.trim().is_empty() {
            out.push(line.to_string());
        }
    }
    out
}

/// Boot time (Unix seconds) from `<procfs>/stat`'s `btime`, else now minus uptime, else now.
pub fn boot_time(roots: &HostRoots) -> f64 {
    if let Ok(stat) = roots.read_proc("stat") {
        if let Some(b) = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            return b;
        }
    }
    let now = unix_now();
    roots
        .read_proc("uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(now, |up| now - up)
}

/// Reads the kernel log once, synchronously: every record of a regular file
/// (counted), or the records in the ring buffer (kept, not counted).
/// Used by `gpuops collect --once`.
pub fn read_once(roots: &HostRoots, events: &KernelEvents) {
    let boot = boot_time(roots);
    match open(&roots.kmsg) {
        Ok(Source::File(mut f)) => {
            events.set_readable(true);
            let mut text = String::new();
            if let Err(e) = f.read_to_string(&mut text) {
                tracing::warn!(path = %roots.kmsg.display(), error = %e, "cannot read kernel log");
            }
            for r in split_records(&text) {
                events.ingest_record(&r, boot, true);
            }
        }
        Ok(Source::Device(mut f)) => {
            events.set_readable(true);
            drain_device(&mut f, &mut vec![0u8; RECORD_MAX], events, boot, false);
        }
        Err(e) => report_unreadable(&roots.kmsg, events, &e),
    }
}

/// Starts the watcher thread. Never fails: an unreadable log is logged once
/// and shows as `gpuops_kernel_log_readable 0`.
pub fn spawn_watcher(roots: HostRoots, events: Arc<KernelEvents>) {
    let spawned = std::thread::Builder::new()
        .name("gpuops-kmsg".into())
        .spawn(move || watch(&roots, &events));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the kernel-log watcher");
    }
}

enum Source {
    File(File),
    Device(File),
}

fn open(path: &Path) -> io::Result<Source> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        Ok(Source::File(File::open(path)?))
    } else {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)?;
        Ok(Source::Device(f))
    }
}

fn report_unreadable(path: &Path, events: &KernelEvents, e: &io::Error) {
    events.set_readable(false);
    tracing::warn!(
        path = %path.display(),
        error = %e,
        "kernel log not readable: OOM victims, I/O errors and kernel-log XIDs will not be reported (grant CAP_SYSLOG or pass --kmsg)"
    );
}

fn watch(roots: &HostRoots, events: &KernelEvents) {
    let boot = boot_time(roots);
    match open(&roots.kmsg) {
        Ok(Source::File(f)) => {
            events.set_readable(true);
            follow_file(f, events, boot);
        }
        Ok(Source::Device(mut f)) => {
            events.set_readable(true);
            let mut buf = vec![0u8; RECORD_MAX];
            drain_device(&mut f, &mut buf, events, boot, false);
            loop {
                let ready = wait_for_records(&f);
                let read = drain_device(&mut f, &mut buf, events, boot, true);
                if ready && read == 0 {
                    // Said readable and gave nothing (a hung-up FIFO in
                    // place of /dev/kmsg): do not spin on it.
                    std::thread::sleep(QUIET_RETRY);
                }
            }
        }
        Err(e) => report_unreadable(&roots.kmsg, events, &e),
    }
}

/// The longest record /dev/kmsg returns in one read (its own limit is 8 KiB
/// plus the header).
const RECORD_MAX: usize = 16 * 1024;

/// How long the watcher sleeps in `poll` before reading anyway (a guard for a
/// `--kmsg` device that never reports readiness), and after a readiness that
/// had nothing to read.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
const QUIET_RETRY: Duration = Duration::from_millis(500);

/// Sleeps until the kernel log has a record this reader has not seen (or
/// reports that records were overwritten), at most [`POLL_TIMEOUT`]. The
/// thread does not wake while the log is quiet: the agent's idle cost (it
/// used to read every 500 ms: 2 wake-ups a second, about 135 µs of CPU a
/// second on a 2-core VM). Returns whether poll said the log is readable.
fn wait_for_records(f: &File) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let timeout = Timespec {
        tv_sec: POLL_TIMEOUT.as_secs() as i64,
        tv_nsec: 0,
    };
    let mut fds = [PollFd::new(f, PollFlags::IN)];
    match poll(&mut fds, Some(&timeout)) {
        Ok(0) => false,
        Ok(_) => !fds[0].revents().is_empty(),
        Err(rustix::io::Errno::INTR) => false,
        Err(e) => {
            tracing::warn!(error = %e, "cannot wait for kernel log records, reading every 500 ms");
            std::thread::sleep(QUIET_RETRY);
            false
        }
    }
}

/// Reads every record available now from a non-blocking /dev/kmsg; returns
/// how many were read.
fn drain_device(
    f: &mut File,
    buf: &mut [u8],
    events: &KernelEvents,
    boot: f64,
    counted: bool,
) -> usize {
    let mut records = 0;
    loop {
        match f.read(buf) {
            Ok(0) => return records,
            Ok(n) => {
                records += 1;
                let rec = String::from_utf8_lossy(&buf[..n]);
                events.ingest_record(&rec, boot, counted);
            }
            // Records were overwritten before we read them: go on from the next.
            Err(e) if e.raw_os_error() == Some(32) => {
                records += 1;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return records,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "kernel log read failed");
                std::thread::sleep(Duration::from_secs(5));
                return records;
            }
        }
    }
}

/// Follows a regular file like `tail -f`: every record counts.
fn follow_file(mut f: File, events: &KernelEvents, boot: f64) {
    let mut offset = 0u64;
    let mut pending = String::new();
    loop {
        let mut chunk = String::new();
        let read = f
            .seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_to_string(&mut chunk));
        match read {
            Ok(n) if n > 0 => {
                offset += n as u64;
                pending.push_str(&chunk);
                // Keep a trailing partial line for the next round.
                let complete = match pending.rfind('\n') {
                    Some(i) => {
                        let rest = pending.split_off(i + 1);
                        std::mem::replace(&mut pending, rest)
                    }
                    None => String::new(),
                };
                for r in split_records(&complete) {
                    events.ingest_record(&r, boot, true);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "kernel log file read failed"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Exports the watcher's health.
pub struct KmsgCollector;

impl Collector for KmsgCollector {
    fn name(&self) -> &'static str {
        "kmsg"
    }

    /// Reads only in-kernel /proc and /sys text: shares the scrape's procfs thread.
    fn may_block(&self) -> bool {
        false
    }

    fn collect(&self, ctx: &Context, sink: &mut Sink) -> Result<(), Error> {
        if let Some(readable) = ctx.events.readable() {
            sink.gauge(
                "gpuops_kernel_log_readable",
                "Whether the kernel log (--kmsg, default /dev/kmsg) could be opened (1) or not (0).",
                &[],
                if readable { 1.0 } else { 0.0 },
            );
        }
        sink.counter(
            "gpuops_kernel_log_records_total",
            "Kernel-log records read since the agent started (records already in the ring buffer at start are not counted).",
            &[],
            ctx.events.records_read() as f64,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_records() {
        assert_eq!(
            parse_record("6,1234,5000000,-;hello world\n SUBSYSTEM=pci"),
            Some(Record {
                priority: 6,
                seq: 1234,
                usec: 5_000_000,
                message: "hello world"
            })
        );
        assert_eq!(parse_record("garbage"), None);
        assert_eq!(parse_record("a,b,c;msg"), None);
    }

    #[test]
    fn splits_continuation_lines() {
        let r = split_records("6,1,2,-;a\n SUBSYSTEM=x\n6,2,3,-;b\n");
        assert_eq!(
            r,
            vec![
                "6,1,2,-;a\n SUBSYSTEM=x".to_string(),
                "6,2,3,-;b".to_string()
            ]
        );
    }

    fn xid(source: XidSource, t: f64) -> KernelEvent {
        KernelEvent {
            timestamp: t,
            counted: true,
            kind: crate::gpu::xid::event("00000000:3B:00.0".into(), 79, None, None, source),
            message: String::new(),
        }
    }

    #[test]
    fn same_xid_from_both_sources_counts_once() {
        let ev = KernelEvents::new();
        ev.record(xid(XidSource::Nvml, 100.0));
        ev.record(xid(XidSource::Kmsg, 101.5));
        assert_eq!(ev.xids().values().sum::<u64>(), 1);
        // A second, later occurrence counts again.
        ev.record(xid(XidSource::Kmsg, 200.0));
        assert_eq!(ev.xids().values().sum::<u64>(), 2);
        // Repeats from one source are separate events.
        ev.record(xid(XidSource::Kmsg, 200.5));
        assert_eq!(ev.xids().values().sum::<u64>(), 3);
    }

    fn oom(t: f64, message: &str) -> KernelEvent {
        KernelEvent {
            timestamp: t,
            counted: true,
            kind: crate::collector::oom::parse_kmsg(message).unwrap(),
            message: message.into(),
        }
    }

    #[test]
    fn one_oom_kill_reported_in_two_lines_is_one_event() {
        let ev = KernelEvents::new();
        ev.record(oom(
            10.0,
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/kubepods/pod1,task_memcg=/kubepods/pod1/c1,task=python,pid=1234,uid=0",
        ));
        ev.record(oom(
            10.001,
            "Memory cgroup out of memory: Killed process 1234 (python) total-vm:10kB, anon-rss:5kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:1kB oom_score_adj:0",
        ));
        // A different victim a moment later is its own event.
        ev.record(oom(
            10.5,
            "Out of memory: Killed process 99 (java) total-vm:10kB, anon-rss:5kB, file-rss:0kB",
        ));
        let events = ev.since(0.0);
        assert_eq!(events.len(), 2, "{events:#?}");
        assert_eq!(
            events[0].kind,
            EventKind::OomKill {
                pid: Some(1234),
                process: Some("python".into()),
                cgroup: Some("/kubepods/pod1/c1".into()),
            }
        );
        assert!(events[0]
            .message
            .starts_with("Memory cgroup out of memory: Killed process 1234"));
        assert_eq!(ev.oom_last_timestamp(), Some(10.5));
    }

    #[test]
    fn kmsg_record_replaces_the_nvml_one_it_duplicates() {
        let ev = KernelEvents::new();
        ev.record(xid(XidSource::Nvml, 100.0));
        let mut k = xid(XidSource::Kmsg, 100.5);
        k.message =
            "NVRM: Xid (PCI:0000:3b:00): 79, pid=7, name=python, GPU has fallen off the bus."
                .into();
        ev.record(k.clone());
        assert_eq!(ev.since(0.0), vec![k]);
        assert_eq!(ev.xids().values().sum::<u64>(), 1);
    }

    #[test]
    fn uncounted_events_are_kept_but_not_counted() {
        let ev = KernelEvents::new();
        let mut e = xid(XidSource::Kmsg, 5.0);
        e.counted = false;
        ev.record(e);
        assert!(ev.xids().is_empty());
        assert_eq!(ev.since(0.0).len(), 1);
    }
}
