//! The cpu collector: utilization, per-mode time, cgroup and thermal
//! throttling, machine checks, pressure stall and load.
//!
//! `cpu_utilization_percent` is the busy share between a reading of
//! `<procfs>/stat` about `cpu.utilization_window` old and the scrape's own
//! reading. A ring keeps the readings: every scrape's, and a background
//! sampler's (one thread per agent) where no scrape left one. The sampler
//! learns the scrape interval from the last scrapes and reads only when the
//! next expected scrape would otherwise lack a reading a window before it:
//! once per scrape when scrapes are further apart than the window, never
//! when they come every `window / n`. Before the scrapes are regular (at
//! start), and once they stop, it reads every `cpu.sample_interval`. So an
//! idle agent does not wake every second for a value nobody reads (about
//! 130 µs of CPU a wake-up on a 2-core VM). A reading within half a sample
//! interval of `window` old closes the window, so the window is
//! `utilization_window` ± half a `sample_interval` when scrapes are regular.
//! `gpuops collect --once` has no sampler and takes two samples 250 ms apart.
//! Everything else is read at scrape time. This collector reads only through
//! [`crate::host`] and never exports a value it could not read.

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::collector::{Collector, Context, Error, Sink};
use crate::host::{parse_psi, HostRoots, ReadError, PROC_SYSTEM_INFO};

const NAME: &str = "cpu";

/// How far apart the two samples of `collect --once` are.
pub const ONE_SHOT_SAMPLE_GAP: Duration = Duration::from_millis(250);

pub struct CpuCollector {
    /// Present when a background sampler runs (the agent); absent for `collect --once`.
    ring: Option<Arc<Ring>>,
    /// Which thermal_throttle files to read (one CPU per core and per
    /// package), found from the CPU topology and refreshed every [`PLAN_TTL`].
    thermal: Mutex<Option<(Instant, Arc<ThermalPlan>)>>,
    /// The cgroups whose CPU throttling is exported, refreshed every [`CGROUPS_TTL`].
    cgroups: Mutex<Option<(Instant, Arc<CgroupPlan>)>>,
    /// The last reading of the MCE row, reused for [`MCE_TTL`]: /proc/interrupts
    /// has a line per IRQ and a column per CPU, so it is large on big machines.
    mce: Mutex<Option<(Instant, MceReading)>>,
}

/// How long the CPU topology behind the thermal counters is trusted (hotplug).
const PLAN_TTL: Duration = Duration::from_secs(300);
/// How long one read of the MCE row of /proc/interrupts is reused.
pub const MCE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct ThermalPlan {
    core_counts: Vec<PathBuf>,
    package_counts: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
enum MceReading {
    Count(u64),
    NoRow,
    Missing,
    Failed(String),
}

impl CpuCollector {
    /// Starts the background sampler when `ctx.background` is set. The
    /// sampler thread stops when the collector is dropped.
    pub fn new(ctx: &Arc<Context>) -> CpuCollector {
        if !ctx.background {
            return CpuCollector::with(None);
        }
        let ring = Arc::new(Ring::with_interval(
            ctx.config.cpu.utilization_window,
            ctx.config.cpu.sample_interval,
        ));
        spawn_sampler(ctx.roots.clone(), Arc::downgrade(&ring));
        CpuCollector::with(Some(ring))
    }

    /// A collector whose utilization comes from `ring` (tests feed it by hand).
    pub fn with_ring(ring: Arc<Ring>) -> CpuCollector {
        CpuCollector::with(Some(ring))
    }

    fn with(ring: Option<Arc<Ring>>) -> CpuCollector {
        CpuCollector {
            ring,
            thermal: Mutex::new(None),
            cgroups: Mutex::new(None),
            mce: Mutex::new(None),
        }
    }
}

impl Collector for CpuCollector {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Reads only in-kernel /proc and /sys text: shares the scrape's procfs thread.
    fn may_block(&self) -> bool {
        false
    }

    fn collect(&self, ctx: &Context, sink: &mut Sink) -> Result<(), Error> {
        let roots = &ctx.roots;
        let stat = match &self.ring {
            Some(ring) => {
                let stat = sink.read(NAME, read_stat(roots));
                if let Some(stat) = &stat {
                    ring.push_scrape(Sample::of(stat));
                }
                if let Some(u) = ring.utilization_percent() {
                    export_utilization(sink, u);
                }
                stat
            }
            None => {
                // A missing or broken file stays so: no point waiting for a second look.
                let first = sink.read(NAME, read_stat(roots));
                first.and_then(|a| {
                    std::thread::sleep(ONE_SHOT_SAMPLE_GAP);
                    let b = sink.read(NAME, read_stat(roots))?;
                    if let Some(u) = utilization_between(&Sample::of(&a), &Sample::of(&b)) {
                        export_utilization(sink, u);
                    }
                    Some(b)
                })
            }
        };
        if let Some(stat) = stat {
            export_stat(sink, &stat);
        }
        if let Some(load) = sink.read(
            NAME,
            roots.parse_proc_kept::<procfs::LoadAverage>("loadavg"),
        ) {
            for (window, v) in [("1m", load.one), ("5m", load.five), ("15m", load.fifteen)] {
                sink.gauge(
                    "cpu_load_average",
                    "Run-queue load average over the window (/proc/loadavg).",
                    &[("window", window)],
                    // The file has two decimals; f32 would print 0.3199999928474426.
                    (f64::from(v) * 100.0).round() / 100.0,
                );
            }
        }
        export_psi(
            sink,
            NAME,
            roots,
            "pressure/cpu",
            "cpu_pressure_stall_seconds_total",
            "Time some (or all) runnable tasks waited for a CPU (/proc/pressure/cpu total).",
        );
        if let Some(plan) = self.cgroup_plan(sink, roots, &ctx.config.cpu.throttle_cgroups) {
            export_cgroup_throttling(sink, roots, &plan);
        }
        let plan = self.thermal_plan(roots);
        export_thermal_throttling(sink, roots, &plan);
        self.export_machine_checks(sink, roots);
        Ok(())
    }
}

/// Samples of node-wide busy and total CPU time, covering a window, and the
/// times of the last scrapes (to plan the background samples).
pub struct Ring {
    window: Duration,
    /// The background sampler's interval when it samples regularly; half of
    /// it is how far from `window` a reading's age may be and still close
    /// the window (a scrape `window` after another may come a few
    /// milliseconds early).
    interval: Duration,
    state: Mutex<RingState>,
}

#[derive(Default)]
struct RingState {
    samples: VecDeque<Sample>,
    scrapes: VecDeque<Instant>,
}

/// Scrapes remembered for learning the scrape interval (three gaps: an HA
/// pair of Prometheus servers shows as two alternating gaps).
const SCRAPES_KEPT: usize = 4;

/// The longest the sampler sleeps between two looks at its plan, so that a
/// change of scrape interval is noticed within a minute.
const SAMPLER_MAX_SLEEP: Duration = Duration::from_secs(60);

/// How many expected scrapes ahead the sampler plans.
const PLAN_AHEAD: u32 = 64;

/// One reading of the `cpu ` line of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at: Instant,
    pub busy: u64,
    pub total: u64,
}

