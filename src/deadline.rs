//! Calls that may never return (statvfs on a dead NFS server, NVML on a GPU
//! that fell off the bus, a collector stuck in the kernel) run here: on their
//! own thread, waited for only until a deadline, and at most one per key.
//!
//! A call that misses its deadline keeps its slot until it returns, so later
//! callers with the same key are told `StillRunning` at once instead of
//! stacking a new thread per scrape. Callers arriving while a call is in flight
//! (several Prometheus servers scraping at once) share its result. Threads of
//! finished calls wait a while for the next call instead of exiting.
//! [`SingleFlight::start_batch`] hands several calls to one thread at once
//! (one hand-off a scrape instead of one a call, for statvfs of every mount),
//! with one deadline for the batch: a call that stalls the batch has the
//! calls queued behind it taken up by another thread, so it holds only its
//! own thread and is the only one reported late.
//! This module must not know about metrics or HTTP.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What a bounded call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// The call returned in time (possibly one started by another caller).
    Done(T),
    /// The call was started (or joined) but did not return before the deadline.
    TimedOut,
    /// An earlier call with this key has been running longer than the deadline;
    /// no new call was started.
    StillRunning { since: Duration },
}

struct Cell<T> {
    /// `None` while running; `Some(None)` if the call panicked.
    value: Mutex<Option<Option<T>>>,
    ready: Condvar,
}

struct Slot<T> {
    started: Instant,
    cell: Arc<Cell<T>>,
}

/// Single-flight, deadline-bounded calls keyed by `K`.
pub struct SingleFlight<K, T> {
    slots: Arc<Mutex<HashMap<K, Slot<T>>>>,
    workers: Arc<Workers>,
}

/// How long a finished call's thread waits for the next call before it exits.
/// Longer than common scrape intervals, so a scrape reuses threads instead of
/// paying a spawn (about 30 µs) per call.
const IDLE_KEEP: Duration = Duration::from_secs(300);

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Threads that ran a call and now wait for another. A call that never
/// returns keeps its thread, so a stuck call still holds exactly one thread.
struct Workers {
    name: &'static str,
    idle: Mutex<Vec<(u64, mpsc::Sender<Job>)>>,
    next_id: AtomicU64,
}

impl Workers {
    /// Runs `job` on an idle thread, or on a new one.
    fn run(self: &Arc<Self>, mut job: Job) -> std::io::Result<()> {
        loop {
            let worker = lock(&self.idle).pop();
            let Some((_, tx)) = worker else { break };
            match tx.send(job) {
                Ok(()) => return Ok(()),
                // That thread has gone: try the next.
                Err(mpsc::SendError(j)) => job = j,
            }
        }
        let id = self.next_id.fetch_add(1, AtomicOrdering::Relaxed);
        let weak = Arc::downgrade(self);
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(self.name.to_string())
            .spawn(move || {
                let mut job = job;
                loop {
                    job();
                    let Some(w) = weak.upgrade() else { return };
                    lock(&w.idle).push((id, tx.clone()));
                    drop(w);
                    job = match rx.recv_timeout(IDLE_KEEP) {
                        Ok(j) => j,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let Some(w) = weak.upgrade() else { return };
                            let mut idle = lock(&w.idle);
                            if let Some(i) = idle.iter().position(|(x, _)| *x == id) {
                                idle.remove(i);
                                return;
                            }
                            drop(idle);
                            // Taken just as we timed out: its call is on the way.
                            match rx.recv() {
                                Ok(j) => j,
                                Err(_) => return,
                            }
                        }
                    };
                }
            })
            .map(|_| ())
    }
}

