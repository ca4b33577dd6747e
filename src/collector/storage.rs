//! The storage collector: filesystem size, inodes, read-only and stuck state
//! per real mount (mountinfo + statvfs), per block device I/O counters
//! (/proc/diskstats), I/O pressure stall (/proc/pressure/io) and device errors
//! (SCSI `ioerr_cnt`, kernel-log "I/O error, dev X" lines); plus the parser of
//! those kernel-log lines for the kernel-log watcher.
//!
//! `statvfs` can block forever on a dead network mount, so the calls run
//! through a [`SingleFlight`] keyed by mount point with
//! `storage.statvfs_deadline`: all mounts of a scrape as one batch, one thread
//! hand-off and one deadline ([`SingleFlight::start_batch`]). A stuck mount is
//! reported as `storage_mount_stuck 1` (its size series left out), holds at
//! most one thread however many scrapes come, never delays the scrape past
//! the deadline, and never keeps the mounts after it in the batch from being
//! read. Reads only through [`crate::host`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use regex::Regex;

use crate::collector::cpu::export_psi;
use crate::collector::{Collector, Context, Error, Sink};
use crate::config::agent::StorageConfig;
use crate::deadline::{Batch, Outcome, SingleFlight};
use crate::events::EventKind;
use crate::host::{
    parse_proc_text, unescape_mount_path, FsStats, HostRoots, MountWatch, ReadError,
};

const NAME: &str = "storage";

/// How a mount point's filesystem statistics are read; tests inject their own.
pub type StatvfsFn = Arc<dyn Fn(&HostRoots, &str) -> Result<FsStats, ReadError> + Send + Sync>;

pub struct StorageCollector {
    statvfs: StatvfsFn,
    flight: SingleFlight<String, Statvfs>,
    /// When mountinfo was last read, its text and the mounts selected from
    /// it: mounts rarely change, so mountinfo (the largest file a scrape
    /// reads on a node with many mounts) is read again only when the kernel
    /// says the mount table changed ([`MountWatch`]) or every
    /// [`MOUNTS_TTL`], and parsed again only when its text changed.
    mounts: Mutex<Option<MountTable>>,
    /// The block devices that may have SCSI error counters, listed again
    /// every [`MOUNTS_TTL`].
    scsi_disks: Mutex<Option<(Instant, Arc<Vec<String>>)>>,
    /// The statvfs batch `prepare` began for the next `collect` (a scrape
    /// running at the same time may take it: its calls are the same; a
    /// batch is never dropped unwaited, which would leave the calls queued
    /// behind a stuck one in flight).
    begun: Mutex<Option<Begun>>,
}

/// How long the mount table and the list of block devices are trusted. A
/// mount added or removed on procfs is seen at the next scrape all the same
/// (the kernel flags the watched mountinfo), and a mount that turns
/// read-only too (statvfs says so).
pub const MOUNTS_TTL: Duration = Duration::from_secs(30);

/// What one bounded statvfs came to (cloneable, unlike [`ReadError`]).
#[derive(Debug, Clone)]
enum Statvfs {
    Stats(FsStats),
    /// Not there under rootfs, or not ours to see: debug log, size left out.
    Skipped(String),
    Failed(String),
}

impl StorageCollector {
    pub fn new(_ctx: &Arc<Context>) -> StorageCollector {
        StorageCollector::with_statvfs(Arc::new(|roots: &HostRoots, mount_point: &str| {
            roots.statvfs(mount_point)
        }))
    }

    /// A collector that reads filesystem statistics with `statvfs` (tests pin
    /// values and simulate hung mounts with it).
    pub fn with_statvfs(statvfs: StatvfsFn) -> StorageCollector {
        StorageCollector {
            statvfs,
            flight: SingleFlight::new("gpuops-statvfs"),
            mounts: Mutex::new(None),
            scsi_disks: Mutex::new(None),
            begun: Mutex::new(None),
        }
    }

    /// statvfs calls in flight, stuck ones included.
    pub fn statvfs_in_flight(&self) -> usize {
        self.flight.in_flight()
    }
}

impl Collector for StorageCollector {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Runs on the scrape's thread: its only blocking call, `statvfs`, runs
    /// on a thread of its own with `statvfs_deadline` (shorter than the
    /// collector deadline); the rest reads /proc text.
    fn may_block(&self) -> bool {
        false
    }

    /// Until the mount table is read, while it has a mount whose statvfs
    /// may wait on a server or a daemon ([`statvfs_is_local`]), and when the
    /// kernel says the table changed (the new mount may be NFS).
    fn may_wait(&self) -> bool {
        let mut cache = self.mounts.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(table) = cache.as_mut() else {
            return true;
        };
        table.kernel_changed() || table.mounts.iter().any(|m| !statvfs_is_local(&m.fs_type))
    }

    /// Starts the scrape's statvfs batch, so that it runs while the
    /// collectors before this one run.
    fn prepare(&self, ctx: &Context) {
        let mut begun = self.begun.lock().unwrap_or_else(PoisonError::into_inner);
        if begun.is_some() {
            // Another scrape's, not taken yet: this scrape's collect takes it
            // or begins its own. Every batch begun is waited for.
            return;
        }
        // Read failures are recorded when `collect` asks again.
        let mut scratch = Sink::new();
        let Some(mounts) = self.selected_mounts(&mut scratch, &ctx.roots, &ctx.config.storage)
        else {
            return;
        };
        let started = Instant::now();
        let batch = self.start_statvfs(&ctx.roots, &mounts, statvfs_deadline(ctx));
        *begun = Some((started, mounts, batch));
    }

    fn collect(&self, ctx: &Context, sink: &mut Sink) -> Result<(), Error> {
        let roots = &ctx.roots;
        let deadline = statvfs_deadline(ctx);
        // The statvfs calls first (begun by `prepare` when the runner ran
        // the collectors before this one meanwhile): they run while the /proc
        // files below are read, so their results are usually there when
        // looked for.
        let begun = self
            .begun
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let statvfs = match begun {
            Some(b) => Some(b),
            None => self
                .selected_mounts(sink, roots, &ctx.config.storage)
                .map(|mounts| {
                    let started = Instant::now();
                    let batch = self.start_statvfs(roots, &mounts, deadline);
                    (started, mounts, batch)
                }),
        };
        let devices = export_diskstats(sink, roots);
        export_psi(
            sink,
            NAME,
            roots,
            "pressure/io",
            "storage_io_pressure_stall_seconds_total",
            "Time some (or all) non-idle tasks stalled waiting for I/O (/proc/pressure/io total).",
        );
        if let Some(disks) = self.scsi_disks(sink, roots) {
            export_scsi_errors(sink, roots, &disks);
        }
        export_kmsg_errors(sink, ctx, &devices);
        if let Some((started, mounts, batch)) = statvfs {
            let outcomes = batch.wait_until(started + deadline);
            export_mounts(sink, &mounts, outcomes, deadline);
        }
        Ok(())
    }
}