impl Sample {
    fn of(stat: &ProcStat) -> Sample {
        let t = stat;
        let idle = t.idle + t.iowait.unwrap_or(0);
        let total = t.user
            + t.nice
            + t.system
            + t.idle
            + t.iowait.unwrap_or(0)
            + t.irq.unwrap_or(0)
            + t.softirq.unwrap_or(0)
            + t.steal.unwrap_or(0);
        Sample {
            at: Instant::now(),
            busy: total.saturating_sub(idle),
            total,
        }
    }
}

impl Ring {
    /// A ring for `window`, planning as if sampled every second.
    pub fn new(window: Duration) -> Ring {
        Ring::with_interval(window, Duration::from_secs(1))
    }

    /// A ring for `window` whose sampler reads every `interval` when it
    /// samples regularly.
    pub fn with_interval(window: Duration, interval: Duration) -> Ring {
        Ring {
            window,
            interval,
            state: Mutex::new(RingState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a sample and drops those no longer needed to cover the window:
    /// the oldest kept one is the newest that is old enough (`window` less
    /// half an interval). A reading older than the newest held (two scrapes
    /// at once) is dropped.
    pub fn push(&self, s: Sample) {
        push_sample(&mut self.lock(), s, self.interval / 2, self.old_enough());
    }

    /// A scrape's own reading: kept as a sample, its time for planning.
    pub fn push_scrape(&self, s: Sample) {
        let mut st = self.lock();
        push_sample(&mut st, s, self.interval / 2, self.old_enough());
        st.scrapes.push_back(s.at);
        while st.scrapes.len() > SCRAPES_KEPT {
            st.scrapes.pop_front();
        }
    }

    fn old_enough(&self) -> Duration {
        self.window.saturating_sub(self.interval / 2)
    }

    /// Busy share (0-100) between the oldest and newest sample; `None` with
    /// fewer than two samples or no time elapsed between them.
    pub fn utilization_percent(&self) -> Option<f64> {
        let st = self.lock();
        utilization_between(st.samples.front()?, st.samples.back()?)
    }

    /// When the background sampler should next read `/proc/stat` (at once
    /// when this is not after `now`).
    pub fn next_sample_at(&self, now: Instant) -> Instant {
        let st = self.lock();
        let samples: Vec<Instant> = st.samples.iter().map(|s| s.at).collect();
        plan_next_sample(
            &st.scrapes.iter().copied().collect::<Vec<_>>(),
            &samples,
            now,
            self.window,
            self.interval,
        )
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.lock().samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn push_sample(st: &mut RingState, s: Sample, thin: Duration, old_enough: Duration) {
    match st.samples.back() {
        Some(b) if s.at < b.at => return,
        // Scrapes in quick succession: the newest reading replaces one
        // taken less than half an interval before it (the one before that
        // stays), so the ring holds about 2 * window / interval readings
        // however often a client scrapes.
        Some(b) if st.samples.len() >= 2 && s.at.saturating_duration_since(b.at) < thin => {
            st.samples.pop_back();
        }
        _ => {}
    }
    st.samples.push_back(s);
    while st.samples.len() >= 2 && s.at.saturating_duration_since(st.samples[1].at) >= old_enough {
        st.samples.pop_front();
    }
}

/// `|a - b|` for instants.
fn apart(a: Instant, b: Instant) -> Duration {
    a.saturating_duration_since(b)
        .max(b.saturating_duration_since(a))
}

/// When the sampler should next read, given the last `scrapes` (each left a
/// sample), the times of the `samples` held, `now`, the window and the
/// regular interval.
///
/// Until two scrapes have been seen, and once the next one is later than
/// the longest recent gap plus an interval (scrapes stopped), it samples
/// every `interval`. Otherwise it expects scrapes every `g` (the shortest
/// recent gap) after the last one, and for the first expected scrape that
/// would find no reading (held, or left by an earlier expected scrape)
/// within half an interval of `window` before it, it reads exactly
/// `window` before that scrape.
pub fn plan_next_sample(
    scrapes: &[Instant],
    samples: &[Instant],
    now: Instant,
    window: Duration,
    interval: Duration,
) -> Instant {
    let regular = samples.iter().max().map_or(now, |t| *t + interval);
    let (Some(&last), true) = (scrapes.last(), scrapes.len() >= 2) else {
        return regular;
    };
    let gaps = scrapes
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]));
    let (Some(g), Some(longest)) = (gaps.clone().min(), gaps.max()) else {
        return regular;
    };
    let overdue = last + longest + interval;
    if now >= overdue || g.is_zero() {
        return regular;
    }
    let slack = interval / 2;
    let latest = now + SAMPLER_MAX_SLEEP;
    for k in 1..=PLAN_AHEAD {
        let Some(target) = g
            .checked_mul(k)
            .and_then(|d| last.checked_add(d))
            .and_then(|n| n.checked_sub(window))
        else {
            continue;
        };
        if target + slack < now {
            continue; // too late to place a reading for that scrape
        }
        if target > latest {
            break;
        }
        let held = samples.iter().any(|t| apart(*t, target) <= slack);
        let expected = (1..k).any(|j| apart(last + g * j, target) <= slack);
        if !held && !expected {
            return target.max(now);
        }
    }
    latest
}

/// `100 * Δbusy / Δtotal`, clamped to 0-100; `None` when Δtotal is not positive.
pub fn utilization_between(old: &Sample, new: &Sample) -> Option<f64> {
    if new.total <= old.total {
        return None;
    }
    let total = (new.total - old.total) as f64;
    let busy = new.busy as f64 - old.busy as f64;
    Some((100.0 * busy / total).clamp(0.0, 100.0))
}

/// Exports `<metric>{kind="some"|"full"}` from a PSI file under procfs.
pub(crate) fn export_psi(
    sink: &mut Sink,
    collector: &str,
    roots: &HostRoots,
    rel: &str,
    metric: &str,
    help: &str,
) {
    let path = roots.proc_path(rel);
    let Some(text) = sink.read(collector, roots.read_kept(&path)) else {
        return;
    };
    match parse_psi(&text) {
        Ok(psi) => {
            sink.counter(metric, help, &[("kind", "some")], psi.some_us as f64 / 1e6);
            if let Some(full) = psi.full_us {
                sink.counter(metric, help, &[("kind", "full")], full as f64 / 1e6);
            }
        }
        Err(e) => sink.fail(collector, format!("{}: {e}", path.display())),
    }
}

fn read_stat(roots: &HostRoots) -> Result<ProcStat, ReadError> {
    let path = roots.proc_path("stat");
    let text = roots.read_kept(&path)?;
    parse_stat(&path, &text)
}

/// The node-wide `cpu ` line of /proc/stat, in clock ticks (the fields
/// after `idle` are absent on old kernels), and the number of `cpuN` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    user: u64,
    nice: u64,
    system: u64,
    idle: u64,
    iowait: Option<u64>,
    irq: Option<u64>,
    softirq: Option<u64>,
    steal: Option<u64>,
    cpus: usize,
}

/// Reads the lines the collector needs, instead of `procfs::KernelStats`'s
/// per-CPU table and every other line.
fn parse_stat(path: &Path, text: &str) -> Result<ProcStat, ReadError> {
    let mut total = None;
    let mut cpus = 0;
    for (n, line) in text.lines().enumerate() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        if rest.starts_with(|c: char| c.is_ascii_digit()) {
            cpus += 1;
            continue;
        }
        if !rest.starts_with(' ') {
            continue;
        }
        let mut values = Vec::with_capacity(10);
        for v in rest.split_ascii_whitespace() {
            values.push(v.parse::<u64>().map_err(|_| {
                ReadError::parse(
                    path,
                    format!(
                        "line {}: cpu: expected an unsigned integer, found {v:?}",
                        n + 1
                    ),
                )
            })?);
        }
        if values.len() < 4 {
            return Err(ReadError::parse(
                path,
                format!(
                    "line {}: cpu: {} fields, expected at least 4",
                    n + 1,
                    values.len()
                ),
            ));
        }
        let at = |i: usize| values.get(i).copied();
        total = Some(ProcStat {
            user: values[0],
            nice: values[1],
            system: values[2],
            idle: values[3],
            iowait: at(4),
            irq: at(5),
            softirq: at(6),
            steal: at(7),
            cpus: 0,
        });
    }
    let mut stat = total.ok_or_else(|| ReadError::parse(path, "no cpu line"))?;
    stat.cpus = cpus;
    Ok(stat)
}

