//! A small persistent thread pool for the forward pass.
//!
//! Matrix products of a small model take tens of microseconds, so the pool's dispatch cost
//! matters: workers spin briefly on a generation counter before sleeping on a condvar, and
//! the calling thread does its own share of the work instead of waiting idle.

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
        while self.shared.remaining.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        if let Err(p) = r {
            std::panic::resume_unwind(p);
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
            spins += 1;
            if spins < s.spin_iters && !s.resting.load(Ordering::Relaxed) {
                std::hint::spin_loop();
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
        s.remaining.fetch_sub(1, Ordering::Release);
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
}
