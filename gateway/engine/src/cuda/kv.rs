//! vAttention on the device: the KV cache in contiguous virtual memory with physical pages
//! mapped on demand (CUDA virtual memory management).
//!
//! Per layer, K and V each get one virtual reservation of `[max_slots, max_context,
//! kv_heads, head_dim]` bf16; slot `s` owns the contiguous range `s * slot_bytes ..`. As a
//! sequence grows, physical pages (the device's allocation granularity, 2 MiB on Hopper) are
//! created with `cuMemCreate` and mapped behind its range, one page ahead of need. A released
//! slot keeps its pages for the next sequence (deferred reclamation); pages move from idle
//! slots to a growing one only when the physical budget is reached. The attention kernel
//! reads each sequence's K/V as one contiguous tensor whatever is mapped underneath.
//!
//! `static` mode maps a slot's whole context when it is acquired: what a server that
//! preallocates max-context buffers per sequence does.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys;

use super::Gpu;
use crate::error::{EngineError, Result};
use crate::kv::{KvAllocator, KvLayout, KvStats};

type Handle = sys::CUmemGenericAllocationHandle;

/// Page-level counters of a [`VmmKv`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct VmmCounters {
    pub pages_mapped: u64,
    pub pages_unmapped: u64,
    /// Seconds spent creating and mapping pages (inside `ensure`/`acquire`).
    pub map_secs: f64,
    pub page_bytes: u64,
}

pub struct VmmKv {
    gpu: Arc<Gpu>,
    layout: KvLayout,
    static_alloc: bool,
    page: usize,
    /// Bytes of one slot in one region (a multiple of `page`).
    slot_bytes: usize,
    /// 2 * n_layers reservations (K of layer l at 2l, V at 2l + 1).
    regions: Vec<sys::CUdeviceptr>,
    /// Per slot: handles mapped behind it, region-major (`regions.len() * mapped[s]`).
    handles: Vec<Vec<Handle>>,
    /// Per slot: pages mapped in each region.
    mapped: Vec<usize>,
    in_use: Vec<bool>,
    tokens: Vec<usize>,
    /// Physical pages created and not mapped anywhere.
    pool: Vec<Handle>,
    created: usize,
    budget_pages: usize,
    counters: VmmCounters,
}

// SAFETY: driver handles; used from one thread at a time (the engine's).
unsafe impl Send for VmmKv {}

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(EngineError::Kv(format!("CUDA {what}: {r:?}")))
    }
}

impl VmmKv {
    /// Reserve the address space for `layout` (bf16 K/V) with a physical budget of
    /// `budget_bytes` (rounded down to pages).
    pub fn new(
        gpu: Arc<Gpu>,
        layout: KvLayout,
        budget_bytes: usize,
        static_alloc: bool,
    ) -> Result<Self> {
        gpu.bind()?;
        // SAFETY: zeroed props are then filled with the fields cuMemCreate reads.
        let page = unsafe {
            let p = Self::prop(gpu.ordinal);
            let mut g = 0usize;
            check(
                "allocation granularity",
                sys::cuMemGetAllocationGranularity(
                    &mut g,
                    &p,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                ),
            )?;
            g.max(1)
        };
        let per_slot = layout.max_context * layout.token_elems() * 2;
        let slot_bytes = per_slot.div_ceil(page) * page;
        let mut regions = Vec::with_capacity(2 * layout.n_layers);
        for _ in 0..2 * layout.n_layers {
            let mut ptr = 0;
            // SAFETY: reserves address space only.
            check("address reservation", unsafe {
                sys::cuMemAddressReserve(&mut ptr, slot_bytes * layout.max_slots, page, 0, 0)
            })?;
            regions.push(ptr);
        }
        let n = layout.max_slots;
        Ok(Self {
            gpu,
            layout,
            static_alloc,
            page,
            slot_bytes,
            regions,
            handles: vec![Vec::new(); n],
            mapped: vec![0; n],
            in_use: vec![false; n],
            tokens: vec![0; n],
            pool: Vec::new(),
            created: 0,
            budget_pages: budget_bytes / page,
            counters: VmmCounters {
                page_bytes: page as u64,
                ..Default::default()
            },
        })
    }

