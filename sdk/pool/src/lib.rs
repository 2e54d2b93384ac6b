//! A small persistent thread pool for the forward pass.
//!
//! Matrix products of a small model take tens of microseconds, so the pool's dispatch cost
//! matters: workers spin briefly on a generation counter before sleeping on a condvar, and
//! the calling thread does its own share of the work instead of waiting idle.
//!
//! Spinning assumes every thread of the pool has a core. When the machine is oversubscribed
//! (several processes, or more threads than cores) a spinning thread can hold the core that
//! the thread it waits for needs, and each fork-join then costs a scheduler time slice. So
//! every spin loop yields its core after [`YIELD_AFTER`] iterations, and the caller waiting
//! for the last worker sleeps on a condvar once its spin budget is spent.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = *const (dyn Fn(usize, usize) + Sync);

struct Shared {
    n_threads: usize,
    generation: AtomicUsize,
    remaining: AtomicUsize,
    job: Mutex<Option<SendJob>>,
    sleeping: AtomicUsize,
    /// Set by [`ThreadPool::rest`]: spinning workers go to sleep at once.
    resting: AtomicBool,
    spin_iters: usize,
    wake: Condvar,
    wake_lock: Mutex<()>,
    /// Set while the caller sleeps waiting for `remaining` to reach zero.
    caller_waiting: AtomicBool,
    done: Condvar,
    done_lock: Mutex<()>,
    shutdown: AtomicBool,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the pointee is Sync and outlives every use (run() waits for all workers).
unsafe impl Send for SendJob {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// Serializes callers: one job at a time.
    run_lock: Mutex<()>,
}

const SPIN_ITERS: usize = 200_000;

/// Spin-waits past this many iterations (a few microseconds) give up the core
/// (`sched_yield`) at each iteration instead of pausing: on a busy machine that lets the
/// thread being waited for run; on an idle one the call returns at once. Measured with
/// `bench/pool-oversubscribed.sh` (two decode processes, each with a pool of all the
/// cores): 128 kept each process at half its speed alone, 2,048 at about 40 %, and pure
/// spinning (no yield) at 13-25 %.
const YIELD_AFTER: usize = 128;

/// A yield counts as this many iterations of the spin budget (a system call against a
/// pause instruction), so a spin-wait lasts about as long with or without yields.
const YIELD_COST: usize = 32;

/// One step of a spin-wait that has made `spins` steps so far; returns the new count.
#[inline]
fn spin_step(spins: usize) -> usize {
    if spins < YIELD_AFTER {
        std::hint::spin_loop();
        spins + 1
    } else {
        std::thread::yield_now();
        spins + YIELD_COST
    }
}

/// A raw output pointer shared with pool threads that write disjoint elements.
#[derive(Clone, Copy)]
pub struct Ptr(pub *mut f32);
// SAFETY: users write disjoint elements from each thread.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    /// A method (not a field access) so closures capture the whole Send+Sync wrapper.
    #[inline]
    pub fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers index within the buffer the pointer came from.
        unsafe { self.0.add(i) }
    }
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all, the caller included.
    pub fn new(n_threads: usize) -> Self {
        Self::with_spin(n_threads, SPIN_ITERS)
    }

    /// As [`ThreadPool::new`], with workers spinning `spin_iters` times on an idle pool
    /// before they sleep (shorter for a pool that shares the cores with another).
    pub fn with_spin(n_threads: usize, spin_iters: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            n_threads,
            generation: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            job: Mutex::new(None),
            sleeping: AtomicUsize::new(0),
            resting: AtomicBool::new(false),
            spin_iters,
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
            caller_waiting: AtomicBool::new(false),
            done: Condvar::new(),
            done_lock: Mutex::new(()),
            shutdown: AtomicBool::new(false),
        });
        let handles = (1..n_threads)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("switchyard-worker-{i}"))
                    .spawn(move || worker(s, i))
                    .expect("spawn worker thread")
            })
            .collect();
        Self {
            shared,
            handles,
            run_lock: Mutex::new(()),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Tell idle workers to stop spinning and sleep until the next [`ThreadPool::run`]:
    /// called before the caller hands the cores to other threads (a plugin's kernels).
    pub fn rest(&self) {
        self.shared.resting.store(true, Ordering::Relaxed);
    }

    /// Run `f(thread_index, n_threads)` on every thread of the pool and wait for all.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.shared.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        let _g = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: we erase the lifetime; every worker finishes with the pointer before
        // `remaining` reaches zero, and we do not return before that.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), Job>(f) };
        *self.shared.job.lock().unwrap() = Some(SendJob(job));
        self.shared.resting.store(false, Ordering::Relaxed);
        self.shared.remaining.store(n - 1, Ordering::SeqCst);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        if self.shared.sleeping.load(Ordering::SeqCst) > 0 {
            let _l = self.shared.wake_lock.lock().unwrap();
            self.shared.wake.notify_all();
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0, n)));
        self.wait_done();
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    }

    /// Wait until every worker has finished the current job: spin (yielding once the wait
    /// is long), then sleep until the last worker's notification.
    fn wait_done(&self) {
        let s = &self.shared;
        let mut spins = 0;
        while s.remaining.load(Ordering::Acquire) != 0 {
            if spins >= s.spin_iters {
                let mut l = s.done_lock.lock().unwrap_or_else(|e| e.into_inner());
                s.caller_waiting.store(true, Ordering::SeqCst);
                // A worker that takes `remaining` to zero after this load sees the flag and
                // notifies under the lock, which this thread holds until it waits.
                while s.remaining.load(Ordering::SeqCst) != 0 {
                    l = s.done.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                s.caller_waiting.store(false, Ordering::SeqCst);
                return;
            }
            spins = spin_step(spins);
        }
    }
}

fn worker(s: Arc<Shared>, idx: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0;
        loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            if spins < s.spin_iters && !s.resting.load(Ordering::Relaxed) {
                spins = spin_step(spins);
            } else {
                let l = s.wake_lock.lock().unwrap();
                s.sleeping.fetch_add(1, Ordering::SeqCst);
                if s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst)
                {
                    let _l = s.wake.wait(l).unwrap();
                }
                s.sleeping.fetch_sub(1, Ordering::SeqCst);
                spins = 0;
            }
        }
        let job = s
            .job
            .lock()
            .unwrap()
            .expect("job set before generation bump");
        // SAFETY: see ThreadPool::run.
        let f = unsafe { &*job.0 };
        // A panic in a worker is reported by the caller's copy of the same job failing too in
        // practice; here we only make sure `remaining` is decremented.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(idx, s.n_threads)));
        if s.remaining.fetch_sub(1, Ordering::SeqCst) == 1
            && s.caller_waiting.load(Ordering::SeqCst)
        {
            let _l = s.done_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.done.notify_one();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _l = self.shared.wake_lock.lock().unwrap();
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_every_index_once() {
        let pool = ThreadPool::new(3);
        for n in [0, 1, 5, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|t, nt| {
                for i in (t..n).step_by(nt) {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn caller_that_sleeps_is_woken_by_the_last_worker() {
        // No spin budget: the caller sleeps on the condvar every round, and workers sleep
        // between rounds, so a lost wake-up on either side would hang this test.
        let pool = ThreadPool::with_spin(4, 0);
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            pool.run(&|t, _| {
                if t == (round % 4) {
                    std::thread::yield_now();
                }
                total.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 8000);
    }
}
