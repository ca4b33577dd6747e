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

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::collector::{Collector, Context, Error, Sink};
use crate::host::HostRoots;

/// How many events `GET /v1/events` can return.
const EVENT_CAPACITY: usize = 2048;
/// The two kernel lines of one OOM kill are this close together.
const OOM_MERGE_WINDOW_SECS: f64 = 5.0;
/// NVML and the kernel log report the same XID within this window.
const XID_DEDUPE_WINDOW_SECS: f64 = 10.0;

/// One kernel event the agent recognised.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KernelEvent {
    /// Unix time in seconds.
    pub timestamp: f64,
    /// False for records that were already in the ring buffer at start.
    pub counted: bool,
    #[serde(flatten)]
    pub kind: EventKind,
    /// The log line it came from (or a description for NVML events).
    pub message: String,
}

/// What happened.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The OOM killer killed a process (globally or in a memory cgroup).
    OomKill {
        pid: Option<u32>,
        process: Option<String>,
        cgroup: Option<String>,
    },
    /// A block-layer I/O error on a device.
    IoError { device: String },
    /// An NVIDIA XID error (build it with `crate::gpu::xid::event`, which
    /// attaches the catalogue entry shown by `GET /v1/events`).
    Xid {
        pci_bus_id: String,
        xid: u32,
        pid: Option<u32>,
        process: Option<String>,
        source: XidSource,
        /// What the code means and what to do (`None` for codes not in the catalogue).
        #[serde(skip_serializing_if = "Option::is_none")]
        info: Option<&'static crate::gpu::xid::XidInfo>,
    },
    /// A GPU stopped answering NVML (lost, fell off the bus, or timed out).
    GpuLost {
        pci_bus_id: String,
        uuid: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum XidSource {
    Kmsg,
    Nvml,
}

/// A message parser: returns the event a kernel message describes, if any.
type Parser = fn(&str) -> Option<EventKind>;

/// Every parser, tried in order; the first match wins.
const PARSERS: &[Parser] = &[
    crate::collector::oom::parse_kmsg,
    crate::collector::storage::parse_kmsg,
    crate::gpu::xid::parse_kmsg,
];

/// Recent events and the counters derived from them; shared by the watcher,
/// the collectors and the HTTP API.
#[derive(Default)]
pub struct KernelEvents {
    inner: Mutex<Inner>,
    records: AtomicU64,
    /// 0 unknown, 1 readable, 2 not readable.
    readable: AtomicU8,
}

#[derive(Default)]
struct Inner {
    events: VecDeque<KernelEvent>,
    io_errors: BTreeMap<String, u64>,
    xids: BTreeMap<(String, u32), u64>,
    oom_last: Option<f64>,
    /// Recent XIDs not yet matched by the other source: (bus, xid, time, source).
    recent_xids: VecDeque<(String, u32, f64, XidSource)>,
}

impl KernelEvents {
    pub fn new() -> KernelEvents {
        KernelEvents::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records an event; `counted` events also bump the counters.
    pub fn record(&self, event: KernelEvent) {
        let mut inner = self.lock();
        match &event.kind {
            EventKind::OomKill { .. } => {
                inner.oom_last = Some(
                    inner
                        .oom_last
                        .map_or(event.timestamp, |t| t.max(event.timestamp)),
                );
                if inner.merge_oom_kill(&event) {
                    return;
                }
            }
            EventKind::IoError { device } if event.counted => {
                *inner.io_errors.entry(device.clone()).or_insert(0) += 1;
            }
            EventKind::Xid {
                pci_bus_id,
                xid,
                source,
                ..
            } if event.counted => {
                let key = (pci_bus_id.clone(), *xid);
                if !inner.take_matching_xid(&key, event.timestamp, *source) {
                    *inner.xids.entry(key.clone()).or_insert(0) += 1;
                    inner
                        .recent_xids
                        .push_back((key.0, key.1, event.timestamp, *source));
                    if inner.recent_xids.len() > 256 {
                        inner.recent_xids.pop_front();
                    }
                } else {
                    // Already counted from the other source: keep the richer
                    // kmsg record (pid, process, text) in place of NVML's.
                    tracing::debug!(pci_bus_id = %key.0, xid = key.1, "xid seen by both nvml and kmsg, counted once");
                    if *source == XidSource::Kmsg {
                        let t = event.timestamp;
                        if let Some(slot) = inner.events.iter_mut().rev().find(|e| {
                            matches!(&e.kind, EventKind::Xid { pci_bus_id: b, xid: x, source: XidSource::Nvml, .. }
                                if *b == key.0 && *x == key.1)
                                && (e.timestamp - t).abs() <= XID_DEDUPE_WINDOW_SECS
                        }) {
                            *slot = event;
                        }
                    }
                    return;
                }
            }
            _ => {}
        }
        if inner.events.len() >= EVENT_CAPACITY {
            inner.events.pop_front();
        }
        inner.events.push_back(event);
    }

    /// Events at or after `since` (Unix seconds), oldest first.
    pub fn since(&self, since: f64) -> Vec<KernelEvent> {
        self.lock()
            .events
            .iter()
            .filter(|e| e.timestamp >= since)
            .cloned()
            .collect()
    }

    /// Counted block I/O errors per device from the kernel log.
    pub fn io_errors(&self) -> BTreeMap<String, u64> {
        self.lock().io_errors.clone()
    }

    /// Counted XIDs per (PCI bus id, code), NVML and kmsg deduplicated.
    pub fn xids(&self) -> BTreeMap<(String, u32), u64> {
        self.lock().xids.clone()
    }

    /// Time of the latest OOM kill seen in the kernel log.
    pub fn oom_last_timestamp(&self) -> Option<f64> {
        self.lock().oom_last
    }

    /// Kernel-log records read (counted ones).
    pub fn records_read(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Whether the kernel log could be opened (`None` before the first try).
    pub fn readable(&self) -> Option<bool> {
        match self.readable.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Parses one raw record (`prio,seq,usec,flags;message` plus continuation
    /// lines) and records the event it describes, if any.
    pub fn ingest_record(&self, record: &str, boot_time: f64, counted: bool) {
        let Some(rec) = parse_record(record) else {
            return;
        };
        if counted {
            self.records.fetch_add(1, Ordering::Relaxed);
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

impl Inner {
    /// The kernel reports one OOM kill in two lines (`oom-kill:` with the
    /// cgroup, `Killed process` with the usage): when `event` is the second
    /// line of a kill already recorded (same pid, within a few seconds), fill
    /// in what the first lacked and report the event as merged.
    fn merge_oom_kill(&mut self, event: &KernelEvent) -> bool {
        let EventKind::OomKill {
            pid: Some(pid),
            process,
            cgroup,
        } = &event.kind
        else {
            return false;
        };
        let found = self.events.iter_mut().rev().take(16).find(|e| {
            matches!(&e.kind, EventKind::OomKill { pid: Some(p), .. } if p == pid)
                && (e.timestamp - event.timestamp).abs() <= OOM_MERGE_WINDOW_SECS
        });
        let Some(old) = found else {
            return false;
        };
        if let EventKind::OomKill {
            process: old_process,
            cgroup: old_cgroup,
            ..
        } = &mut old.kind
        {
            if old_process.is_none() {
                old_process.clone_from(process);
            }
            if old_cgroup.is_none() {
                old_cgroup.clone_from(cgroup);
            }
        }
        // The "Killed process" line names the kill best.
        if event.message.contains("Killed process") {
            old.message.clone_from(&event.message);
        }
        old.counted |= event.counted;
        true
    }

    fn take_matching_xid(&mut self, key: &(String, u32), t: f64, source: XidSource) -> bool {
        let now_cut = t - 60.0;
        self.recent_xids.retain(|r| r.2 >= now_cut);
        let pos = self.recent_xids.iter().position(|(bus, xid, when, src)| {
            *src != source
                && bus == &key.0
                && *xid == key.1
                && (when - t).abs() <= XID_DEDUPE_WINDOW_SECS
        });
        match pos {
            Some(i) => {
                self.recent_xids.remove(i);
                true
            }
            None => false,
        }
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

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Reads the kernel log once, synchronously: every record of a regular file
/// (counted), or the records in the ring buffer (kept, not counted).
/// Used by `gpuops collect --once`.
pub fn read_once(roots: &HostRoots, events: &KernelEvents) {
    let boot = boot_time(roots);
    match open(&roots.kmsg) {
        Ok(Source::File(mut f)) => {
            events.readable.store(1, Ordering::Relaxed);
            let mut text = String::new();
            if let Err(e) = f.read_to_string(&mut text) {
                tracing::warn!(path = %roots.kmsg.display(), error = %e, "cannot read kernel log");
            }
            for r in split_records(&text) {
                events.ingest_record(&r, boot, true);
            }
        }
        Ok(Source::Device(mut f)) => {
            events.readable.store(1, Ordering::Relaxed);
            drain_device(&mut f, events, boot, false);
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
    events.readable.store(2, Ordering::Relaxed);
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
            events.readable.store(1, Ordering::Relaxed);
            follow_file(f, events, boot);
        }
        Ok(Source::Device(mut f)) => {
            events.readable.store(1, Ordering::Relaxed);
            drain_device(&mut f, events, boot, false);
            loop {
                std::thread::sleep(Duration::from_millis(500));
                drain_device(&mut f, events, boot, true);
            }
        }
        Err(e) => report_unreadable(&roots.kmsg, events, &e),
    }
}

/// Reads every record available now from a non-blocking /dev/kmsg.
fn drain_device(f: &mut File, events: &KernelEvents, boot: f64, counted: bool) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                events.ingest_record(&rec, boot, counted);
            }
            // Records were overwritten before we read them: go on from the next.
            Err(e) if e.raw_os_error() == Some(32) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "kernel log read failed");
                std::thread::sleep(Duration::from_secs(5));
                return;
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