/// Filesystems whose statvfs the kernel answers from its own counters, on a
/// local device or in memory: it still runs with its deadline, but a scrape
/// with only these need not leave the async worker ([`Collector::may_wait`]).
/// Any other type (NFS, CIFS, Lustre, GPFS, BeeGFS, Ceph, FUSE, ZFS, overlay...)
/// may wait on a server, a daemon or a pool.
const LOCAL_STATVFS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "vfat", "msdos", "exfat", "tmpfs", "ramfs",
];

fn statvfs_is_local(fs_type: &str) -> bool {
    LOCAL_STATVFS.contains(&fs_type)
}

/// `storage.statvfs_deadline`, never past the collector deadline.
fn statvfs_deadline(ctx: &Context) -> Duration {
    ctx.config
        .storage
        .statvfs_deadline
        .min(ctx.config.collectors.deadline)
}

/// The mount table as last read: when, its text, the mounts selected from
/// it, and the watch that says when the kernel's table changed since.
struct MountTable {
    read_at: Instant,
    text: String,
    mounts: Arc<Vec<Mount>>,
    watch: Option<MountWatch>,
    /// The watch reported a change since `read_at`. Polling spends the
    /// kernel's flag, so it is kept here until mountinfo is read again:
    /// whoever polls first ([`Collector::may_wait`] or the scrape), the
    /// scrape reads the new table.
    changed: bool,
}

impl MountTable {
    /// Whether a mount was added, removed or changed since the table was
    /// read (the kernel's flag, polled until it is seen once).
    fn kernel_changed(&mut self) -> bool {
        if !self.changed {
            self.changed = self.watch.as_ref().is_some_and(MountWatch::changed);
        }
        self.changed
    }
}

/// A statvfs batch begun by [`Collector::prepare`]: when, for which mounts.
type Begun = (Instant, Arc<Vec<Mount>>, Batch<Statvfs>);

/// One mount from mountinfo, with the escapes in its path undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: String,
    pub device: String,
    pub fs_type: String,
    /// `major:minor` of the filesystem.
    pub majmin: String,
    /// The directory of the filesystem mounted here (not `/` for bind mounts).
    pub root: String,
    pub readonly: bool,
}

/// Keeps real mounts: skips excluded filesystem types and mount points, the
/// lower of two mounts on one mount point, and bind mounts that show the
/// same directory of the same filesystem again (the shortest mount point is
/// kept). Order: by mount point.
pub fn select_mounts(mounts: Vec<Mount>, cfg: &StorageConfig) -> Vec<Mount> {
    // A later mount on the same mount point hides the earlier one.
    let mut by_point: BTreeMap<String, Mount> = BTreeMap::new();
    for m in mounts {
        if cfg.fs_type_exclude.iter().any(|t| t == &m.fs_type) {
            by_point.remove(&m.mount_point);
            continue;
        }
        by_point.insert(m.mount_point.clone(), m);
    }
    let mut seen: HashMap<(String, String), String> = HashMap::new();
    let mut keep: Vec<Mount> = Vec::new();
    for m in by_point.into_values() {
        if cfg.mount_exclude.is_match(&m.mount_point)
            || cfg
                .mount_include
                .as_ref()
                .is_some_and(|r| !r.is_match(&m.mount_point))
        {
            continue;
        }
        let key = (m.majmin.clone(), m.root.clone());
        match seen.get(&key) {
            Some(first) if shorter(first, &m.mount_point) => continue,
            Some(first) => {
                let first = first.clone();
                keep.retain(|k| k.mount_point != first);
            }
            None => {}
        }
        seen.insert(key, m.mount_point.clone());
        keep.push(m);
    }
    keep.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    keep
}

fn shorter(a: &str, b: &str) -> bool {
    (a.len(), a) <= (b.len(), b)
}

/// The mountinfo text of the host's mount namespace (pid 1) when we can see
/// it, else our own, with the path it came from.
fn read_mountinfo(sink: &mut Sink, roots: &HostRoots) -> Option<(PathBuf, String)> {
    let host = roots.proc_path("1/mountinfo");
    match roots.read_text(&host) {
        Ok(text) => Some((host, text)),
        Err(e) => {
            tracing::debug!(collector = NAME, error = %e, "using self/mountinfo");
            let own = roots.proc_path("self/mountinfo");
            let text = sink.read(NAME, roots.read_text(&own))?;
            Some((own, text))
        }
    }
}

/// Mounts from mountinfo text, with the escapes in paths undone.
fn parse_mounts(path: &Path, text: &str) -> Result<Vec<Mount>, ReadError> {
    let infos: procfs::process::MountInfos = parse_proc_text(path, text)?;
    Ok(infos
        .0
        .into_iter()
        .map(|m| {
            let readonly = m.mount_options.contains_key("ro") || m.super_options.contains_key("ro");
            Mount {
                mount_point: unescape_mount_path(&m.mount_point.to_string_lossy()),
                device: m
                    .mount_source
                    .as_deref()
                    .map_or_else(|| "none".to_string(), unescape_mount_path),
                fs_type: m.fs_type,
                majmin: m.majmin,
                root: unescape_mount_path(&m.root),
                readonly,
            }
        })
        .collect())
}