fn export_utilization(sink: &mut Sink, percent: f64) {
    sink.gauge(
        "cpu_utilization_percent",
        "Node-wide busy share of CPU time over the sampling window (/proc/stat, all modes but idle and iowait).",
        &[],
        percent,
    );
}

fn export_stat(sink: &mut Sink, stat: &ProcStat) {
    let t = stat;
    let hz = PROC_SYSTEM_INFO.ticks_per_second as f64;
    let modes = [
        ("user", Some(t.user)),
        ("nice", Some(t.nice)),
        ("system", Some(t.system)),
        ("idle", Some(t.idle)),
        ("iowait", t.iowait),
        ("irq", t.irq),
        ("softirq", t.softirq),
        ("steal", t.steal),
    ];
    for (mode, ticks) in modes {
        if let Some(ticks) = ticks {
            sink.counter(
                "cpu_seconds_total",
                "CPU time spent in each mode, summed over CPUs (/proc/stat cpu line).",
                &[("mode", mode)],
                ticks as f64 / hz,
            );
        }
    }
    // Not `cpu_count`: promtool check metrics rejects a gauge ending in _count.
    sink.gauge(
        "cpu_cores",
        "Online logical CPUs (cpuN lines of /proc/stat).",
        &[],
        stat.cpus as f64,
    );
}

/// The cpu.stat files behind `cpu_throttle_seconds_total`: which hierarchy,
/// and its first-level cgroups plus the configured ones (listed again every
/// [`CGROUPS_TTL`]: the first level of the hierarchy rarely changes).
#[derive(Debug)]
struct CgroupPlan {
    key: &'static str,
    scale: f64,
    help: &'static str,
    /// `(cgroup label, cpu.stat path)`, by cgroup.
    files: Vec<(String, PathBuf)>,
}

/// How long the list of first-level cgroups is trusted.
const CGROUPS_TTL: Duration = Duration::from_secs(60);

