//! vAttention on the device: the KV cache in contiguous virtual memory with physical pages
//! mapped on demand (CUDA virtual memory management).
//!
//! Per layer, K and V each get one virtual reservation of `[max_slots, max_context,
//! kv_heads, head_dim]` bf16; slot `s` owns the contiguous range `s * slot_bytes ..`. As a
//! sequence grows, physical pages (the device's allocation granularity, 2 MiB on Hopper) are
//! created with `cuMemCreate` and mapped behind its range. A released slot keeps its pages
//! for the next sequence (deferred reclamation); pages move from idle slots to a growing one
//! only when the physical budget is reached. The attention kernel reads each sequence's K/V
//! as one contiguous tensor whatever is mapped underneath.
//!
//! Modes ([`KvMode`]):
//! - `Background` (the default): `ensure` maps only what a step needs right now when it is
//!   missing, and asks a mapping thread to keep every live slot one page ahead. Creating and
//!   mapping a page costs ~50 µs and a 7B model has 64 regions, so when a whole batch crosses
//!   a page in the same step, synchronous mapping would stall that step for milliseconds;
//!   the thread does that work while the GPU runs the previous steps. The thread creates,
//!   maps and sets access outside the lock, on a slot range nobody else touches (the slot is
//!   marked busy), so `ensure` never waits on it unless it needs that very page.
//! - `Sync`: the same pages, mapped one page ahead inside `ensure` (deterministic; tests).
//! - `Static`: a slot's whole context is mapped when it is acquired: what a server that
//!   preallocates max-context buffers per sequence does.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use cudarc::driver::sys;

use super::Gpu;
use crate::error::{EngineError, Result};
use crate::kv::{KvAllocator, KvLayout, KvStats};

type Handle = sys::CUmemGenericAllocationHandle;

/// How a [`VmmKv`] backs its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvMode {
    /// Max-context pages mapped at `acquire`.
    Static,
    /// Pages on demand, one page ahead, mapped inside `ensure`.
    Sync,
    /// Pages on demand; a background thread keeps live slots one page ahead.
    Background,
}

/// Page-level counters of a [`VmmKv`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct VmmCounters {
    pub pages_mapped: u64,
    pub pages_unmapped: u64,
    /// Seconds callers waited on mapping (inside `ensure`/`acquire`, including waiting for
    /// the mapping thread to finish a page they needed).
    pub map_secs: f64,
    /// `ensure`/`acquire` calls that had to map (or wait) before returning.
    pub sync_maps: u64,
    /// Seconds the mapping thread spent creating and mapping pages ahead of need.
    pub ahead_secs: f64,
    pub page_bytes: u64,
}

/// Everything that changes, behind the lock shared with the mapping thread.
struct State {
    ordinal: usize,
    page: usize,
    slot_bytes: usize,
    /// 2 * n_layers reservations (K of layer l at 2l, V at 2l + 1).
    regions: Vec<sys::CUdeviceptr>,
    /// Per slot: handles mapped behind it, region-major (`regions.len() * mapped[s]`).
    handles: Vec<Vec<Handle>>,
    /// Per slot: pages mapped in each region.
    mapped: Vec<usize>,
    in_use: Vec<bool>,
    tokens: Vec<usize>,
    /// Per slot: pages per region the mapping thread should reach.
    want: Vec<usize>,
    /// Per slot: the mapping thread is mapping pages past `mapped[s]`.
    busy: Vec<bool>,
    /// Physical pages created and not mapped anywhere.
    pool: Vec<Handle>,
    /// Pages created (or being created by the thread).
    created: usize,
    budget_pages: usize,
    counters: VmmCounters,
    shutdown: bool,
}

// SAFETY: driver handles and device addresses, only used under the lock.
unsafe impl Send for State {}

type Shared = Arc<(Mutex<State>, Condvar)>;

pub struct VmmKv {
    gpu: Arc<Gpu>,
    layout: KvLayout,
    mode: KvMode,
    page: usize,
    slot_bytes: usize,
    regions: Vec<sys::CUdeviceptr>,
    shared: Shared,
    worker: Option<JoinHandle<()>>,
}

// SAFETY: device addresses; the mutable state is behind the mutex.
unsafe impl Send for VmmKv {}

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(EngineError::Kv(format!("CUDA {what}: {r:?}")))
    }
}

/// Physical-memory properties of one page on device `ordinal`.
fn prop(ordinal: usize) -> sys::CUmemAllocationProp {
    // SAFETY: a plain C struct; all-zero is a valid starting value.
    let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    p.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = ordinal as i32;
    p
}