/// A call started (or joined) by [`SingleFlight::start`].
pub struct Pending<T> {
    started: Instant,
    cell: Option<Arc<Cell<T>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K, T> SingleFlight<K, T>
where
    K: Eq + Hash + Clone + Send + 'static,
    T: Clone + Send + 'static,
{
    pub fn new(thread_name: &'static str) -> Self {
        SingleFlight {
            slots: Arc::new(Mutex::new(HashMap::new())),
            workers: Arc::new(Workers {
                name: thread_name,
                idle: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Starts `f` on a thread of its own (a reused idle one if any) unless a call with `key` is already in
    /// flight, in which case that call is joined. `deadline` is only used to
    /// refuse joining a call that is already older than it.
    pub fn start<F>(&self, key: K, deadline: Duration, f: F) -> Pending<T>
    where
        F: FnOnce() -> T + Send + 'static,
    {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get(&key) {
            let age = slot.started.elapsed();
            if age >= deadline {
                return Pending {
                    started: slot.started,
                    cell: None,
                };
            }
            return Pending {
                started: slot.started,
                cell: Some(slot.cell.clone()),
            };
        }
        let cell = Arc::new(Cell {
            value: Mutex::new(None),
            ready: Condvar::new(),
        });
        let started = Instant::now();
        let spawned = {
            let cell = cell.clone();
            let slots = self.slots.clone();
            let key = key.clone();
            self.workers.run(Box::new(move || {
                // Catch a panic so the slot is always freed.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
                // Free the slot before the value is seen: a caller that sees
                // the value and calls again must start a new call, never
                // join this finished one (and be handed its old result).
                lock(&slots).remove(&key);
                *lock(&cell.value) = Some(result.ok());
                cell.ready.notify_all();
            }))
        };
        if spawned.is_err() {
            // No thread: report as timed out rather than running inline.
            return Pending {
                started,
                cell: None,
            };
        }
        slots.insert(
            key,
            Slot {
                started,
                cell: cell.clone(),
            },
        );
        Pending {
            started,
            cell: Some(cell),
        }
    }

    /// `start` then `wait`.
    pub fn call<F>(&self, key: K, deadline: Duration, f: F) -> Outcome<T>
    where
        F: FnOnce() -> T + Send + 'static,
    {
        self.start(key, deadline, f)
            .wait_until(Instant::now() + deadline)
    }

    /// Number of calls in flight (stuck ones included).
    pub fn in_flight(&self) -> usize {
        lock(&self.slots).len()
    }

    /// Starts `calls` as one batch: each joins a call with its key already in
    /// flight (or is told `StillRunning`, as [`SingleFlight::start`]); the
    /// others are queued and handed to one thread, which runs them one after
    /// another. Wait with [`Batch::wait_until`], which adds a thread when a
    /// call stalls the queue (every `deadline / 16`).
    pub fn start_batch<F>(&self, calls: Vec<(K, F)>, deadline: Duration) -> Batch<T>
    where
        F: FnOnce() -> T + Send + 'static,
    {
        let queue: Arc<Mutex<VecDeque<Queued>>> = Arc::new(Mutex::new(VecDeque::new()));
        let mut pending = Vec::with_capacity(calls.len());
        {
            let mut slots = lock(&self.slots);
            let mut queued = lock(&queue);
            for (key, f) in calls {
                if let Some(slot) = slots.get(&key) {
                    let joined = slot.started.elapsed() < deadline;
                    pending.push(Pending {
                        started: slot.started,
                        cell: joined.then(|| slot.cell.clone()),
                    });
                    continue;
                }
                let cell = Arc::new(Cell {
                    value: Mutex::new(None),
                    ready: Condvar::new(),
                });
                let started = Instant::now();
                let run = {
                    let (cell, slots, key) = (cell.clone(), self.slots.clone(), key.clone());
                    Box::new(move || {
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
                        // As in `start`: the slot is freed before the value is seen.
                        lock(&slots).remove(&key);
                        *lock(&cell.value) = Some(result.ok());
                        cell.ready.notify_all();
                    }) as Job
                };
                let cancel = {
                    let (cell, slots, key) = (cell.clone(), self.slots.clone(), key.clone());
                    Box::new(move || {
                        lock(&slots).remove(&key);
                        *lock(&cell.value) = Some(None);
                        cell.ready.notify_all();
                    }) as Job
                };
                queued.push_back(Queued { run, cancel });
                slots.insert(
                    key,
                    Slot {
                        started,
                        cell: cell.clone(),
                    },
                );
                pending.push(Pending {
                    started,
                    cell: Some(cell),
                });
            }
        }
        let batch = Batch {
            pending,
            queue,
            workers: self.workers.clone(),
            stall: (deadline / 16).max(Duration::from_millis(1)),
        };
        if !lock(&batch.queue).is_empty() && batch.add_runner().is_err() {
            // No thread: report the queued calls as timed out rather than run them here.
            batch.cancel_queued();
        }
        batch
    }
}

/// A queued call of a [`Batch`]: `run` makes the call and publishes its
/// result, `cancel` frees its slot unrun (its waiters see `TimedOut`).
struct Queued {
    run: Job,
    cancel: Job,
}

/// Calls started together by [`SingleFlight::start_batch`].
pub struct Batch<T> {
    pending: Vec<Pending<T>>,
    queue: Arc<Mutex<VecDeque<Queued>>>,
    workers: Arc<Workers>,
    /// How long the waiter lets one call hold up the queue before it adds a thread.
    stall: Duration,
}

impl<T: Clone> Batch<T> {
    /// Waits until every call has returned or `until` passes: the outcomes,
    /// in the order of the calls. While a call holds up the queue, another
    /// thread takes up the calls behind it; calls still queued at `until` are
    /// not made (their slots are freed, they report `TimedOut`).
    pub fn wait_until(self, until: Instant) -> Vec<Outcome<T>> {
        for p in &self.pending {
            loop {
                let now = Instant::now();
                if now >= until || p.returned_by((now + self.stall).min(until)) {
                    break;
                }
                if !lock(&self.queue).is_empty() && self.add_runner().is_err() {
                    break;
                }
            }
        }
        self.cancel_queued();
        self.pending
            .into_iter()
            .map(|p| p.wait_until(until))
            .collect()
    }

    /// One more thread taking calls off the queue until it is empty.
    fn add_runner(&self) -> std::io::Result<()> {
        let queue = self.queue.clone();
        self.workers.run(Box::new(move || loop {
            let next = lock(&queue).pop_front();
            let Some(q) = next else { return };
            (q.run)();
        }))
    }

    fn cancel_queued(&self) {
        let left: Vec<Queued> = lock(&self.queue).drain(..).collect();
        for q in left {
            (q.cancel)();
        }
    }
}

impl<T: Clone> Pending<T> {
    /// Whether the call has returned (or panicked, or was never joined),
    /// waiting for it until `until` at most.
    fn returned_by(&self, until: Instant) -> bool {
        let Some(cell) = &self.cell else {
            return true;
        };
        let mut value = lock(&cell.value);
        loop {
            if value.is_some() {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            let (guard, _) = cell
                .ready
                .wait_timeout(value, until - now)
                .unwrap_or_else(PoisonError::into_inner);
            value = guard;
        }
    }

    /// Waits until the call returns or `until` passes.
    pub fn wait_until(self, until: Instant) -> Outcome<T> {
        let Some(cell) = self.cell else {
            return Outcome::StillRunning {
                since: self.started.elapsed(),
            };
        };
        let mut value = lock(&cell.value);
        loop {
            match value.as_ref() {
                Some(Some(v)) => return Outcome::Done(v.clone()),
                // The call panicked.
                Some(None) => return Outcome::TimedOut,
                None => {}
            }
            let now = Instant::now();
            if now >= until {
                return Outcome::TimedOut;
            }
            let (guard, _) = cell
                .ready
                .wait_timeout(value, until - now)
                .unwrap_or_else(PoisonError::into_inner);
            value = guard;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn returns_value_in_time() {
        let sf: SingleFlight<&str, u32> = SingleFlight::new("t");
        assert_eq!(sf.call("a", Duration::from_secs(1), || 7), Outcome::Done(7));
    }

    #[test]
    fn stuck_call_is_not_restarted() {
        let sf: SingleFlight<&str, u32> = SingleFlight::new("t");
        let started = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let s = started.clone();
        let out = sf.call("nfs", Duration::from_millis(50), move || {
            s.fetch_add(1, Ordering::SeqCst);
            let _ = rx.recv();
            1
        });
        assert_eq!(out, Outcome::TimedOut);
        for _ in 0..5 {
            let s = started.clone();
            let out = sf.call("nfs", Duration::from_millis(50), move || {
                s.fetch_add(1, Ordering::SeqCst);
                2
            });
            assert!(matches!(out, Outcome::StillRunning { .. }), "{out:?}");
        }
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "one thread, not one per call"
        );
        assert_eq!(sf.in_flight(), 1);
        tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while sf.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            sf.call("nfs", Duration::from_secs(1), || 3),
            Outcome::Done(3)
        );
    }

    #[test]
    fn finished_calls_reuse_their_thread() {
        let sf: SingleFlight<u32, std::thread::ThreadId> = SingleFlight::new("t");
        let first = sf.call(1, Duration::from_secs(1), || std::thread::current().id());
        let Outcome::Done(first) = first else {
            panic!("{first:?}")
        };
        // Let the worker register as idle.
        let until = Instant::now() + Duration::from_secs(2);
        while lock(&sf.workers.idle).is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        for key in 2..5 {
            let again = sf.call(key, Duration::from_secs(1), || std::thread::current().id());
            assert_eq!(
                again,
                Outcome::Done(first),
                "call {key} ran on a new thread"
            );
            let until = Instant::now() + Duration::from_secs(2);
            while lock(&sf.workers.idle).is_empty() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn a_call_after_the_last_one_returned_runs_anew() {
        let sf: SingleFlight<&str, u32> = SingleFlight::new("t");
        for i in 0..10_000 {
            assert_eq!(
                sf.call("scrape", Duration::from_secs(5), move || i),
                Outcome::Done(i),
                "call {i} was handed an earlier call's result"
            );
        }
    }

    #[test]
    fn a_batch_is_one_hand_off_to_one_thread() {
        let sf: SingleFlight<u32, std::thread::ThreadId> = SingleFlight::new("t");
        let calls: Vec<(u32, _)> = (0..6)
            .map(|k| (k, || std::thread::current().id()))
            .collect();
        let out = sf
            .start_batch(calls, Duration::from_secs(5))
            .wait_until(Instant::now() + Duration::from_secs(5));
        let Outcome::Done(first) = out[0].clone() else {
            panic!("{out:?}")
        };
        assert_ne!(first, std::thread::current().id());
        assert_eq!(out, vec![Outcome::Done(first); 6]);
    }

    #[test]
    fn a_stuck_call_in_a_batch_holds_up_only_itself() {
        let sf: SingleFlight<&str, u32> = SingleFlight::new("t");
        let deadline = Duration::from_millis(400);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let batch = |sf: &SingleFlight<&'static str, u32>| {
            type Call = Box<dyn FnOnce() -> u32 + Send>;
            let calls: Vec<(&str, Call)> = vec![
                ("a", Box::new(|| 1)),
                ("nfs", {
                    let rx = rx.clone();
                    Box::new(move || {
                        let _ = lock(&rx).recv();
                        2
                    })
                }),
                ("b", Box::new(|| 3)),
                ("c", Box::new(|| 4)),
            ];
            sf.start_batch(calls, deadline)
                .wait_until(Instant::now() + deadline)
        };
        let out = batch(&sf);
        assert_eq!(
            out,
            vec![
                Outcome::Done(1),
                Outcome::TimedOut,
                Outcome::Done(3),
                Outcome::Done(4)
            ]
        );
        // Stuck past its deadline: not started again, the others run anew.
        let out = batch(&sf);
        assert!(matches!(out[1], Outcome::StillRunning { .. }), "{out:?}");
        assert_eq!(
            (&out[0], &out[2], &out[3]),
            (&Outcome::Done(1), &Outcome::Done(3), &Outcome::Done(4))
        );
        assert_eq!(sf.in_flight(), 1, "only the stuck call holds a slot");
        // The server is back: every call returns at once from now on.
        drop(tx);
        let until = Instant::now() + Duration::from_secs(2);
        while sf.in_flight() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(batch(&sf)[1], Outcome::Done(2));
    }

    #[test]
    fn panicking_call_frees_its_slot() {
        let sf: SingleFlight<&str, u32> = SingleFlight::new("t");
        let out = sf.call("p", Duration::from_secs(1), || panic!("boom"));
        assert_eq!(out, Outcome::TimedOut);
        assert_eq!(sf.in_flight(), 0);
    }
}