    unsafe fn prop(ordinal: usize) -> sys::CUmemAllocationProp {
        // SAFETY: a plain C struct; all-zero is a valid starting value.
        let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        p.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        p.location.id = ordinal as i32;
        p
    }

    pub fn counters(&self) -> VmmCounters {
        self.counters
    }

    pub fn page_bytes(&self) -> usize {
        self.page
    }

    /// Pages a slot needs per region to hold `tokens`.
    fn pages_for(&self, tokens: usize) -> usize {
        (tokens * self.layout.token_elems() * 2)
            .div_ceil(self.page)
            .min(self.slot_bytes / self.page)
    }

    fn mapped_total(&self) -> usize {
        self.mapped.iter().sum::<usize>() * self.regions.len()
    }

    /// Pages that could back new mappings: the pool, the unused budget, idle slots' pages.
    fn available(&self, except: usize) -> usize {
        let idle: usize = (0..self.in_use.len())
            .filter(|&s| s != except && !self.in_use[s])
            .map(|s| self.mapped[s] * self.regions.len())
            .sum();
        self.pool.len() + self.budget_pages.saturating_sub(self.created) + idle
    }

    fn unmap_slot(&mut self, s: usize) -> Result<()> {
        let per = self.mapped[s];
        if per == 0 {
            return Ok(());
        }
        for (ri, &base) in self.regions.iter().enumerate() {
            let at = base + (s * self.slot_bytes) as u64;
            // SAFETY: these pages were mapped by map_pages.
            check("unmap", unsafe { sys::cuMemUnmap(at, per * self.page) })?;
            let hs = &self.handles[s][ri * per..(ri + 1) * per];
            self.pool.extend_from_slice(hs);
        }
        self.counters.pages_unmapped += (per * self.regions.len()) as u64;
        self.handles[s].clear();
        self.mapped[s] = 0;
        Ok(())
    }