impl StorageCollector {
    /// The mounts to export: mountinfo read again every [`MOUNTS_TTL`],
    /// parsed and selected again only when it changed.
    fn selected_mounts(
        &self,
        sink: &mut Sink,
        roots: &HostRoots,
        cfg: &StorageConfig,
    ) -> Option<Arc<Vec<Mount>>> {
        let mut cache = self.mounts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(table) = cache.as_mut() {
            // A mount added or removed is seen at the next scrape: the
            // kernel flags the watched mountinfo; the timer is for trees
            // that are not procfs.
            if !table.kernel_changed() && table.read_at.elapsed() < MOUNTS_TTL {
                return Some(table.mounts.clone());
            }
        }
        // The watch of the file read (the host's mountinfo, else our own),
        // opened once; a change it reports makes the next scrape read again.
        let watch = |path: &Path| MountWatch::open(path).ok();
        let (path, text) = read_mountinfo(sink, roots)?;
        if let Some(table) = cache.as_mut() {
            if table.text == text {
                table.read_at = Instant::now();
                table.changed = false;
                if table.watch.is_none() {
                    table.watch = watch(&path);
                }
                return Some(table.mounts.clone());
            }
        }
        let watch = cache.take().and_then(|t| t.watch).or_else(|| watch(&path));
        let mounts = Arc::new(select_mounts(
            sink.read(NAME, parse_mounts(&path, &text))?,
            cfg,
        ));
        *cache = Some(MountTable {
            read_at: Instant::now(),
            text,
            mounts: mounts.clone(),
            watch,
            changed: false,
        });
        Some(mounts)
    }

    /// The block devices that may have SCSI error counters, listed again
    /// every [`MOUNTS_TTL`] (a listing that failed is tried again next time).
    fn scsi_disks(&self, sink: &mut Sink, roots: &HostRoots) -> Option<Arc<Vec<String>>> {
        let mut cache = self
            .scsi_disks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((at, disks)) = cache.as_ref() {
            if at.elapsed() < MOUNTS_TTL {
                return Some(disks.clone());
            }
        }
        let names = sink.read(NAME, roots.list_dir(&roots.sys_path("block")))?;
        let disks: Arc<Vec<String>> = Arc::new(
            names
                .into_iter()
                .filter(|n| may_have_scsi_counters(n))
                .collect(),
        );
        *cache = Some((Instant::now(), disks.clone()));
        Some(disks)
    }

    /// Starts the bounded statvfs of every mount as one batch (joining those
    /// still in flight).
    fn start_statvfs(
        &self,
        roots: &HostRoots,
        mounts: &[Mount],
        deadline: Duration,
    ) -> Batch<Statvfs> {
        let calls = mounts
            .iter()
            .map(|m| {
                let f = self.statvfs.clone();
                let r = roots.clone();
                let point = m.mount_point.clone();
                let call = move || match f(&r, &point) {
                    Ok(s) => Statvfs::Stats(s),
                    Err(e) if skippable(&e) => Statvfs::Skipped(e.to_string()),
                    Err(e) => Statvfs::Failed(e.to_string()),
                };
                (m.mount_point.clone(), call)
            })
            .collect();
        self.flight.start_batch(calls, deadline)
    }
}

/// Each mount's series, from its statvfs outcome (in mount order).
fn export_mounts(
    sink: &mut Sink,
    mounts: &[Mount],
    outcomes: Vec<Outcome<Statvfs>>,
    deadline: Duration,
) {
    for (m, outcome) in mounts.iter().zip(outcomes) {
        let labels = [
            ("mountpoint", m.mount_point.as_str()),
            ("device", m.device.as_str()),
            ("fstype", m.fs_type.as_str()),
        ];
        // mountinfo may be MOUNTS_TTL old; statvfs sees a remount (or an
        // error's read-only turn) at once.
        let readonly =
            m.readonly || matches!(&outcome, Outcome::Done(Statvfs::Stats(s)) if s.readonly);
        sink.gauge(
            "storage_readonly",
            "Whether the filesystem is mounted read-only (/proc/1/mountinfo mount options, or statvfs ST_RDONLY).",
            &labels,
            if readonly { 1.0 } else { 0.0 },
        );
        let stuck = !matches!(outcome, Outcome::Done(_));
        sink.gauge(
            "storage_mount_stuck",
            "Whether statvfs on the mount point missed its deadline (storage.statvfs_deadline_secs); a stuck mount has no size series.",
            &labels,
            if stuck { 1.0 } else { 0.0 },
        );
        match outcome {
            Outcome::Done(Statvfs::Stats(s)) => export_fs_stats(sink, &labels, &s),
            Outcome::Done(Statvfs::Skipped(e)) => {
                tracing::debug!(collector = NAME, mountpoint = %m.mount_point, error = %e, "statvfs not possible, size left out");
            }
            Outcome::Done(Statvfs::Failed(e)) => sink.fail(NAME, e),
            Outcome::TimedOut => {
                tracing::warn!(collector = NAME, mountpoint = %m.mount_point, deadline = ?deadline, "statvfs missed its deadline, mount reported stuck");
            }
            Outcome::StillRunning { since } => {
                tracing::warn!(collector = NAME, mountpoint = %m.mount_point, stuck_for = ?since, "statvfs still stuck from an earlier scrape");
            }
        }
    }
}