/// Finds the cgroup hierarchy with the cpu controller (v2, else v1) and its
/// first-level cgroups plus `extra`; `None` when there is none (or it could
/// not be listed: a failure, recorded in `sink`).
fn cgroup_plan(sink: &mut Sink, roots: &HostRoots, extra: &[String]) -> Option<CgroupPlan> {
    let base = roots.sys_path("fs/cgroup");
    let (dir, key, scale, help) = if roots.exists(&base.join("cgroup.controllers")) {
        (
            base,
            "throttled_usec",
            1e-6,
            "Time tasks of the cgroup were throttled by its CPU limit (cgroup v2 /sys/fs/cgroup/*/cpu.stat throttled_usec).",
        )
    } else if roots.exists(&base.join("cpu/cpu.stat")) {
        (
            base.join("cpu"),
            "throttled_time",
            1e-9,
            "Time tasks of the cgroup were throttled by its CPU limit (cgroup v1 /sys/fs/cgroup/cpu/*/cpu.stat throttled_time).",
        )
    } else {
        tracing::debug!(
            collector = NAME,
            "no cgroup cpu controller found, throttling left out"
        );
        return None;
    };
    let first_level = sink.read(NAME, roots.list_subdirs(&dir))?;
    let mut cgroups: BTreeSet<String> = first_level.into_iter().collect();
    cgroups.extend(
        extra
            .iter()
            .map(|c| c.trim_matches('/').to_string())
            .filter(|c| !c.is_empty()),
    );
    let files = cgroups
        .into_iter()
        .map(|cg| {
            let path = dir.join(&cg).join("cpu.stat");
            (format!("/{cg}"), path)
        })
        .collect();
    Some(CgroupPlan {
        key,
        scale,
        help,
        files,
    })
}

/// `cpu_throttle_seconds_total{cgroup}` from cgroup v2 `cpu.stat`
/// `throttled_usec` of every cgroup of `plan` (cgroup v1: `cpu/<cgroup>/cpu.stat`
/// `throttled_time`, in nanoseconds).
fn export_cgroup_throttling(sink: &mut Sink, roots: &HostRoots, plan: &CgroupPlan) {
    for (label, path) in &plan.files {
        let Some(text) = sink.read(NAME, roots.read_text(path)) else {
            continue;
        };
        match keyed_u64(&text, plan.key) {
            Ok(Some(v)) => {
                sink.counter(
                    "cpu_throttle_seconds_total",
                    plan.help,
                    &[("cgroup", label)],
                    v as f64 * plan.scale,
                );
            }
            // The cpu controller is not enabled for this cgroup.
            Ok(None) => {}
            Err(e) => sink.fail(NAME, format!("{}: {e}", path.display())),
        }
    }
}

/// The value of `key` in a `key value` per line file.
fn keyed_u64(text: &str, key: &str) -> Result<Option<u64>, String> {
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        if f.next() == Some(key) {
            let v = f.next().unwrap_or("");
            return v
                .parse()
                .map(Some)
                .map_err(|_| format!("{key}: expected an unsigned integer, found {v:?}"));
        }
    }
    Ok(None)
}

/// `cpu_thermal_throttle_events_total{type}` from
/// `cpu*/thermal_throttle/{core,package}_throttle_count`. Every CPU of a core
/// (or package) shows that core's (package's) count, so each core and package
/// is counted once, by `topology/{physical_package_id,core_id}` (as
/// node_exporter does).
fn export_thermal_throttling(sink: &mut Sink, roots: &HostRoots, plan: &ThermalPlan) {
    let help = "Thermal throttling events, each core and package counted once (/sys/devices/system/cpu/cpu*/thermal_throttle/*_throttle_count).";
    for (kind, files) in [
        ("core", &plan.core_counts),
        ("package", &plan.package_counts),
    ] {
        let mut sum = None;
        for f in files {
            if let Some(v) = read_optional(sink, roots, f) {
                sum = Some(sum.unwrap_or(0u64).saturating_add(v));
            }
        }
        if let Some(sum) = sum {
            sink.counter(
                "cpu_thermal_throttle_events_total",
                help,
                &[("type", kind)],
                sum as f64,
            );
        }
    }
}

impl CpuCollector {
    /// The cgroups to read, listed again every [`CGROUPS_TTL`] (a listing
    /// that failed is tried again at the next scrape).
    fn cgroup_plan(
        &self,
        sink: &mut Sink,
        roots: &HostRoots,
        extra: &[String],
    ) -> Option<Arc<CgroupPlan>> {
        let mut cached = self.cgroups.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, plan)) = cached.as_ref() {
            if at.elapsed() < CGROUPS_TTL {
                return Some(plan.clone());
            }
        }
        let plan = Arc::new(cgroup_plan(sink, roots, extra)?);
        *cached = Some((Instant::now(), plan.clone()));
        Some(plan)
    }

    fn thermal_plan(&self, roots: &HostRoots) -> Arc<ThermalPlan> {
        let mut cached = self.thermal.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, plan)) = cached.as_ref() {
            if at.elapsed() < PLAN_TTL {
                return plan.clone();
            }
        }
        let plan = Arc::new(thermal_plan(roots));
        *cached = Some((Instant::now(), plan.clone()));
        plan
    }

    /// `cpu_errors_total{type="machine_check"}` from the `MCE:` row of
    /// `/proc/interrupts`, summed over CPUs, read at most every [`MCE_TTL`].
    fn export_machine_checks(&self, sink: &mut Sink, roots: &HostRoots) {
        let path = roots.proc_path("interrupts");
        let reading = {
            let mut cached = self.mce.lock().unwrap_or_else(PoisonError::into_inner);
            match cached.as_ref() {
                Some((at, r)) if at.elapsed() < MCE_TTL => r.clone(),
                _ => {
                    let r = match roots.read_text(&path) {
                        Ok(text) => match parse_mce_row(&text) {
                            Ok(Some(n)) => MceReading::Count(n),
                            Ok(None) => MceReading::NoRow,
                            Err(e) => MceReading::Failed(format!("{}: {e}", path.display())),
                        },
                        Err(e) if e.is_missing() => MceReading::Missing,
                        Err(e) => MceReading::Failed(e.to_string()),
                    };
                    *cached = Some((Instant::now(), r.clone()));
                    r
                }
            }
        };
        match reading {
            MceReading::Count(n) => sink.counter(
                "cpu_errors_total",
                "Machine check exceptions, summed over CPUs (/proc/interrupts MCE row, read at most every 30 s).",
                &[("type", "machine_check")],
                n as f64,
            ),
            MceReading::NoRow => {
                tracing::debug!(collector = NAME, "no MCE row in /proc/interrupts, left out");
            }
            MceReading::Missing => {
                tracing::debug!(collector = NAME, "no /proc/interrupts, machine checks left out");
            }
            MceReading::Failed(e) => sink.fail(NAME, e),
        }
    }
}