    fn take_page(&mut self, growing: usize) -> Result<Handle> {
        if let Some(h) = self.pool.pop() {
            return Ok(h);
        }
        if self.created < self.budget_pages {
            let mut h = 0;
            // SAFETY: creating physical memory of one page.
            let r = unsafe {
                let p = Self::prop(self.gpu.ordinal);
                sys::cuMemCreate(&mut h, self.page, &p, 0)
            };
            if r == sys::CUresult::CUDA_SUCCESS {
                self.created += 1;
                return Ok(h);
            }
            // Device memory is full before the budget: stop creating.
            self.budget_pages = self.created;
        }
        // Reclaim an idle slot's pages (the one holding the most).
        let victim = (0..self.in_use.len())
            .filter(|&s| s != growing && !self.in_use[s] && self.mapped[s] > 0)
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

    /// Map slot `s` up to `per` pages in every region.
    fn map_to(&mut self, s: usize, per: usize) -> Result<()> {
        let old = self.mapped[s];
        if per <= old {
            return Ok(());
        }
        let t = Instant::now();
        let nreg = self.regions.len();
        // New handles, region-major, then rebuild the slot's handle list.
        let mut fresh: Vec<Handle> = Vec::with_capacity(nreg * (per - old));
        for _ in 0..nreg * (per - old) {
            fresh.push(self.take_page(s)?);
        }
        let mut all = Vec::with_capacity(nreg * per);
        for ri in 0..nreg {
            all.extend_from_slice(&self.handles[s][ri * old..(ri + 1) * old]);
            let new = &fresh[ri * (per - old)..(ri + 1) * (per - old)];
            for (j, &h) in new.iter().enumerate() {
                let at = self.regions[ri] + (s * self.slot_bytes + (old + j) * self.page) as u64;
                // SAFETY: `at` lies in our reservation, page-aligned and unmapped.
                unsafe {
                    check("map", sys::cuMemMap(at, self.page, 0, h, 0))?;
                }
                all.push(h);
            }
            let at = self.regions[ri] + (s * self.slot_bytes + old * self.page) as u64;
            // SAFETY: the range was just mapped.
            unsafe {
                let mut d: sys::CUmemAccessDesc = std::mem::zeroed();
                d.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
                d.location.id = self.gpu.ordinal as i32;
                d.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
                check(
                    "set access",
                    sys::cuMemSetAccess(at, (per - old) * self.page, &d, 1),
                )?;
            }
        }
        self.handles[s] = all;
        self.mapped[s] = per;
        self.counters.pages_mapped += (nreg * (per - old)) as u64;
        self.counters.map_secs += t.elapsed().as_secs_f64();
        Ok(())
    }
}

impl KvAllocator for VmmKv {
    fn layout(&self) -> KvLayout {
        self.layout
    }
    fn acquire(&mut self) -> Result<usize> {
        self.gpu.bind()?;
        // Prefer an idle slot that still has pages mapped (deferred reclamation).
        let s = (0..self.in_use.len())
            .filter(|&s| !self.in_use[s])
            .max_by_key(|&s| (self.mapped[s], std::cmp::Reverse(s)))
            .ok_or_else(|| {
                EngineError::Kv(format!(
                    "all {} sequence slots are in use",
                    self.layout.max_slots
                ))
            })?;
        if self.static_alloc {
            let full = self.slot_bytes / self.page;
            if self.mapped[s] < full
                && self.available(s) < self.regions.len() * (full - self.mapped[s])
            {
                return Err(self.exhausted());
            }
            self.map_to(s, full)?;
        }
        self.in_use[s] = true;
        self.tokens[s] = 0;
        Ok(s)
    }
    fn ensure(&mut self, slot: usize, n_tokens: usize) -> Result<()> {
        if n_tokens > self.layout.max_context {
            return Err(EngineError::Kv(format!(
                "sequence needs {n_tokens} tokens but the context is {}",
                self.layout.max_context
            )));
        }
        if !self.in_use[slot] {
            return Err(EngineError::Kv(format!("slot {slot} is not in use")));
        }
        let need = self.pages_for(n_tokens).max(1);
        if need > self.mapped[slot] {
            self.gpu.bind()?;
            let nreg = self.regions.len();
            if self.available(slot) < nreg * (need - self.mapped[slot]) {
                return Err(self.exhausted());
            }
            // One page ahead of need when it is there to take.
            let ahead = (need + 1).min(self.slot_bytes / self.page);
            let per = if self.available(slot) >= nreg * (ahead - self.mapped[slot]) {
                ahead
            } else {
                need
            };
            self.map_to(slot, per)?;
        }
        self.tokens[slot] = self.tokens[slot].max(n_tokens);
        Ok(())
    }
    fn capacity(&self, slot: usize) -> usize {
        (self.mapped[slot] * self.page / (self.layout.token_elems() * 2))
            .min(self.layout.max_context)
    }
    fn release(&mut self, slot: usize) {
        self.in_use[slot] = false;
        self.tokens[slot] = 0;
    }
    fn kv(&mut self, layer: usize, slot: usize) -> (*mut f32, *mut f32) {
        let off = (slot * self.slot_bytes) as u64;
        (
            (self.regions[2 * layer] + off) as usize as *mut f32,
            (self.regions[2 * layer + 1] + off) as usize as *mut f32,
        )
    }
    fn stats(&self) -> KvStats {
        let per_token = (2 * self.layout.n_layers * self.layout.token_elems() * 2) as u64;
        KvStats {
            reserved_bytes: (self.regions.len() * self.slot_bytes * self.layout.max_slots) as u64,
            mapped_bytes: (self.mapped_total() * self.page) as u64,
            used_bytes: self.tokens.iter().sum::<usize>() as u64 * per_token,
            slots_in_use: self.in_use.iter().filter(|&&u| u).count(),
        }
    }
    fn name(&self) -> &str {
        if self.static_alloc {
            "cuda-static"
        } else {
            "vattention-cuda"
        }
    }
}

impl Drop for VmmKv {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        let _ = self.gpu.sync();
        for s in 0..self.mapped.len() {
            let _ = self.unmap_slot(s);
        }
        for &h in &self.pool {
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