fn skippable(e: &ReadError) -> bool {
    match e {
        ReadError::Missing(_) => true,
        ReadError::Io { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
        ReadError::Parse { .. } => false,
    }
}

fn export_fs_stats(sink: &mut Sink, labels: &[(&str, &str)], s: &FsStats) {
    sink.gauge(
        "storage_total_bytes",
        "Filesystem size (statvfs f_blocks * f_frsize).",
        labels,
        s.total_bytes as f64,
    );
    sink.gauge(
        "storage_used_bytes",
        "Filesystem space in use (statvfs (f_blocks - f_bfree) * f_frsize).",
        labels,
        s.total_bytes.saturating_sub(s.free_bytes) as f64,
    );
    sink.gauge(
        "storage_available_bytes",
        "Filesystem space available to unprivileged users (statvfs f_bavail * f_frsize).",
        labels,
        s.available_bytes as f64,
    );
    // Not `storage_inodes_total`: promtool reserves _total for counters.
    sink.gauge(
        "storage_inodes",
        "Filesystem inodes (statvfs f_files).",
        labels,
        s.files as f64,
    );
    sink.gauge(
        "storage_inodes_free",
        "Free filesystem inodes (statvfs f_ffree).",
        labels,
        s.files_free as f64,
    );
}

/// Whole block devices worth exporting: not partitions, RAM or loop devices.
pub fn is_exported_block_device(name: &str) -> bool {
    static SKIP: OnceLock<Option<Regex>> = OnceLock::new();
    SKIP.get_or_init(|| {
        Regex::new(r"^(z?ram|loop|fd|(h|s|v|xv)d[a-z]+|nvme\d+n\d+p|mmcblk\d+p)\d+$").ok()
    })
    .as_ref()
    .is_none_or(|r| !r.is_match(name))
}

/// Per device counters from /proc/diskstats; returns the devices exported.
fn export_diskstats(sink: &mut Sink, roots: &HostRoots) -> BTreeSet<String> {
    let mut devices = BTreeSet::new();
    let path = roots.proc_path("diskstats");
    let Some(text) = sink.read(NAME, roots.read_kept(&path)) else {
        return devices;
    };
    let Some(stats) = sink.read(NAME, parse_diskstats(&path, &text)) else {
        return devices;
    };
    const SECTOR: f64 = 512.0;
    for d in stats.iter().filter(|d| is_exported_block_device(d.name)) {
        let l = [("device", d.name)];
        sink.counter(
            "storage_reads_total",
            "Reads completed (/proc/diskstats field 4).",
            &l,
            d.reads as f64,
        );
        sink.counter(
            "storage_writes_total",
            "Writes completed (/proc/diskstats field 8).",
            &l,
            d.writes as f64,
        );
        sink.counter(
            "storage_read_bytes_total",
            "Bytes read (/proc/diskstats sectors read * 512).",
            &l,
            d.sectors_read as f64 * SECTOR,
        );
        sink.counter(
            "storage_written_bytes_total",
            "Bytes written (/proc/diskstats sectors written * 512).",
            &l,
            d.sectors_written as f64 * SECTOR,
        );
        sink.counter(
            "storage_io_time_seconds_total",
            "Time the device had I/O in flight (/proc/diskstats field 13).",
            &l,
            d.time_in_progress as f64 / 1e3,
        );
        sink.counter(
            "storage_io_weighted_time_seconds_total",
            "I/O time weighted by the number of I/Os in flight (/proc/diskstats field 14).",
            &l,
            d.weighted_time_in_progress as f64 / 1e3,
        );
        sink.gauge(
            "storage_io_in_progress",
            "I/Os in flight (/proc/diskstats field 12).",
            &l,
            d.in_progress as f64,
        );
        devices.insert(d.name.to_string());
    }
    devices
}

/// The fields of a /proc/diskstats line the collector exports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DiskStat<'a> {
    name: &'a str,
    reads: u64,
    sectors_read: u64,
    writes: u64,
    sectors_written: u64,
    in_progress: u64,
    time_in_progress: u64,
    weighted_time_in_progress: u64,
}

/// Every line of /proc/diskstats: major, minor, name and at least eleven
/// counters, each an unsigned integer (as `procfs::DiskStats` wants them,
/// without its `String` per device and map of every field).
fn parse_diskstats<'a>(path: &Path, text: &'a str) -> Result<Vec<DiskStat<'a>>, ReadError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        if f.len() < 14 {
            return Err(ReadError::parse(
                path,
                format!("line {}: {} fields, expected at least 14", n + 1, f.len()),
            ));
        }
        let mut v = [0u64; 14];
        for (i, slot) in v.iter_mut().enumerate().filter(|(i, _)| *i != 2) {
            *slot = f[i].parse().map_err(|_| {
                ReadError::parse(
                    path,
                    format!(
                        "line {}: field {}: expected an unsigned integer, found {:?}",
                        n + 1,
                        i + 1,
                        f[i]
                    ),
                )
            })?;
        }
        out.push(DiskStat {
            name: f[2],
            reads: v[3],
            sectors_read: v[5],
            writes: v[7],
            sectors_written: v[9],
            in_progress: v[11],
            time_in_progress: v[12],
            weighted_time_in_progress: v[13],
        });
    }
    Ok(out)
}

/// `storage_errors_total{source="scsi"}` from `<sysfs>/block/*/device/ioerr_cnt`
/// (hexadecimal) of `disks`.
fn export_scsi_errors(sink: &mut Sink, roots: &HostRoots, disks: &[String]) {
    let dir = roots.sys_path("block");
    // Only SCSI disks (sd*, sr*, st*) have ioerr_cnt; asking each loop, RAM,
    // device-mapper or NVMe device costs a sysfs lookup (~6 us) for nothing.
    for name in disks {
        let path = dir.join(name).join("device/ioerr_cnt");
        if let Some(v) = sink.read(NAME, roots.read_u64(&path)) {
            sink.counter(
                "storage_errors_total",
                STORAGE_ERRORS_HELP,
                &[("device", name), ("source", "scsi")],
                v as f64,
            );
        }
    }
}

fn may_have_scsi_counters(name: &str) -> bool {
    is_exported_block_device(name)
        && ![
            "dm-", "md", "nbd", "nvme", "vd", "xvd", "zram", "rbd", "drbd", "pmem",
        ]
        .iter()
        .any(|p| name.starts_with(p))
}

const STORAGE_ERRORS_HELP: &str = "Device I/O errors: source=\"scsi\" from /sys/block/*/device/ioerr_cnt, source=\"kmsg\" from kernel-log \"I/O error, dev X\" lines since the agent started.";

/// `storage_errors_total{source="kmsg"}`: errors the kernel-log watcher
/// counted since the agent started; 0 for every exported device while the log
/// is readable (a true count), nothing when it is not.
fn export_kmsg_errors(sink: &mut Sink, ctx: &Context, devices: &BTreeSet<String>) {
    if ctx.events.readable() != Some(true) {
        return;
    }
    let mut counts: BTreeMap<String, u64> = devices.iter().map(|d| (d.clone(), 0)).collect();
    counts.extend(ctx.events.io_errors());
    for (device, n) in counts {
        sink.counter(
            "storage_errors_total",
            STORAGE_ERRORS_HELP,
            &[("device", &device), ("source", "kmsg")],
            n as f64,
        );
    }
}