/// The thermal_throttle files to read: for each core and each package, those
/// of its first CPU. Empty when the kernel exposes no thermal_throttle
/// directory (virtual machines, non-Intel CPUs).
fn thermal_plan(roots: &HostRoots) -> ThermalPlan {
    let dir = roots.sys_path("devices/system/cpu");
    let Ok(names) = roots.list_dir(&dir) else {
        return ThermalPlan::default();
    };
    let mut cpus: Vec<(u32, &String)> = names
        .iter()
        .filter_map(|n| Some((n.strip_prefix("cpu")?.parse::<u32>().ok()?, n)))
        .collect();
    cpus.sort();
    let mut cores = BTreeSet::new();
    let mut packages = BTreeSet::new();
    let mut plan = ThermalPlan::default();
    for (_, name) in cpus {
        let cpu = dir.join(name);
        let tt = cpu.join("thermal_throttle");
        if !roots.exists(&tt) {
            continue;
        }
        let package = topology_id(roots, &cpu, "physical_package_id").unwrap_or(name.clone());
        let core = topology_id(roots, &cpu, "core_id").unwrap_or(name.clone());
        if cores.insert((package.clone(), core)) {
            plan.core_counts.push(tt.join("core_throttle_count"));
        }
        if packages.insert(package) {
            plan.package_counts.push(tt.join("package_throttle_count"));
        }
    }
    plan
}

fn read_optional(sink: &mut Sink, roots: &HostRoots, path: &Path) -> Option<u64> {
    sink.read(NAME, roots.read_u64(path))
}

fn topology_id(roots: &HostRoots, cpu: &Path, file: &str) -> Option<String> {
    roots
        .read_text(&cpu.join("topology").join(file))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Sums the per-CPU counts of the `MCE:` row; `None` when there is no such row.
pub fn parse_mce_row(text: &str) -> Result<Option<u64>, String> {
    let Some(row) = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("MCE:"))
    else {
        return Ok(None);
    };
    let mut sum = 0u64;
    let mut n = 0;
    for field in row.split_ascii_whitespace() {
        match field.parse::<u64>() {
            Ok(v) => {
                sum = sum.saturating_add(v);
                n += 1;
            }
            // The description ("Machine check exceptions") follows the counts.
            Err(_) => break,
        }
    }
    if n == 0 {
        return Err(format!("MCE row has no counts: {row:?}"));
    }
    Ok(Some(sum))
}

/// The background sampler: reads `/proc/stat` when the ring's plan says
/// so ([`plan_next_sample`]); stops when the collector (its ring) is gone.
fn spawn_sampler(roots: HostRoots, ring: Weak<Ring>) {
    let spawned = std::thread::Builder::new()
        .name("gpuops-cpu-sampler".into())
        .spawn(move || loop {
            let Some(r) = ring.upgrade() else {
                return;
            };
            let sleep = sampler_turn(&r, Instant::now(), || match read_stat(&roots) {
                Ok(stat) => Some(Sample::of(&stat)),
                Err(e) => {
                    tracing::debug!(collector = NAME, error = %e, "cpu sample failed");
                    None
                }
            });
            drop(r);
            std::thread::sleep(sleep);
        });
    if let Err(e) = spawned {
        tracing::warn!(collector = NAME, error = %e, "cannot start the cpu sampler, cpu_utilization_percent left out");
    }
}

