//! The GPU collector's slow values: the background thread that reads
//! [`GpuBackend::slow_snapshot`] every `[gpu] slow_interval_secs`, and the
//! last reading the scrapes serve, with its age.
//!
//! A reading belongs to the [`GpuGate`] epoch it was taken in: after a
//! release for a runbook step (a GPU reset changes the energy and ECC
//! counters) it is never served again, and while the GPU is released the
//! thread does not call the backend. This module must not call NVML or read
//! the host.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::gpu::{GpuBackend, GpuGate, SlowReading};

/// How often the background thread looks whether a read is due (and whether
/// a release ended): short, so values come back soon after a GPU reset.
const TICK: Duration = Duration::from_secs(1);

/// The last slow reading, shared by the background thread and the scrapes.
#[derive(Default)]
pub(crate) struct SlowLatest {
    taken: Mutex<Option<Taken>>,
}

struct Taken {
    epoch: u64,
    at: Instant,
    readings: Arc<Vec<SlowReading>>,
}

impl SlowLatest {
    /// Keeps `readings`, taken under `epoch` and finished now. A failed read
    /// is kept as no readings, so it is not retried on the scrape path.
    pub(crate) fn store(&self, epoch: u64, readings: Vec<SlowReading>) {
        *self.taken.lock().unwrap_or_else(PoisonError::into_inner) = Some(Taken {
            epoch,
            at: Instant::now(),
            readings: Arc::new(readings),
        });
    }

    /// The last reading taken under `epoch` and when it was taken, if it
    /// was taken within `max_age` (a reader that keeps failing or hangs lets
    /// its values age out rather than serve them for ever).
    pub(crate) fn get(
        &self,
        epoch: u64,
        max_age: Duration,
    ) -> Option<(Instant, Arc<Vec<SlowReading>>)> {
        let g = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        g.as_ref()
            .filter(|t| t.epoch == epoch && t.at.elapsed() <= max_age)
            .map(|t| (t.at, t.readings.clone()))
    }

    /// The epoch and time of the last reading kept.
    pub(crate) fn last(&self) -> Option<(u64, Instant)> {
        let g = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        g.as_ref().map(|t| (t.epoch, t.at))
    }
}

/// How old a slow reading may be and still be served: two intervals (one
/// missed read is tolerated) and a minute for reads that take long.
pub(crate) fn max_age(interval: Duration) -> Duration {
    interval * 2 + Duration::from_secs(60)
}

/// Reads the slow values once (on the calling thread) and keeps them.
pub(crate) fn read_now(backend: &dyn GpuBackend, latest: &SlowLatest, gate: &GpuGate) {
    let epoch = gate.epoch();
    if gate.released_for().is_some() {
        return;
    }
    match backend.slow_snapshot() {
        Ok(r) => latest.store(epoch, r),
        Err(e) => {
            tracing::debug!(error = %e, "slow gpu values not read");
            latest.store(epoch, Vec::new());
        }
    }
}

/// Starts the thread that reads the slow values every `interval`. A
/// `slow_snapshot` that hangs holds this one thread (every GPU's read has its
/// own deadline inside the backend, so that does not happen unless the
/// backend itself hangs); the readings then age, and their age says so.
pub(crate) fn spawn_reader(
    backend: Arc<dyn GpuBackend>,
    latest: Arc<SlowLatest>,
    gate: Arc<GpuGate>,
    interval: Duration,
) {
    let spawned = std::thread::Builder::new()
        .name("gpuops-gpu-slow".into())
        .spawn(move || {
            let mut failing = false;
            // The last attempt: its epoch and start.
            let mut last = latest.last();
            loop {
                std::thread::sleep(TICK.min(interval));
                // Released for a runbook step: no NVML call at all.
                if gate.released_for().is_some() || backend.is_released() {
                    continue;
                }
                let epoch = gate.epoch();
                let due = last.is_none_or(|(e, at)| e != epoch || at.elapsed() >= interval);
                if !due {
                    continue;
                }
                last = Some((epoch, Instant::now()));
                match backend.slow_snapshot() {
                    Ok(r) => {
                        if failing {
                            tracing::info!("slow gpu values read again");
                            failing = false;
                        }
                        latest.store(epoch, r);
                    }
                    // The last reading stays until it ages out (`max_age`).
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "slow gpu values (energy, ECC, remapped rows, power limit) not read");
                            failing = true;
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the slow gpu value reader");
    }
}