fn create_page(ordinal: usize, page: usize) -> Option<Handle> {
    let mut h = 0;
    let p = prop(ordinal);
    // SAFETY: creating physical memory of one page.
    let r = unsafe { sys::cuMemCreate(&mut h, page, &p, 0) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(h)
}

/// Map `hs` (one page each) at `at, at + page, ..` and make them readable and writable.
///
/// # Safety
/// The range must lie in a reservation of ours, page-aligned and unmapped.
unsafe fn map_run(ordinal: usize, page: usize, at: u64, hs: &[Handle]) -> Result<()> {
    for (j, &h) in hs.iter().enumerate() {
        // SAFETY: per the contract.
        let r = unsafe { sys::cuMemMap(at + (j * page) as u64, page, 0, h, 0) };
        if let Err(e) = check("map", r) {
            if j > 0 {
                // SAFETY: the pages mapped just above.
                unsafe { sys::cuMemUnmap(at, j * page) };
            }
            return Err(e);
        }
    }
    // SAFETY: a plain C struct, then the range just mapped.
    unsafe {
        let mut d: sys::CUmemAccessDesc = std::mem::zeroed();
        d.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        d.location.id = ordinal as i32;
        d.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        let r = sys::cuMemSetAccess(at, hs.len() * page, &d, 1);
        if let Err(e) = check("set access", r) {
            sys::cuMemUnmap(at, hs.len() * page);
            return Err(e);
        }
    }
    Ok(())
}

impl State {
    fn nreg(&self) -> usize {
        self.regions.len()
    }

    fn full(&self) -> usize {
        self.slot_bytes / self.page
    }

    fn at(&self, ri: usize, s: usize, p: usize) -> u64 {
        self.regions[ri] + (s * self.slot_bytes + p * self.page) as u64
    }

    fn mapped_total(&self) -> usize {
        self.mapped.iter().sum::<usize>() * self.nreg()
    }

    /// Pages that could back new mappings: the pool, the unused budget, idle slots' pages.
    fn available(&self, except: usize) -> usize {
        let idle: usize = (0..self.in_use.len())
            .filter(|&s| s != except && !self.in_use[s] && !self.busy[s])
            .map(|s| self.mapped[s] * self.nreg())
            .sum();
        self.pool.len() + self.budget_pages.saturating_sub(self.created) + idle
    }

    fn unmap_slot(&mut self, s: usize) -> Result<()> {
        let per = self.mapped[s];
        if per == 0 {
            return Ok(());
        }
        for ri in 0..self.nreg() {
            // SAFETY: these pages were mapped by us.
            check("unmap", unsafe {
                sys::cuMemUnmap(self.at(ri, s, 0), per * self.page)
            })?;
            let hs = &self.handles[s][ri * per..(ri + 1) * per];
            self.pool.extend_from_slice(hs);
        }
        self.counters.pages_unmapped += (per * self.nreg()) as u64;
        self.handles[s].clear();
        self.mapped[s] = 0;
        self.want[s] = 0;
        Ok(())
    }

    fn take_page(&mut self, growing: usize) -> Result<Handle> {
        if let Some(h) = self.pool.pop() {
            return Ok(h);
        }
        if self.created < self.budget_pages {
            if let Some(h) = create_page(self.ordinal, self.page) {
                self.created += 1;
                return Ok(h);
            }
            // Device memory is full before the budget: stop creating.
            self.budget_pages = self.created;
        }
        // Reclaim an idle slot's pages (the one holding the most).
        let victim = (0..self.in_use.len())
            .filter(|&s| s != growing && !self.in_use[s] && !self.busy[s] && self.mapped[s] > 0)
            .max_by_key(|&s| self.mapped[s]);
        match victim {
            Some(v) => {
                self.unmap_slot(v)?;
                Ok(self.pool.pop().expect("pages were returned"))
            }
            None => Err(self.exhausted()),
        }
    }

    fn exhausted(&self) -> EngineError {
        EngineError::Kv(format!(
            "out of KV-cache memory: {} of {} pages of {} KiB in use by live sequences",
            self.mapped_total(),
            self.budget_pages,
            self.page >> 10
        ))
    }

    /// Append `fresh` (region-major, `k` pages per region) after slot `s`'s `old` pages.
    fn adopt(&mut self, s: usize, old: usize, k: usize, fresh: &[Handle]) {
        let nreg = self.nreg();
        let mut all = Vec::with_capacity(nreg * (old + k));
        for ri in 0..nreg {
            all.extend_from_slice(&self.handles[s][ri * old..(ri + 1) * old]);
            all.extend_from_slice(&fresh[ri * k..(ri + 1) * k]);
        }
        self.handles[s] = all;
        self.mapped[s] = old + k;
        self.counters.pages_mapped += (nreg * k) as u64;
    }

    /// Map slot `s` up to `per` pages in every region, here and now (under the lock).
    fn map_to(&mut self, s: usize, per: usize) -> Result<()> {
        let old = self.mapped[s];
        if per <= old {
            return Ok(());
        }
        let (nreg, k) = (self.nreg(), per - old);
        let mut fresh: Vec<Handle> = Vec::with_capacity(nreg * k);
        for _ in 0..nreg * k {
            match self.take_page(s) {
                Ok(h) => fresh.push(h),
                Err(e) => {
                    self.pool.extend_from_slice(&fresh);
                    return Err(e);
                }
            }
        }
        for ri in 0..nreg {
            // SAFETY: past the slot's mapped prefix, inside our reservation.
            if let Err(e) = unsafe {
                map_run(
                    self.ordinal,
                    self.page,
                    self.at(ri, s, old),
                    &fresh[ri * k..(ri + 1) * k],
                )
            } {
                for rj in 0..ri {
                    // SAFETY: mapped just above.
                    unsafe { sys::cuMemUnmap(self.at(rj, s, old), k * self.page) };
                }
                self.pool.extend_from_slice(&fresh);
                return Err(e);
            }
        }
        self.adopt(s, old, k, &fresh);
        Ok(())
    }

    /// The next slot the mapping thread should grow.
    fn ahead_work(&self) -> Option<usize> {
        (0..self.mapped.len())
            .find(|&s| self.in_use[s] && !self.busy[s] && self.want[s] > self.mapped[s])
    }
}

/// The mapping thread: one page per region at a time for slots whose `want` is ahead of
/// what is mapped, within the budget (it never reclaims; `ensure` does that when it must).
fn mapper(sh: Shared, gpu: Arc<Gpu>) {
    if let Err(e) = gpu.bind() {
        eprintln!("switchyard: KV mapping thread: {e}; mapping stays in the caller");
        return;
    }
    let (m, cv) = &*sh;
    let lock = || m.lock().unwrap_or_else(|e| e.into_inner());
    let mut g = lock();
    loop {
        if g.shutdown {
            return;
        }
        let Some(s) = g.ahead_work() else {
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        // Claim pages for one more page in every region: from the pool, else new ones.
        let nreg = g.nreg();
        let mut pooled = Vec::with_capacity(nreg);
        while pooled.len() < nreg {
            match g.pool.pop() {
                Some(h) => pooled.push(h),
                None => break,
            }
        }
        let create = nreg - pooled.len();
        if g.created + create > g.budget_pages {
            g.pool.extend_from_slice(&pooled);
            g.want[s] = g.mapped[s];
            continue;
        }
        g.created += create;
        g.busy[s] = true;
        let old = g.mapped[s];
        let (ordinal, page) = (g.ordinal, g.page);
        let ats: Vec<u64> = (0..nreg).map(|ri| g.at(ri, s, old)).collect();
        drop(g);

        let t = Instant::now();
        let mut fresh = pooled;
        let mut ok = true;
        for _ in 0..create {
            match create_page(ordinal, page) {
                Some(h) => fresh.push(h),
                None => {
                    ok = false;
                    break;
                }
            }
        }
        let mut done = 0;
        if ok {
            for (ri, &at) in ats.iter().enumerate() {
                // SAFETY: the busy slot's range past its mapped prefix is ours alone.
                if unsafe { map_run(ordinal, page, at, &fresh[ri..ri + 1]) }.is_err() {
                    ok = false;
                    break;
                }
                done += 1;
            }
        }
        let secs = t.elapsed().as_secs_f64();

        g = lock();
        g.busy[s] = false;
        g.counters.ahead_secs += secs;
        if ok {
            g.adopt(s, old, 1, &fresh);
        } else {
            for &at in &ats[..done] {
                // SAFETY: mapped above by this thread.
                unsafe { sys::cuMemUnmap(at, page) };
            }
            let made = fresh.len() - (nreg - create);
            g.created -= create - made;
            if made < create {
                // The device is full before the budget: stop creating.
                g.budget_pages = g.created;
            }
            g.pool.extend_from_slice(&fresh);
            g.want[s] = g.mapped[s];
        }
        cv.notify_all();
    }
}

impl VmmKv {
    /// Reserve the address space for `layout` (bf16 K/V) with a physical budget of
    /// `budget_bytes` (rounded down to pages).
    pub fn new(gpu: Arc<Gpu>, layout: KvLayout, budget_bytes: usize, mode: KvMode) -> Result<Self> {
        gpu.bind()?;
        let page = {
            let p = prop(gpu.ordinal);
            let mut g = 0usize;
            // SAFETY: valid out pointer and properties.
            check("allocation granularity", unsafe {
                sys::cuMemGetAllocationGranularity(
                    &mut g,
                    &p,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                )
            })?;
            g.max(1)
        };
        let per_slot = layout.max_context * layout.token_elems() * 2;
        let slot_bytes = per_slot.div_ceil(page) * page;
        let mut regions = Vec::with_capacity(2 * layout.n_layers);
        for _ in 0..2 * layout.n_layers {
            let mut ptr = 0;
            // SAFETY: reserves address space only.
            let r = unsafe {
                sys::cuMemAddressReserve(&mut ptr, slot_bytes * layout.max_slots, page, 0, 0)
            };
            if let Err(e) = check("address reservation", r) {
                for &p in &regions {
                    // SAFETY: reserved just above, nothing mapped.
                    unsafe { sys::cuMemAddressFree(p, slot_bytes * layout.max_slots) };
                }
                return Err(e);
            }
            regions.push(ptr);
        }
        let n = layout.max_slots;
        let state = State {
            ordinal: gpu.ordinal,
            page,
            slot_bytes,
            regions: regions.clone(),
            handles: vec![Vec::new(); n],
            mapped: vec![0; n],
            in_use: vec![false; n],
            tokens: vec![0; n],
            want: vec![0; n],
            busy: vec![false; n],
            pool: Vec::new(),
            created: 0,
            budget_pages: budget_bytes / page,
            counters: VmmCounters {
                page_bytes: page as u64,
                ..Default::default()
            },
            shutdown: false,
        };
        let shared: Shared = Arc::new((Mutex::new(state), Condvar::new()));
        let mut kv = Self {
            gpu: gpu.clone(),
            layout,
            mode,
            page,
            slot_bytes,
            regions,
            shared: shared.clone(),
            worker: None,
        };
        if mode == KvMode::Background {
            let w = std::thread::Builder::new()
                .name("vattention-cuda-map".into())
                .spawn(move || mapper(shared, gpu))
                .map_err(|e| EngineError::Kv(format!("starting the KV mapping thread: {e}")))?;
            kv.worker = Some(w);
        }
        Ok(kv)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn mode(&self) -> KvMode {
        self.mode
    }

    pub fn counters(&self) -> VmmCounters {
        self.lock().counters
    }

    pub fn page_bytes(&self) -> usize {
        self.page
    }

    /// Pages mapped per region for `slot`.
    pub fn mapped_pages(&self, slot: usize) -> usize {
        self.lock().mapped[slot]
    }

    /// Wait until the mapping thread has nothing left to do (tests, benchmarks).
    pub fn settle(&self) {
        let (m, cv) = &*self.shared;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        while g.ahead_work().is_some() || g.busy.iter().any(|&b| b) {
            if self.worker.is_none() {
                return;
            }
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Pages a slot needs per region to hold `tokens`.
    fn pages_for(&self, tokens: usize) -> usize {
        (tokens * self.layout.token_elems() * 2)
            .div_ceil(self.page)
            .min(self.slot_bytes / self.page)
    }
}

impl KvAllocator for VmmKv {
    fn layout(&self) -> KvLayout {
        self.layout
    }
    fn acquire(&mut self) -> Result<usize> {
        let mode = self.mode;
        let mut g = self.lock();
        // Prefer an idle slot that still has pages mapped (deferred reclamation).
        let s = (0..g.in_use.len())
            .filter(|&s| !g.in_use[s])
            .max_by_key(|&s| (g.mapped[s], std::cmp::Reverse(s)))
            .ok_or_else(|| {
                EngineError::Kv(format!(
                    "all {} sequence slots are in use",
                    self.layout.max_slots
                ))
            })?;
        if mode == KvMode::Static {
            let full = g.full();
            if g.mapped[s] < full && g.available(s) < g.nreg() * (full - g.mapped[s]) {
                return Err(g.exhausted());
            }
            let t = Instant::now();
            self.gpu.bind()?;
            g.map_to(s, full)?;
            g.counters.map_secs += t.elapsed().as_secs_f64();
            g.counters.sync_maps += 1;
        }
        g.in_use[s] = true;
        g.tokens[s] = 0;
        g.want[s] = 0;
        Ok(s)
    }
    fn ensure(&mut self, slot: usize, n_tokens: usize) -> Result<()> {
        if n_tokens > self.layout.max_context {
            return Err(EngineError::Kv(format!(
                "sequence needs {n_tokens} tokens but the context is {}",
                self.layout.max_context
            )));
        }
        let need = self.pages_for(n_tokens).max(1);
        let (mode, cv) = (self.mode, &self.shared.1);
        let mut g = self.lock();
        if !g.in_use.get(slot).copied().unwrap_or(false) {
            return Err(EngineError::Kv(format!("slot {slot} is not in use")));
        }
        let full = g.full();
        let ahead = (need + 1).min(full);
        if need > g.mapped[slot] {
            let t = Instant::now();
            // The thread may be mapping the very page we need: wait for it.
            while g.busy[slot] {
                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            if need > g.mapped[slot] {
                let nreg = g.nreg();
                if g.available(slot) < nreg * (need - g.mapped[slot]) {
                    return Err(g.exhausted());
                }
                self.gpu.bind()?;
                // Sync mode maps one page ahead of need here when it is there to take;
                // background mode leaves that to the thread.
                let per = if mode == KvMode::Sync
                    && g.available(slot) >= nreg * (ahead - g.mapped[slot])
                {
                    ahead
                } else {
                    need
                };
                g.map_to(slot, per)?;
            }
            g.counters.map_secs += t.elapsed().as_secs_f64();
            g.counters.sync_maps += 1;
        }
        g.tokens[slot] = g.tokens[slot].max(n_tokens);
        if mode == KvMode::Background && ahead > g.mapped[slot] && ahead > g.want[slot] {
            g.want[slot] = ahead;
            drop(g);
            cv.notify_all();
        }
        Ok(())
    }
    fn capacity(&self, slot: usize) -> usize {
        (self.lock().mapped[slot] * self.page / (self.layout.token_elems() * 2))
            .min(self.layout.max_context)
    }
    fn release(&mut self, slot: usize) {
        let mut g = self.lock();
        g.in_use[slot] = false;
        g.tokens[slot] = 0;
        g.want[slot] = 0;
    }
    fn kv(&mut self, layer: usize, slot: usize) -> (*mut f32, *mut f32) {
        let off = (slot * self.slot_bytes) as u64;
        (
            (self.regions[2 * layer] + off) as usize as *mut f32,
            (self.regions[2 * layer + 1] + off) as usize as *mut f32,
        )
    }
    fn stats(&self) -> KvStats {
        let g = self.lock();
        let per_token = (2 * self.layout.n_layers * self.layout.token_elems() * 2) as u64;
        KvStats {
            reserved_bytes: (self.regions.len() * self.slot_bytes * self.layout.max_slots) as u64,
            mapped_bytes: (g.mapped_total() * self.page) as u64,
            used_bytes: g.tokens.iter().sum::<usize>() as u64 * per_token,
            slots_in_use: g.in_use.iter().filter(|&&u| u).count(),
            pages: Some(crate::kv::PageStats {
                page_bytes: self.page as u64,
                mapped: g.counters.pages_mapped,
                unmapped: g.counters.pages_unmapped,
                sync_map_ns: (g.counters.map_secs * 1e9) as u64,
                sync_maps: g.counters.sync_maps,
                ahead_map_ns: (g.counters.ahead_secs * 1e9) as u64,
            }),
        }
    }
    fn name(&self) -> &str {
        match self.mode {
            KvMode::Static => "cuda-static",
            KvMode::Sync => "vattention-cuda-sync",
            KvMode::Background => "vattention-cuda",
        }
    }
}

impl Drop for VmmKv {
    fn drop(&mut self) {
        self.lock().shutdown = true;
        self.shared.1.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        let _ = self.gpu.bind();
        let _ = self.gpu.sync();
        let mut g = self.lock();
        for s in 0..g.mapped.len() {
            let _ = g.unmap_slot(s);
        }
        for &h in &g.pool {
            // SAFETY: unmapped handles we created.
            unsafe {
                sys::cuMemRelease(h);
            }
        }
        for &r in &self.regions {
            // SAFETY: our reservations, now empty.
            unsafe {
                sys::cuMemAddressFree(r, self.slot_bytes * self.layout.max_slots);
            }
        }
    }
}