/// One turn of the sampler at `now`: reads (with `read`) if the plan says
/// so, and returns how long to sleep before the next turn.
fn sampler_turn(ring: &Ring, now: Instant, read: impl FnOnce() -> Option<Sample>) -> Duration {
    let mut due = ring.next_sample_at(now);
    if due <= now {
        if let Some(sample) = read() {
            ring.push(sample);
        }
        // Never two reads in a row, whatever the plan says (a failed read
        // leaves it unchanged).
        due = ring.next_sample_at(now).max(now + ring.interval / 2);
    }
    due.saturating_duration_since(now)
        .clamp(ring.interval / 8, SAMPLER_MAX_SLEEP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::testutil::{context, scrape};
    use expect_test::{expect, Expect};

    fn check(scenario: &str, ring: Option<Arc<Ring>>, expect: Expect) {
        let ctx = context(scenario, |c| {
            c.cpu.throttle_cgroups = vec!["kubepods.slice/kubepods-burstable.slice".into()];
        });
        let c = match ring {
            Some(r) => CpuCollector::with_ring(r),
            None => CpuCollector::new(&ctx),
        };
        expect.assert_eq(&scrape(&c, &ctx));
    }

    #[test]
    fn full_fixture() {
        let t0 = Instant::now();
        let ring = Arc::new(Ring::new(Duration::from_secs(10)));
        ring.push(sample(t0, 1000, 4000));
        ring.push(sample(t0 + Duration::from_secs(1), 1300, 4800));
        check(
            "full",
            Some(ring),
            expect![[r#"
                cpu_cores 4
                cpu_errors_total{type="machine_check"} 3
                cpu_load_average{window="1m"} 1.25
                cpu_load_average{window="5m"} 0.75
                cpu_load_average{window="15m"} 0.5
                cpu_pressure_stall_seconds_total{kind="some"} 31.002406
                cpu_pressure_stall_seconds_total{kind="full"} 0
                cpu_seconds_total{mode="user"} 400
                cpu_seconds_total{mode="nice"} 10
                cpu_seconds_total{mode="system"} 120
                cpu_seconds_total{mode="idle"} 3200
                cpu_seconds_total{mode="iowait"} 40
                cpu_seconds_total{mode="irq"} 5
                cpu_seconds_total{mode="softirq"} 8
                cpu_seconds_total{mode="steal"} 3
                cpu_thermal_throttle_events_total{type="core"} 12
                cpu_thermal_throttle_events_total{type="package"} 11
                cpu_throttle_seconds_total{cgroup="/init.scope"} 0
                cpu_throttle_seconds_total{cgroup="/kubepods.slice"} 123.456789
                cpu_throttle_seconds_total{cgroup="/kubepods.slice/kubepods-burstable.slice"} 0.5
                cpu_throttle_seconds_total{cgroup="/system.slice"} 2.5
                cpu_utilization_percent 37.5
            "#]],
        );
    }

    #[test]
    fn one_shot_with_unchanged_counters_leaves_utilization_out() {
        // Both samples read the same fixture file: no time passed for the kernel.
        check(
            "full",
            None,
            expect![[r#"
            cpu_cores 4
            cpu_errors_total{type="machine_check"} 3
            cpu_load_average{window="1m"} 1.25
            cpu_load_average{window="5m"} 0.75
            cpu_load_average{window="15m"} 0.5
            cpu_pressure_stall_seconds_total{kind="some"} 31.002406
            cpu_pressure_stall_seconds_total{kind="full"} 0
            cpu_seconds_total{mode="user"} 400
            cpu_seconds_total{mode="nice"} 10
            cpu_seconds_total{mode="system"} 120
            cpu_seconds_total{mode="idle"} 3200
            cpu_seconds_total{mode="iowait"} 40
            cpu_seconds_total{mode="irq"} 5
            cpu_seconds_total{mode="softirq"} 8
            cpu_seconds_total{mode="steal"} 3
            cpu_thermal_throttle_events_total{type="core"} 12
            cpu_thermal_throttle_events_total{type="package"} 11
            cpu_throttle_seconds_total{cgroup="/init.scope"} 0
            cpu_throttle_seconds_total{cgroup="/kubepods.slice"} 123.456789
            cpu_throttle_seconds_total{cgroup="/kubepods.slice/kubepods-burstable.slice"} 0.5
            cpu_throttle_seconds_total{cgroup="/system.slice"} 2.5
        "#]],
        );
    }

    #[test]
    fn missing_files_leave_series_out_without_failing() {
        check("missing", None, expect![[r#""#]]);
    }

    #[test]
    fn malformed_files_fail_and_leave_series_out() {
        check(
            "malformed",
            None,
            expect![[r#"
                FAILED F/malformed/proc/stat: line 1: cpu: expected an unsigned integer, found "abc"
                FAILED F/malformed/proc/loadavg: unexpected contents: invalid float literal
                FAILED F/malformed/proc/pressure/cpu: unexpected line "garbage in here"
                FAILED F/malformed/sys/fs/cgroup/system.slice/cpu.stat: throttled_usec: expected an unsigned integer, found "-5"
                FAILED F/malformed/sys/devices/system/cpu/cpu0/thermal_throttle/core_throttle_count: expected an unsigned integer, found "hot"
                FAILED F/malformed/sys/devices/system/cpu/cpu0/thermal_throttle/package_throttle_count: expected an unsigned integer, found ""
                FAILED F/malformed/proc/interrupts: MCE row has no counts: "   lots   Machine check exceptions"
            "#]],
        );
    }

    fn sample(at: Instant, busy: u64, total: u64) -> Sample {
        Sample { at, busy, total }
    }

    #[test]
    fn utilization_is_busy_share_of_the_window() {
        let t0 = Instant::now();
        let ring = Ring::new(Duration::from_secs(10));
        assert_eq!(ring.utilization_percent(), None);
        ring.push(sample(t0, 100, 1000));
        assert_eq!(ring.utilization_percent(), None, "one sample is not a rate");
        ring.push(sample(t0 + Duration::from_secs(1), 150, 1200));
        assert_eq!(ring.utilization_percent(), Some(25.0));
        for i in 2..=30u64 {
            ring.push(sample(
                t0 + Duration::from_secs(i),
                150 + 10 * (i - 1),
                1000 + 200 * i,
            ));
        }
        // The ring covers the window (10 s), not the whole history.
        assert_eq!(ring.len(), 11);
        assert_eq!(ring.utilization_percent(), Some(5.0));
        // Reading does not change it: every scraper sees the same value.
        assert_eq!(ring.utilization_percent(), Some(5.0));
    }

    #[test]
    fn scrapes_in_a_tight_loop_do_not_grow_the_ring() {
        let t0 = Instant::now();
        let ring = Ring::new(Duration::from_secs(10));
        // 20 s of scrapes every millisecond.
        for i in 0..20_000u64 {
            ring.push_scrape(sample(t0 + Duration::from_millis(i), i, 2 * i + 2));
        }
        assert!(ring.len() <= 25, "{} readings held", ring.len());
        assert_eq!(ring.utilization_percent(), Some(50.0));
    }

    #[test]
    fn a_scrape_reading_ends_the_window() {
        let t0 = Instant::now();
        let ring = Ring::new(Duration::from_secs(10));
        ring.push(sample(t0, 100, 1000));
        ring.push_scrape(sample(t0 + Duration::from_secs(10), 600, 2000));
        assert_eq!(ring.utilization_percent(), Some(50.0));
        // A reading older than the newest (two scrapes at once) is dropped.
        ring.push_scrape(sample(t0 + Duration::from_secs(9), 0, 1500));
        assert_eq!(ring.utilization_percent(), Some(50.0));
        assert_eq!(ring.len(), 2);
    }

    /// Runs the sampler's loop (as `spawn_sampler` does) and a scraper
    /// against one ring on a simulated clock for `secs` seconds. Returns the
    /// sampler's read times and, per scrape, its time and window length.
    fn simulate(scrapes: &[f64], secs: f64) -> (Vec<f64>, Vec<(f64, f64)>) {
        let (window, interval) = (Duration::from_secs(10), Duration::from_secs(1));
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let secs_of = |i: Instant| i.duration_since(t0).as_secs_f64();
        let ring = Ring::with_interval(window, interval);
        // Monotonic ticks so that `busy`/`total` grow with time.
        let tick = |s: f64| (s * 100.0) as u64 + 1;
        let (mut reads, mut windows) = (Vec::new(), Vec::new());
        let mut scrape = |sc: f64| {
            ring.push_scrape(sample(at(sc), tick(sc) / 2, tick(sc)));
            let front = ring.lock().samples.front().map(|s| s.at).unwrap();
            windows.push((sc, sc - secs_of(front)));
        };
        let mut wake = 0.0;
        let mut next_scrape = scrapes.iter().copied().peekable();
        while wake < secs {
            let sleep = sampler_turn(&ring, at(wake), || {
                reads.push(wake);
                Some(sample(at(wake), tick(wake) / 2, tick(wake)))
            });
            // The scrapes before the sampler's next turn happen meanwhile
            // (the sampler only sees their readings at that turn).
            let next_turn = wake + sleep.as_secs_f64();
            while let Some(sc) = next_scrape.next_if(|sc| *sc <= next_turn) {
                scrape(sc);
            }
            wake = next_turn;
        }
        (reads, windows)
    }

    fn every(start: f64, step: f64, until: f64) -> Vec<f64> {
        let mut v = Vec::new();
        let mut t = start;
        while t < until {
            v.push(t);
            t += step;
        }
        v
    }

    fn merged(mut a: Vec<f64>, b: Vec<f64>) -> Vec<f64> {
        a.extend(b);
        a.sort_by(f64::total_cmp);
        a
    }

    /// The windows of the scrapes after `from`, and the sampler's reads then.
    fn after(from: f64, (reads, windows): &(Vec<f64>, Vec<(f64, f64)>)) -> (usize, Vec<f64>) {
        (
            reads.iter().filter(|r| **r >= from).count(),
            windows
                .iter()
                .filter(|(at, _)| *at >= from)
                .map(|(_, w)| (w * 1000.0).round() / 1000.0)
                .collect(),
        )
    }

    #[test]
    fn sampler_reads_once_a_scrape_when_scrapes_are_further_apart_than_the_window() {
        for step in [15.0, 30.0, 60.0] {
            let run = simulate(&every(0.3, step, 1200.0), 1200.0);
            let (reads, windows) = after(4.0 * step, &run);
            let scrapes = windows.len();
            assert!(
                reads <= scrapes + 1,
                "every {step} s: {reads} reads for {scrapes} scrapes: {:?}",
                run.0
            );
            assert!(
                windows.iter().all(|w| (9.5..=10.5).contains(w)),
                "every {step} s: windows {windows:?}"
            );
        }
    }

    #[test]
    fn sampler_does_not_read_while_scrapes_cover_the_window() {
        for step in [0.5, 1.0, 2.0, 5.0, 10.0] {
            let run = simulate(&every(0.3, step, 600.0), 600.0);
            let (reads, windows) = after(60.0, &run);
            // One look a minute at most, and no read while scrapes come.
            assert_eq!(reads, 0, "every {step} s: reads {:?}", run.0);
            assert!(
                windows.iter().all(|w| (9.5..=10.5).contains(w)),
                "every {step} s: windows {windows:?}"
            );
        }
    }

    #[test]
    fn an_ha_pair_of_prometheus_servers_costs_about_one_read_a_scrape() {
        // Two servers scraping every 15 s, 7 s apart.
        let scrapes = merged(every(0.3, 15.0, 1200.0), every(7.3, 15.0, 1200.0));
        let run = simulate(&scrapes, 1200.0);
        let (reads, windows) = after(60.0, &run);
        assert!(
            reads <= windows.len(),
            "{reads} reads for {} scrapes",
            windows.len()
        );
        assert!(
            windows.iter().all(|w| (9.0..=12.0).contains(w)),
            "windows {windows:?}"
        );
    }

    #[test]
    fn sampler_reads_every_interval_before_scrapes_and_after_they_stop() {
        // No scrapes: a read a second, as before.
        let (reads, _) = simulate(&[], 30.0);
        assert!((29..=31).contains(&reads.len()), "{reads:?}");
        // Scrapes every 15 s until 300 s, then none: regular again from
        // 300 + 15 + 1 s, so the next scrape finds its window whenever it comes.
        let run = simulate(&every(0.3, 15.0, 300.0), 400.0);
        let late: Vec<_> = run.0.iter().filter(|r| **r > 320.0).collect();
        assert!((78..=81).contains(&late.len()), "{late:?}");
        let first = run.0.iter().find(|r| **r > 286.0).copied();
        assert!(first.is_some_and(|f| f <= 317.0), "{:?}", run.0);
    }

    #[test]
    fn no_elapsed_time_leaves_utilization_out() {
        let t0 = Instant::now();
        assert_eq!(
            utilization_between(&sample(t0, 5, 10), &sample(t0, 5, 10)),
            None
        );
        // Counters going backwards (CPU hot-unplug) give no value rather than nonsense.
        assert_eq!(
            utilization_between(&sample(t0, 5, 10), &sample(t0, 5, 8)),
            None
        );
        assert_eq!(
            utilization_between(&sample(t0, 10, 10), &sample(t0, 5, 20)),
            Some(0.0)
        );
    }

    #[test]
    fn cgroup_v1_throttling_is_read_from_the_cpu_hierarchy() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = dir.path().join("fs/cgroup/cpu");
        std::fs::create_dir_all(cpu.join("kubepods")).unwrap();
        std::fs::write(cpu.join("cpu.stat"), "nr_periods 0\nthrottled_time 0\n").unwrap();
        std::fs::write(
            cpu.join("kubepods/cpu.stat"),
            "nr_periods 10\nnr_throttled 2\nthrottled_time 1500000000\n",
        )
        .unwrap();
        let roots = HostRoots {
            sysfs: dir.path().to_path_buf(),
            ..HostRoots::default()
        };
        let mut sink = Sink::new();
        let plan = cgroup_plan(&mut sink, &roots, &[]).unwrap();
        export_cgroup_throttling(&mut sink, &roots, &plan);
        let fams = sink.into_families();
        assert_eq!(fams.len(), 1);
        let m = &fams[0].get_metric()[0];
        assert_eq!(m.get_label()[0].value(), "/kubepods");
        assert_eq!(m.get_counter().get_value(), 1.5);
    }

    #[test]
    fn first_level_cgroups_are_listed_once_a_while_and_read_every_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = dir.path().join("fs/cgroup");
        std::fs::create_dir_all(cgroup.join("a.slice")).unwrap();
        std::fs::write(cgroup.join("cgroup.controllers"), "cpu memory\n").unwrap();
        let stat = |usec: u64| format!("usage_usec 1\nthrottled_usec {usec}\n");
        std::fs::write(cgroup.join("a.slice/cpu.stat"), stat(1_000_000)).unwrap();
        let roots = HostRoots {
            sysfs: dir.path().to_path_buf(),
            ..HostRoots::default()
        };
        let c = CpuCollector::with(None);
        let read = |c: &CpuCollector| {
            let mut sink = Sink::new();
            let plan = c.cgroup_plan(&mut sink, &roots, &[]).unwrap();
            export_cgroup_throttling(&mut sink, &roots, &plan);
            sink.into_families()[0]
                .get_metric()
                .iter()
                .map(|m| {
                    let v = m.get_counter().get_value();
                    (m.get_label()[0].value().to_string(), v)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(read(&c), [("/a.slice".to_string(), 1.0)]);
        std::fs::create_dir_all(cgroup.join("b.slice")).unwrap();
        std::fs::write(cgroup.join("b.slice/cpu.stat"), stat(3_000_000)).unwrap();
        std::fs::write(cgroup.join("a.slice/cpu.stat"), stat(2_000_000)).unwrap();
        assert_eq!(
            read(&c),
            [("/a.slice".to_string(), 2.0)],
            "values every scrape, the list again after CGROUPS_TTL"
        );
        *c.cgroups.lock().unwrap() = None;
        assert_eq!(
            read(&c),
            [("/a.slice".to_string(), 2.0), ("/b.slice".to_string(), 3.0)]
        );
    }

    #[test]
    fn mce_row_is_reused_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let interrupts = dir.path().join("interrupts");
        std::fs::write(&interrupts, " MCE: 1 2 Machine check exceptions\n").unwrap();
        let roots = HostRoots {
            procfs: dir.path().to_path_buf(),
            ..HostRoots::default()
        };
        let c = CpuCollector::with(None);
        let read = |c: &CpuCollector| {
            let mut sink = Sink::new();
            c.export_machine_checks(&mut sink, &roots);
            sink.into_families()[0].get_metric()[0]
                .get_counter()
                .get_value()
        };
        assert_eq!(read(&c), 3.0);
        std::fs::write(&interrupts, " MCE: 4 2 Machine check exceptions\n").unwrap();
        assert_eq!(read(&c), 3.0, "read again within MCE_TTL");
        *c.mce.lock().unwrap() = None;
        assert_eq!(read(&c), 6.0);
    }

    #[test]
    fn mce_row() {
        let text = "           CPU0       CPU1\n  0:         22          0   IO-APIC   2-edge      timer\n MCE:          3          4   Machine check exceptions\n MCP:        125        125   Machine check polls\n";
        assert_eq!(parse_mce_row(text), Ok(Some(7)));
        assert_eq!(parse_mce_row("  0: 1 2 timer\n"), Ok(None));
        assert!(parse_mce_row(" MCE: x y\n").is_err());
    }

    #[test]
    fn proc_stat_is_read_as_the_procfs_crate_reads_it() {
        for f in [
            crate::collector::testutil::fixture("full/proc/stat"),
            PathBuf::from("/proc/stat"),
        ] {
            let text = std::fs::read_to_string(&f).unwrap();
            let ours = parse_stat(&f, &text).unwrap();
            use procfs::FromReadSI as _;
            let theirs =
                procfs::KernelStats::from_read(text.as_bytes(), &PROC_SYSTEM_INFO).unwrap();
            let t = &theirs.total;
            assert_eq!(
                ours,
                ProcStat {
                    user: t.user,
                    nice: t.nice,
                    system: t.system,
                    idle: t.idle,
                    iowait: t.iowait,
                    irq: t.irq,
                    softirq: t.softirq,
                    steal: t.steal,
                    cpus: theirs.cpu_time.len(),
                },
                "{}",
                f.display()
            );
        }
        let f = Path::new("/x/stat");
        assert!(parse_stat(f, "cpu0 1 2 3 4\n").is_err(), "no cpu line");
        assert!(parse_stat(f, "cpu  1 2 3\n").is_err());
        assert_eq!(
            parse_stat(f, "cpu  1 2 3 4\ncpu0 1 2 3 4\n").unwrap().cpus,
            1
        );
    }

    #[test]
    fn keyed_values() {
        let text = "usage_usec 10\nthrottled_usec 2500000\n";
        assert_eq!(keyed_u64(text, "throttled_usec"), Ok(Some(2_500_000)));
        assert_eq!(keyed_u64(text, "nr_periods"), Ok(None));
        assert!(keyed_u64("throttled_usec x\n", "throttled_usec").is_err());
    }
}