/// Recognises a block-layer request error:
/// `blk_update_request: I/O error, dev sda, sector 2048 op 0x0:(READ) ...`,
/// `I/O error, dev nvme0n1, sector 1234 op 0x1:(WRITE) ...` and the other
/// kinds the block layer prints the same way (`critical medium error, dev sdb, ...`).
/// "Buffer I/O error on dev sda1" lines are not counted: they repeat the
/// block-layer error once per buffer.
pub fn parse_kmsg(message: &str) -> Option<EventKind> {
    let at = message.find(" error, dev ")? + " error, dev ".len();
    let device: String = message[at..]
        .chars()
        .take_while(|c| !matches!(c, ',' | ' '))
        .collect();
    let valid = !device.is_empty()
        && device
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '!'));
    valid.then_some(EventKind::IoError { device })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::testutil::{context, scrape};
    use expect_test::{expect, Expect};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    /// A statvfs with pinned values: `/mnt/nfs` hangs until `release` is set.
    struct FakeStatvfs {
        release: Arc<AtomicBool>,
        nfs_calls: Arc<AtomicUsize>,
        /// The mount point that hangs until `release` (`/mnt/nfs` by default).
        hung: &'static str,
        /// The mount point and thread of every call.
        calls: Arc<Mutex<Vec<(String, std::thread::ThreadId)>>>,
    }

    impl FakeStatvfs {
        fn new() -> FakeStatvfs {
            FakeStatvfs::hanging("/mnt/nfs")
        }

        fn hanging(hung: &'static str) -> FakeStatvfs {
            FakeStatvfs {
                release: Arc::new(AtomicBool::new(false)),
                nfs_calls: Arc::new(AtomicUsize::new(0)),
                hung,
                calls: Arc::new(Mutex::new(Vec::new())),
            }
        }

        fn func(&self) -> StatvfsFn {
            let release = self.release.clone();
            let calls = self.nfs_calls.clone();
            let hung = self.hung;
            let log = self.calls.clone();
            Arc::new(move |_roots: &HostRoots, point: &str| {
                log.lock()
                    .unwrap()
                    .push((point.to_string(), std::thread::current().id()));
                let gib = 1u64 << 30;
                let stats = |total: u64, free: u64, avail: u64| FsStats {
                    total_bytes: total * gib,
                    free_bytes: free * gib,
                    available_bytes: avail * gib,
                    files: total * 1000,
                    files_free: free * 1000,
                    readonly: false,
                };
                if point == hung {
                    calls.fetch_add(1, Ordering::SeqCst);
                    while !release.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                match point {
                    "/" => Ok(stats(100, 40, 35)),
                    "/boot/efi" => Ok(stats(1, 1, 1)),
                    "/data" => Ok(stats(4000, 1000, 1000)),
                    "/home" => Ok(stats(100, 40, 35)),
                    "/mnt/my archive" => Err(ReadError::Io {
                        path: "/mnt/my archive".into(),
                        source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                    }),
                    "/mnt/nfs" => Ok(stats(10, 5, 5)),
                    other => Err(ReadError::Missing(other.into())),
                }
            })
        }
    }

    impl Drop for FakeStatvfs {
        fn drop(&mut self) {
            self.release.store(true, Ordering::SeqCst);
        }
    }

    fn check(scenario: &str, expect: Expect) {
        let fake = FakeStatvfs::new();
        let ctx = context(scenario, |c| {
            c.storage.statvfs_deadline = Duration::from_millis(100);
        });
        let c = StorageCollector::with_statvfs(fake.func());
        expect.assert_eq(&scrape(&c, &ctx));
    }

    #[test]
    fn full_fixture() {
        check(
            "full",
            expect![[r#"
                storage_available_bytes{mountpoint="/",device="/dev/nvme0n1p2",fstype="ext4"} 37580963840
                storage_available_bytes{mountpoint="/boot/efi",device="/dev/nvme0n1p1",fstype="vfat"} 1073741824
                storage_available_bytes{mountpoint="/data",device="/dev/md0",fstype="xfs"} 1073741824000
                storage_available_bytes{mountpoint="/home",device="/dev/nvme0n1p2",fstype="ext4"} 37580963840
                storage_errors_total{device="sda",source="scsi"} 31
                storage_errors_total{device="dm-0",source="kmsg"} 0
                storage_errors_total{device="md0",source="kmsg"} 0
                storage_errors_total{device="nvme0n1",source="kmsg"} 1
                storage_errors_total{device="sda",source="kmsg"} 2
                storage_inodes{mountpoint="/",device="/dev/nvme0n1p2",fstype="ext4"} 100000
                storage_inodes{mountpoint="/boot/efi",device="/dev/nvme0n1p1",fstype="vfat"} 1000
                storage_inodes{mountpoint="/data",device="/dev/md0",fstype="xfs"} 4000000
                storage_inodes{mountpoint="/home",device="/dev/nvme0n1p2",fstype="ext4"} 100000
                storage_inodes_free{mountpoint="/",device="/dev/nvme0n1p2",fstype="ext4"} 40000
                storage_inodes_free{mountpoint="/boot/efi",device="/dev/nvme0n1p1",fstype="vfat"} 1000
                storage_inodes_free{mountpoint="/data",device="/dev/md0",fstype="xfs"} 1000000
                storage_inodes_free{mountpoint="/home",device="/dev/nvme0n1p2",fstype="ext4"} 40000
                storage_io_in_progress{device="nvme0n1"} 2
                storage_io_in_progress{device="sda"} 0
                storage_io_in_progress{device="md0"} 1
                storage_io_in_progress{device="dm-0"} 0
                storage_io_pressure_stall_seconds_total{kind="some"} 10.321193
                storage_io_pressure_stall_seconds_total{kind="full"} 7.393002
                storage_io_time_seconds_total{device="nvme0n1"} 3
                storage_io_time_seconds_total{device="sda"} 0.4
                storage_io_time_seconds_total{device="md0"} 0
                storage_io_time_seconds_total{device="dm-0"} 0.045
                storage_io_weighted_time_seconds_total{device="nvme0n1"} 4
                storage_io_weighted_time_seconds_total{device="sda"} 0.3
                storage_io_weighted_time_seconds_total{device="md0"} 0
                storage_io_weighted_time_seconds_total{device="dm-0"} 0.05
                storage_mount_stuck{mountpoint="/",device="/dev/nvme0n1p2",fstype="ext4"} 0
                storage_mount_stuck{mountpoint="/boot/efi",device="/dev/nvme0n1p1",fstype="vfat"} 0
                storage_mount_stuck{mountpoint="/data",device="/dev/md0",fstype="xfs"} 0
                storage_mount_stuck{mountpoint="/home",device="/dev/nvme0n1p2",fstype="ext4"} 0
                storage_mount_stuck{mountpoint="/mnt/my archive",device="/dev/mapper/archive",fstype="ext4"} 0
                storage_mount_stuck{mountpoint="/mnt/nfs",device="fileserver:/export",fstype="nfs4"} 1
                storage_read_bytes_total{device="nvme0n1"} 104857600
                storage_read_bytes_total{device="sda"} 52428800
                storage_read_bytes_total{device="md0"} 716800
                storage_read_bytes_total{device="dm-0"} 614400
                storage_readonly{mountpoint="/",device="/dev/nvme0n1p2",fstype="ext4"} 0
                storage_readonly{mountpoint="/boot/efi",device="/dev/nvme0n1p1",fstype="vfat"} 0
                storage_readonly{mountpoint="/data",device="/dev/md0",fstype="xfs"} 0
                storage_readonly{mountpoint="/home",device="/dev/nvme0n1p2",fstype="ext4"} 0
                storage_readonly{mountpoint="/mnt/my archive",device="/dev/mapper/archive",fstype="ext4"} 1
                storage_readonly{mountpoint="/mnt/nfs",device="fileserver:/export",fstype="nfs4"} 0
                storage_reads_total{device="nvme0n1"} 1000
                storage_reads_total{device="sda"} 500
                storage_reads_total{device="md0"} 70
                storage_reads_total{device="dm-0"} 60
                storage_total_bytes{mountpoint="/",device="/dev/nvme0n1p2",fstype="ext4"} 107374182400
                storage_total_bytes{mountpoint="/boot/efi",device="/dev/nvme0n1p1",fstype="vfat"} 1073741824
                storage_total_bytes{mountpoint="/data",device="/dev/md0",fstype="xfs"} 4294967296000
                storage_total_bytes{mountpoint="/home",device="/dev/nvme0n1p2",fstype="ext4"} 107374182400
                storage_used_bytes{mountpoint="/",device="/dev/nvme0n1p2",fstype="ext4"} 64424509440
                storage_used_bytes{mountpoint="/boot/efi",device="/dev/nvme0n1p1",fstype="vfat"} 0
                storage_used_bytes{mountpoint="/data",device="/dev/md0",fstype="xfs"} 3221225472000
                storage_used_bytes{mountpoint="/home",device="/dev/nvme0n1p2",fstype="ext4"} 64424509440
                storage_writes_total{device="nvme0n1"} 2000
                storage_writes_total{device="sda"} 100
                storage_writes_total{device="md0"} 30
                storage_writes_total{device="dm-0"} 20
                storage_written_bytes_total{device="nvme0n1"} 209715200
                storage_written_bytes_total{device="sda"} 4194304
                storage_written_bytes_total{device="md0"} 307200
                storage_written_bytes_total{device="dm-0"} 204800
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
            FAILED F/malformed/proc/1/mountinfo: unexpected contents: a field is missing
            FAILED F/malformed/proc/diskstats: line 1: 6 fields, expected at least 14
            FAILED F/malformed/proc/pressure/io: no "some" line
            FAILED F/malformed/sys/block/sda/device/ioerr_cnt: expected an unsigned integer, found "0xzz"
        "#]],
        );
    }

    #[test]
    fn hung_mount_holds_one_thread_and_never_delays_the_scrape() {
        let fake = FakeStatvfs::new();
        let deadline = Duration::from_millis(100);
        let ctx = context("full", |c| c.storage.statvfs_deadline = deadline);
        let c = StorageCollector::with_statvfs(fake.func());
        for _ in 0..5 {
            let started = Instant::now();
            let out = scrape(&c, &ctx);
            let took = started.elapsed();
            assert!(
                took < deadline + Duration::from_millis(400),
                "scrape took {took:?}"
            );
            assert!(out.contains(r#"storage_mount_stuck{mountpoint="/mnt/nfs",device="fileserver:/export",fstype="nfs4"} 1"#), "{out}");
            assert!(
                out.contains(
                    r#"storage_mount_stuck{mountpoint="/data",device="/dev/md0",fstype="xfs"} 0"#
                ),
                "{out}"
            );
            assert!(
                !out.contains(r#"storage_total_bytes{mountpoint="/mnt/nfs""#),
                "{out}"
            );
        }
        assert_eq!(
            fake.nfs_calls.load(Ordering::SeqCst),
            1,
            "one thread, not one per scrape"
        );
        // The other mounts' threads free their slots just after answering.
        let until = Instant::now() + Duration::from_secs(2);
        while c.statvfs_in_flight() > 1 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            c.statvfs_in_flight(),
            1,
            "only the hung mount holds a thread"
        );
        // When the server comes back the mount is no longer stuck.
        fake.release.store(true, Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(2);
        while c.statvfs_in_flight() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = scrape(&c, &ctx);
        assert!(out.contains(r#"storage_mount_stuck{mountpoint="/mnt/nfs",device="fileserver:/export",fstype="nfs4"} 0"#), "{out}");
        assert!(out.contains(r#"storage_total_bytes{mountpoint="/mnt/nfs",device="fileserver:/export",fstype="nfs4"} 10737418240"#), "{out}");
    }

    #[test]
    fn statvfs_of_every_mount_is_one_hand_off_per_scrape() {
        let ctx = context("full", |_| {});
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = calls.clone();
        let c = StorageCollector::with_statvfs(Arc::new(move |_roots: &HostRoots, point: &str| {
            log.lock()
                .unwrap()
                .push((point.to_string(), std::thread::current().id()));
            // Slow enough that calls handed off one by one would each need a thread.
            std::thread::sleep(Duration::from_millis(2));
            Ok(FsStats {
                total_bytes: 100,
                free_bytes: 50,
                available_bytes: 50,
                files: 10,
                files_free: 5,
                readonly: false,
            })
        }));
        let out = scrape(&c, &ctx);
        assert!(
            !out.lines()
                .any(|l| l.starts_with("storage_mount_stuck") && l.ends_with(" 1")),
            "{out}"
        );
        let calls = calls.lock().unwrap().clone();
        let points: Vec<&str> = calls.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            points,
            [
                "/",
                "/boot/efi",
                "/data",
                "/home",
                "/mnt/my archive",
                "/mnt/nfs"
            ]
        );
        let threads: std::collections::HashSet<_> = calls.iter().map(|(_, t)| *t).collect();
        assert_eq!(threads.len(), 1, "one thread for the batch: {calls:?}");
        assert!(!threads.contains(&std::thread::current().id()));
    }

    #[test]
    fn a_hung_mount_keeps_no_other_mount_of_its_batch_from_being_read() {
        // /data is third of six: the mounts after it are read all the same.
        let fake = FakeStatvfs::hanging("/data");
        let ctx = context("full", |c| {
            c.storage.statvfs_deadline = Duration::from_millis(400);
        });
        let c = StorageCollector::with_statvfs(fake.func());
        for _ in 0..2 {
            let out = scrape(&c, &ctx);
            assert!(
                out.contains(
                    r#"storage_mount_stuck{mountpoint="/data",device="/dev/md0",fstype="xfs"} 1"#
                ),
                "{out}"
            );
            assert!(
                !out.contains(r#"storage_total_bytes{mountpoint="/data""#),
                "{out}"
            );
            for after in [
                r#"storage_total_bytes{mountpoint="/home",device="/dev/nvme0n1p2",fstype="ext4"} 107374182400"#,
                r#"storage_total_bytes{mountpoint="/mnt/nfs",device="fileserver:/export",fstype="nfs4"} 10737418240"#,
                r#"storage_mount_stuck{mountpoint="/mnt/nfs",device="fileserver:/export",fstype="nfs4"} 0"#,
            ] {
                assert!(out.contains(after), "{after} missing from {out}");
            }
        }
        assert_eq!(
            fake.nfs_calls.load(Ordering::SeqCst),
            1,
            "one call, not one per scrape"
        );
    }

    #[test]
    fn a_mount_that_turns_read_only_is_seen_before_mountinfo_is_read_again() {
        let ctx = context("full", |_| {});
        let turned = Arc::new(AtomicBool::new(false));
        let t = turned.clone();
        let c = StorageCollector::with_statvfs(Arc::new(move |_roots: &HostRoots, point: &str| {
            Ok(FsStats {
                total_bytes: 100,
                free_bytes: 50,
                available_bytes: 50,
                files: 10,
                files_free: 5,
                // The kernel turned /data read-only after an I/O error.
                readonly: point == "/data" && t.load(Ordering::SeqCst),
            })
        }));
        let data = r#"storage_readonly{mountpoint="/data",device="/dev/md0",fstype="xfs"}"#;
        assert!(scrape(&c, &ctx).contains(&format!("{data} 0")));
        turned.store(true, Ordering::SeqCst);
        let out = scrape(&c, &ctx);
        assert!(out.contains(&format!("{data} 1")), "{out}");
        // mountinfo's own "ro" still counts.
        assert!(out.contains(r#"storage_readonly{mountpoint="/mnt/my archive",device="/dev/mapper/archive",fstype="ext4"} 1"#), "{out}");
    }

    #[test]
    fn the_runner_begins_statvfs_before_the_collectors_ahead_of_storage_run() {
        let fake = FakeStatvfs::hanging("none");
        let ctx = context("full", |_| {});
        let c = StorageCollector::with_statvfs(fake.func());
        c.prepare(&ctx);
        // A second prepare (another scrape) leaves the first batch to be taken.
        c.prepare(&ctx);
        let until = Instant::now() + Duration::from_secs(2);
        while fake.calls.lock().unwrap().len() < 6 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(fake.calls.lock().unwrap().len(), 6, "begun before collect");
        let out = scrape(&c, &ctx);
        assert!(out.contains(r#"storage_total_bytes{mountpoint="/data",device="/dev/md0",fstype="xfs"} 4294967296000"#), "{out}");
        assert_eq!(
            fake.calls.lock().unwrap().len(),
            6,
            "collect took the batch begun"
        );
        scrape(&c, &ctx);
        assert_eq!(
            fake.calls.lock().unwrap().len(),
            12,
            "without prepare, collect begins its own"
        );
    }

    #[test]
    fn real_statvfs_reads_the_fixture_root() {
        let ctx = context("full", |_| {});
        let c = StorageCollector::new(&ctx);
        let out = scrape(&c, &ctx);
        assert!(
            out.contains(
                r#"storage_mount_stuck{mountpoint="/",device="/dev/nvme0n1p2",fstype="ext4"} 0"#
            ),
            "{out}"
        );
        assert!(
            out.contains(r#"storage_total_bytes{mountpoint="/mnt/my archive""#),
            "{out}"
        );
        assert!(!out.contains("FAILED"), "{out}");
    }

    fn check_kmsg(message: &str, expect: Option<&str>) {
        let want = expect.map(|d| EventKind::IoError {
            device: d.to_string(),
        });
        assert_eq!(parse_kmsg(message), want, "{message}");
    }

    #[test]
    fn parses_io_error_messages() {
        check_kmsg("blk_update_request: I/O error, dev sda, sector 2048 op 0x0:(READ) flags 0x80700 phys_seg 1 prio class 0", Some("sda"));
        check_kmsg("I/O error, dev nvme0n1, sector 1234 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 2", Some("nvme0n1"));
        check_kmsg("critical medium error, dev sdb, sector 99 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0", Some("sdb"));
        check_kmsg("end_request: I/O error, dev sdc, sector 12", Some("sdc"));
        check_kmsg(
            "Buffer I/O error on dev sda1, logical block 0, async page read",
            None,
        );
        check_kmsg("EXT4-fs error (device sda1): ext4_find_entry:1455: inode #2: comm ls: reading directory lblock 0", None);
        check_kmsg("I/O error, dev , sector 1", None);
        check_kmsg("Out of memory: Killed process 1 (x) total-vm:1kB", None);
    }

    #[test]
    fn mountinfo_is_read_once_a_while_and_parsed_again_only_when_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let proc_dir = dir.path().join("proc/1");
        std::fs::create_dir_all(&proc_dir).unwrap();
        let line = |id: u32, point: &str| {
            format!("{id} 1 8:{id} / {point} rw,relatime - ext4 /dev/sd{id} rw\n")
        };
        std::fs::write(proc_dir.join("mountinfo"), line(1, "/")).unwrap();
        let roots = HostRoots {
            procfs: dir.path().join("proc"),
            ..HostRoots::default()
        };
        let cfg = crate::config::AgentConfig::default().storage;
        let c = StorageCollector::with_statvfs(FakeStatvfs::new().func());
        let points = |c: &StorageCollector| {
            let mut sink = Sink::new();
            let m = c.selected_mounts(&mut sink, &roots, &cfg).unwrap();
            m.iter().map(|m| m.mount_point.clone()).collect::<Vec<_>>()
        };
        assert_eq!(points(&c), ["/"]);
        assert_eq!(points(&c), ["/"]);
        std::fs::write(
            proc_dir.join("mountinfo"),
            line(1, "/") + &line(2, "/scratch"),
        )
        .unwrap();
        assert_eq!(points(&c), ["/"], "read again after MOUNTS_TTL");
        let expire = |c: &StorageCollector| {
            let mut cache = c.mounts.lock().unwrap();
            cache.as_mut().unwrap().read_at = Instant::now().checked_sub(MOUNTS_TTL).unwrap();
        };
        expire(&c);
        assert_eq!(points(&c), ["/", "/scratch"]);
        // Unchanged text: the selected mounts are kept, not parsed again.
        let before = c.mounts.lock().unwrap().as_ref().unwrap().mounts.clone();
        expire(&c);
        assert_eq!(points(&c), ["/", "/scratch"]);
        let after = c.mounts.lock().unwrap().as_ref().unwrap().mounts.clone();
        assert!(Arc::ptr_eq(&before, &after));
    }

    #[test]
    fn a_scrape_leaves_the_async_worker_while_a_mount_may_wait_on_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let proc_dir = dir.path().join("proc/1");
        std::fs::create_dir_all(&proc_dir).unwrap();
        let roots = HostRoots {
            procfs: dir.path().join("proc"),
            ..HostRoots::default()
        };
        let cfg = crate::config::AgentConfig::default().storage;
        let c = StorageCollector::with_statvfs(FakeStatvfs::new().func());
        assert!(c.may_wait(), "before the mount table is read");
        let local = "1 0 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n\
                     2 1 0:30 / /tmp rw - tmpfs tmpfs rw\n\
                     3 1 8:2 / /data rw - xfs /dev/sdb1 rw\n";
        let reread = |text: String| {
            std::fs::write(proc_dir.join("mountinfo"), text).unwrap();
            *c.mounts.lock().unwrap() = None;
            c.selected_mounts(&mut Sink::new(), &roots, &cfg).unwrap();
        };
        reread(local.to_string());
        assert!(!c.may_wait(), "ext4, tmpfs and xfs only");
        for remote in [
            "4 1 0:52 / /mnt/nfs rw - nfs4 server:/export rw",
            "4 1 0:53 / /lustre rw - lustre 10.0.0.1@o2ib:/fs rw",
            "4 1 0:54 / /mnt/bucket rw - fuse.s3fs s3fs rw",
        ] {
            reread(format!("{local}{remote}\n"));
            assert!(c.may_wait(), "{remote}");
        }
    }

    #[test]
    fn scsi_counters_are_looked_for_on_scsi_disks_only() {
        assert!(may_have_scsi_counters("sda"));
        assert!(may_have_scsi_counters("sr0"));
        for d in ["loop0", "nvme0n1", "vda", "dm-0", "md127", "zram0", "sda1"] {
            assert!(!may_have_scsi_counters(d), "{d}");
        }
    }

    #[test]
    fn diskstats_are_read_as_the_procfs_crate_reads_them() {
        for f in [
            crate::collector::testutil::fixture("full/proc/diskstats"),
            PathBuf::from("/proc/diskstats"),
        ] {
            let text = std::fs::read_to_string(&f).unwrap();
            let ours = parse_diskstats(&f, &text).unwrap();
            let theirs: procfs::DiskStats = crate::host::parse_proc_text(&f, &text).unwrap();
            let theirs: Vec<DiskStat> = theirs
                .0
                .iter()
                .map(|d| DiskStat {
                    name: d.name.as_str(),
                    reads: d.reads,
                    sectors_read: d.sectors_read,
                    writes: d.writes,
                    sectors_written: d.sectors_written,
                    in_progress: d.in_progress,
                    time_in_progress: d.time_in_progress,
                    weighted_time_in_progress: d.weighted_time_in_progress,
                })
                .collect();
            assert_eq!(ours, theirs, "{}", f.display());
        }
        let f = Path::new("/x/diskstats");
        let line = "8 0 sda 1 2 3 4 5 6 7 8 9 10 11";
        assert_eq!(
            parse_diskstats(f, line).unwrap()[0].weighted_time_in_progress,
            11
        );
        assert!(parse_diskstats(f, "8 0 sda 1 2 3 4 5 6 7 8 9 10 x").is_err());
        assert!(parse_diskstats(f, "8 0 sda 1 2 3").is_err());
    }

    #[test]
    fn block_device_filter() {
        for d in ["sda", "nvme0n1", "vda", "dm-0", "md0", "xvdb", "mmcblk0"] {
            assert!(is_exported_block_device(d), "{d}");
        }
        for d in [
            "sda1",
            "nvme0n1p2",
            "loop0",
            "ram1",
            "zram0",
            "vda3",
            "mmcblk0p1",
        ] {
            assert!(!is_exported_block_device(d), "{d}");
        }
    }

    fn mount(point: &str, fs: &str, majmin: &str, root: &str) -> Mount {
        Mount {
            mount_point: point.into(),
            device: "/dev/x".into(),
            fs_type: fs.into(),
            majmin: majmin.into(),
            root: root.into(),
            readonly: false,
        }
    }

    #[test]
    fn selects_real_mounts_once() {
        let cfg = crate::config::AgentConfig::default().storage;
        let mounts = vec![
            mount("/", "ext4", "259:2", "/"),
            mount("/proc", "proc", "0:21", "/"),
            mount("/run", "tmpfs", "0:25", "/"),
            mount("/srv/data", "xfs", "9:0", "/"),
            mount("/data", "xfs", "9:0", "/"),
            mount("/home", "ext4", "259:2", "/home"),
            mount("/var/lib/docker/overlay2/x/merged", "ext4", "259:2", "/"),
            mount("/mnt/nfs", "nfs4", "0:50", "/"),
            // Mounted over: the later mount on /mnt/nfs hides the first.
            mount("/mnt/nfs", "nfs4", "0:51", "/"),
        ];
        let got: Vec<(String, String)> = select_mounts(mounts, &cfg)
            .into_iter()
            .map(|m| (m.mount_point, m.majmin))
            .collect();
        let want: Vec<(String, String)> = [
            ("/", "259:2"),
            ("/data", "9:0"),
            ("/home", "259:2"),
            ("/mnt/nfs", "0:51"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(got, want);
    }
}
