//! `vattention`: the vAttention KV-cache allocator (Prabhu et al., ASPLOS 2025) on the CPU.
//!
//! - For every layer, K and V each get **one virtual reservation** of
//!   `[max_slots, max_context, kv_heads, head_dim]` f32 (`mmap(PROT_NONE)`, no memory behind
//!   it). Slot r owns the contiguous range `r·slot_bytes …`, so attention reads a sequence's
//!   K/V as one plain tensor per layer, whatever is mapped underneath.
//! - **Physical pages on demand:** as a sequence grows, the pages covering its tokens are
//!   committed (`mprotect(READ|WRITE)`, then touched so the page faults happen here, not in
//!   the attention kernel). One "page" is the configured size in every one of the
//!   2·n_layers reservations at once.
//! - **Deferred reclamation:** a freed slot keeps up to `retain_pages` of its pages; `acquire`
//!   hands out the free slot with the most pages so the next request reuses them. Those pages
//!   go back (`madvise(MADV_DONTNEED)` + `mprotect(PROT_NONE)`) when the physical budget
//!   needs them for a live sequence.
//! - **Mapping ahead:** after each `ensure`, a background thread maps `ahead_pages` beyond the
//!   sequence's need, so decode steps find their next page already mapped.
//! - **Budget:** `budget_mb` caps physical KV memory. When it is spent and nothing can be
//!   reclaimed, `acquire` / `ensure` fail with `EXHAUSTED` and a message saying so; the
//!   scheduler keeps the request waiting or fails that sequence alone.
//!
//! Configuration (`key = value` lines): `page_kb` (4 … 2048, default 64), `budget_mb` (0 = no
//! cap, default), `ahead_pages` (default 1), `retain_pages` (default 8, or `all`), `prefault`
//! (true), `background` (true).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use switchyard_plugin::{
    export_kv_allocator, KvAllocator, KvLayout, KvStats, PageStats, PluginError, PluginResult,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub page_bytes: usize,
    /// Cap on mapped bytes (all layers, K and V); `None` = no cap.
    pub budget_bytes: Option<usize>,
    pub ahead_pages: usize,
    pub prefault: bool,
    pub background: bool,
    /// Page sets a freed slot keeps for its next sequence (`usize::MAX` = all of them).
    pub retain_pages: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            page_bytes: 64 << 10,
            budget_bytes: None,
            ahead_pages: 1,
            prefault: true,
            background: true,
            retain_pages: 8,
        }
    }
}

pub fn parse_config(text: &str) -> Result<Config, String> {
    let mut c = Config::default();
    for (n, k, v) in switchyard_plugin::config_pairs(text)? {
        let num = || -> Result<usize, String> {
            v.parse()
                .map_err(|_| format!("line {n}: {k} must be a non-negative integer, got {v:?}"))
        };
        let flag = || -> Result<bool, String> {
            v.parse()
                .map_err(|_| format!("line {n}: {k} must be true or false, got {v:?}"))
        };
        match k {
            "page_kb" => {
                let kb = num()?;
                if !(4..=2048).contains(&kb) || !kb.is_power_of_two() {
                    return Err(format!(
                        "page_kb must be a power of two from 4 to 2048, got {kb}"
                    ));
                }
                c.page_bytes = kb << 10;
            }
            "budget_mb" => c.budget_bytes = Some(num()? << 20).filter(|&b| b > 0),
            "ahead_pages" => c.ahead_pages = num()?,
            "prefault" => c.prefault = flag()?,
            "retain_pages" if v == "all" => c.retain_pages = usize::MAX,
            "retain_pages" => c.retain_pages = num()?,
            "background" => c.background = flag()?,
            other => {
                return Err(format!(
                    "line {n}: unknown key {other:?} (known: page_kb, budget_mb, ahead_pages, prefault, background, retain_pages)"
                ))
            }
        }
    }
    Ok(c)
}

/// Counters of mapping work (beyond the ABI's [`KvStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Page sets (one page in each of the 2·n_layers reservations) mapped / unmapped.
    pub pages_mapped: u64,
    pub pages_unmapped: u64,
    /// Time spent mapping, in the caller (`ensure` had to wait) and on the background thread.
    pub sync_map_ns: u64,
    pub ahead_map_ns: u64,
    /// `ensure` calls that had to map before returning.
    pub sync_maps: u64,
}

struct Inner {
    layout: KvLayout,
    cfg: Config,
    token_bytes: usize,
    slot_bytes: usize,
    pages_per_slot: usize,
    /// Base address of each reservation: K of layer l at 2l, V at 2l + 1.
    regions: Vec<usize>,
    region_bytes: usize,
    /// Page sets mapped per slot (a prefix of the slot's range).
    mapped: Vec<usize>,
    in_use: Vec<bool>,
    used_tokens: Vec<usize>,
    /// Page sets the background thread should have mapped per slot.
    want: Vec<usize>,
    budget_pages: usize,
    total_mapped: usize,
    counters: Counters,
    shutdown: bool,
}

// SAFETY: the addresses are only used through mmap'd memory this struct owns.
unsafe impl Send for Inner {}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

impl Inner {
    fn page_set_bytes(&self) -> usize {
        self.cfg.page_bytes * self.regions.len()
    }

    /// Commit page sets `from..to` of `slot` in every reservation.
    fn map(&mut self, slot: usize, from: usize, to: usize) -> Result<(), String> {
        if from >= to {
            return Ok(());
        }
        let page = self.cfg.page_bytes;
        for &base in &self.regions {
            let addr = base + slot * self.slot_bytes + from * page;
            let len = (to - from) * page;
            // SAFETY: the range lies inside our reservation.
            let r = unsafe {
                libc::mprotect(
                    addr as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if r != 0 {
                return Err(os_err("mprotect(READ|WRITE)"));
            }
            if self.cfg.prefault {
                // Take the page faults here: write each OS page once (fresh pages are zero).
                let mut p = addr;
                while p < addr + len {
                    // SAFETY: just made writable, inside the reservation.
                    unsafe { std::ptr::write_volatile(p as *mut u8, 0) };
                    p += 4096;
                }
            }
        }
        self.mapped[slot] = to;
        self.total_mapped += to - from;
        self.counters.pages_mapped += (to - from) as u64;
        Ok(())
    }

    /// Return page sets `from..` of `slot` to the system.
    fn unmap(&mut self, slot: usize, from: usize) {
        let to = self.mapped[slot];
        if from >= to {
            return;
        }
        let page = self.cfg.page_bytes;
        for &base in &self.regions {
            let addr = base + slot * self.slot_bytes + from * page;
            let len = (to - from) * page;
            // SAFETY: inside our reservation; the slot is free or shrinking past its tokens.
            unsafe {
                libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED);
                libc::mprotect(addr as *mut libc::c_void, len, libc::PROT_NONE);
            }
        }
        self.mapped[slot] = from;
        self.total_mapped -= to - from;
        self.counters.pages_unmapped += (to - from) as u64;
    }

    /// Page sets that free slots hold (reclaimable), excluding `except`.
    fn reclaimable(&self, except: usize) -> usize {
        (0..self.mapped.len())
            .filter(|&s| s != except && !self.in_use[s])
            .map(|s| self.mapped[s])
            .sum()
    }

    /// Make room under the budget for `n` more page sets, reclaiming free slots' pages.
    fn room(&mut self, n: usize, except: usize) -> Result<(), String> {
        if self.total_mapped + n <= self.budget_pages {
            return Ok(());
        }
        if self.total_mapped + n > self.budget_pages + self.reclaimable(except) {
            let mib = |p: usize| (p * self.page_set_bytes()) as f64 / (1 << 20) as f64;
            return Err(format!(
                "KV cache physical budget exhausted: {:.1} MiB of {:.1} MiB mapped by {} live sequences, {:.1} MiB more needed",
                mib(self.total_mapped),
                mib(self.budget_pages),
                self.in_use.iter().filter(|u| **u).count(),
                mib(n)
            ));
        }
        // Reclaim from the free slots holding the fewest pages first (keep big warm slots).
        let mut free: Vec<usize> = (0..self.mapped.len())
            .filter(|&s| s != except && !self.in_use[s] && self.mapped[s] > 0)
            .collect();
        free.sort_by_key(|&s| self.mapped[s]);
        for s in free {
            if self.total_mapped + n <= self.budget_pages {
                break;
            }
            let over = self.total_mapped + n - self.budget_pages;
            let keep = self.mapped[s].saturating_sub(over);
            self.unmap(s, keep);
        }
        Ok(())
    }

    fn pages_for(&self, tokens: usize) -> usize {
        (tokens * self.token_bytes).div_ceil(self.cfg.page_bytes)
    }

    /// Background work: map ahead where wanted, within the budget (never reclaiming).
    fn map_ahead(&mut self) {
        for s in 0..self.mapped.len() {
            if !self.in_use[s] || self.want[s] <= self.mapped[s] {
                continue;
            }
            let n = (self.want[s] - self.mapped[s])
                .min(self.budget_pages.saturating_sub(self.total_mapped));
            let t = Instant::now();
            let (from, to) = (self.mapped[s], self.mapped[s] + n);
            if self.map(s, from, to).is_err() {
                self.want[s] = self.mapped[s];
            }
            self.counters.ahead_map_ns += t.elapsed().as_nanos() as u64;
            self.want[s] = self.mapped[s];
        }
    }

    fn has_ahead_work(&self) -> bool {
        (0..self.mapped.len()).any(|s| self.in_use[s] && self.want[s] > self.mapped[s])
    }
}

struct Reservations(Vec<usize>, usize);

impl Drop for Reservations {
    fn drop(&mut self) {
        for &b in &self.0 {
            // SAFETY: each base came from mmap with this length.
            unsafe { libc::munmap(b as *mut libc::c_void, self.1) };
        }
    }
}

type Shared = Arc<(Mutex<Inner>, Condvar)>;

pub struct VAttention {
    shared: Shared,
    worker: Option<JoinHandle<()>>,
    _res: Reservations,
}

impl VAttention {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mapping counters (pages mapped/unmapped, time spent mapping).
    pub fn counters(&self) -> Counters {
        self.lock().counters
    }

    /// Page sets mapped for `slot` (tests).
    pub fn mapped_pages(&self, slot: usize) -> usize {
        self.lock().mapped[slot]
    }

    /// Wait until the background thread has no pending work (tests, benchmarks).
    pub fn settle(&self) {
        loop {
            if !self.lock().has_ahead_work() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }

    pub fn config(&self) -> Config {
        self.lock().cfg
    }
}

impl Drop for VAttention {
    fn drop(&mut self) {
        self.lock().shutdown = true;
        self.shared.1.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl KvAllocator for VAttention {
    fn create(config: &str, layout: KvLayout) -> PluginResult<Self> {
        let cfg = parse_config(config).map_err(PluginError::invalid)?;
        if layout.max_slots == 0 || layout.n_layers == 0 || layout.token_elems() == 0 {
            return Err(PluginError::invalid("layout has no slots, layers or heads"));
        }
        let token_bytes = layout.token_elems() * 4;
        let slot_bytes = (layout.max_context * token_bytes).next_multiple_of(cfg.page_bytes);
        let region_bytes = slot_bytes
            .checked_mul(layout.max_slots)
            .ok_or_else(|| PluginError::invalid("KV reservation size overflows"))?;
        let mut res = Reservations(Vec::new(), region_bytes);
        for _ in 0..2 * layout.n_layers {
            // SAFETY: a fresh anonymous reservation with no access; nothing is committed.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    region_bytes,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(PluginError::exhausted(os_err(&format!(
                    "reserving {} MiB of address space",
                    region_bytes >> 20
                ))));
            }
            res.0.push(p as usize);
        }
        let page_set = cfg.page_bytes * 2 * layout.n_layers;
        let budget_pages = cfg.budget_bytes.map_or(usize::MAX / 2, |b| b / page_set);
        if budget_pages == 0 {
            return Err(PluginError::invalid(format!(
                "budget_mb is smaller than one page in every layer ({} KiB)",
                page_set >> 10
            )));
        }
        let inner = Inner {
            layout,
            cfg,
            token_bytes,
            slot_bytes,
            pages_per_slot: slot_bytes / cfg.page_bytes,
            regions: res.0.clone(),
            region_bytes,
            mapped: vec![0; layout.max_slots],
            in_use: vec![false; layout.max_slots],
            used_tokens: vec![0; layout.max_slots],
            want: vec![0; layout.max_slots],
            budget_pages,
            total_mapped: 0,
            counters: Counters::default(),
            shutdown: false,
        };
        let shared: Shared = Arc::new((Mutex::new(inner), Condvar::new()));
        let worker = if cfg.background && cfg.ahead_pages > 0 {
            let sh = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("vattention-map".into())
                    .spawn(move || {
                        let (m, cv) = &*sh;
                        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                        loop {
                            if g.shutdown {
                                return;
                            }
                            if g.has_ahead_work() {
                                g.map_ahead();
                            } else {
                                g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                            }
                        }
                    })
                    .map_err(|e| PluginError::new(format!("starting the mapping thread: {e}")))?,
            )
        } else {
            None
        };
        Ok(Self {
            shared,
            worker,
            _res: res,
        })
    }

    fn acquire(&mut self) -> PluginResult<usize> {
        let mut g = self.lock();
        // Deferred reclamation: the free slot with the most pages already mapped.
        let slot = (0..g.mapped.len())
            .filter(|&s| !g.in_use[s])
            .max_by_key(|&s| (g.mapped[s], std::cmp::Reverse(s)))
            .ok_or_else(|| {
                PluginError::exhausted(format!(
                    "all {} sequence slots are in use",
                    g.layout.max_slots
                ))
            })?;
        if g.mapped[slot] == 0 {
            g.room(1, slot).map_err(PluginError::exhausted)?;
        }
        g.in_use[slot] = true;
        g.used_tokens[slot] = 0;
        g.want[slot] = 0;
        Ok(slot)
    }

    fn ensure(&mut self, slot: usize, n_tokens: usize) -> PluginResult<()> {
        let mut g = self.lock();
        if !g.in_use.get(slot).copied().unwrap_or(false) {
            return Err(PluginError::invalid(format!("slot {slot} is not in use")));
        }
        if n_tokens > g.layout.max_context {
            return Err(PluginError::invalid(format!(
                "sequence needs {n_tokens} tokens but the context is {}",
                g.layout.max_context
            )));
        }
        let need = g.pages_for(n_tokens);
        if g.mapped[slot] < need {
            let t = Instant::now();
            let have = g.mapped[slot];
            g.room(need - have, slot).map_err(PluginError::exhausted)?;
            g.map(slot, have, need).map_err(PluginError::new)?;
            g.counters.sync_map_ns += t.elapsed().as_nanos() as u64;
            g.counters.sync_maps += 1;
        }
        g.used_tokens[slot] = g.used_tokens[slot].max(n_tokens);
        let ahead = (need + g.cfg.ahead_pages).min(g.pages_per_slot);
        if ahead > g.mapped[slot] {
            if self.worker.is_some() {
                g.want[slot] = g.want[slot].max(ahead);
                drop(g);
                self.shared.1.notify_one();
            } else {
                // No thread: map ahead inline, within the budget only.
                g.want[slot] = ahead;
                g.map_ahead();
            }
        }
        Ok(())
    }

    fn capacity(&self, slot: usize) -> usize {
        let g = self.lock();
        if !g.in_use.get(slot).copied().unwrap_or(false) {
            return 0;
        }
        (g.mapped[slot] * g.cfg.page_bytes / g.token_bytes).min(g.layout.max_context)
    }

    fn release(&mut self, slot: usize) {
        let mut g = self.lock();
        if slot < g.in_use.len() {
            // Up to retain_pages stay with the slot for the next sequence (deferred
            // reclamation); the rest go back now.
            let keep = g.cfg.retain_pages;
            g.unmap(slot, keep);
            g.in_use[slot] = false;
            g.used_tokens[slot] = 0;
            g.want[slot] = 0;
        }
    }

    fn kv(&mut self, layer: usize, slot: usize) -> PluginResult<(*mut f32, *mut f32)> {
        let g = self.lock();
        if layer >= g.layout.n_layers || !g.in_use.get(slot).copied().unwrap_or(false) {
            return Err(PluginError::invalid(format!(
                "no layer {layer} of slot {slot} in use"
            )));
        }
        let off = slot * g.slot_bytes;
        Ok((
            (g.regions[2 * layer] + off) as *mut f32,
            (g.regions[2 * layer + 1] + off) as *mut f32,
        ))
    }

    fn stats(&self) -> KvStats {
        let g = self.lock();
        let per_token = (g.token_bytes * g.regions.len()) as u64;
        KvStats {
            reserved_bytes: (g.region_bytes * g.regions.len()) as u64,
            mapped_bytes: (g.total_mapped * g.page_set_bytes()) as u64,
            used_bytes: g.used_tokens.iter().sum::<usize>() as u64 * per_token,
            slots_in_use: g.in_use.iter().filter(|u| **u).count(),
        }
    }

    fn page_stats(&self) -> Option<PageStats> {
        let g = self.lock();
        // Counted per reservation, like the CUDA allocator: a page set is one page in each.
        let n = g.regions.len() as u64;
        Some(PageStats {
            page_bytes: g.cfg.page_bytes as u64,
            pages_mapped: g.counters.pages_mapped * n,
            pages_unmapped: g.counters.pages_unmapped * n,
            sync_map_ns: g.counters.sync_map_ns,
            sync_maps: g.counters.sync_maps,
            ahead_map_ns: g.counters.ahead_map_ns,
        })
    }
}

impl VAttention {
    pub fn layout(&self) -> KvLayout {
        self.lock().layout
    }
}

export_kv_allocator!(
    VAttention,
    name = "vattention",
    version = env!("CARGO_PKG_VERSION")
);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin_test_support as ts;

    /// 1 KiB per token and layer (4 heads × 64 × 4 B): 4 tokens per 4 KiB page.
    fn layout() -> KvLayout {
        KvLayout {
            n_layers: 2,
            kv_heads: 4,
            head_dim: 64,
            max_context: 64,
            max_slots: 4,
        }
    }

    #[test]
    fn conformance_on_the_type_and_through_the_abi() {
        let l = ts::kv_allocator::small_layout();
        for cfg in [
            "",
            "page_kb = 4\nahead_pages = 0",
            "page_kb = 4\nbackground = false",
        ] {
            ts::kv_allocator::conformance::<VAttention>(cfg, l);
            ts::kv_allocator::conformance_abi(switchyard_plugin_v1, cfg, l);
            ts::kv_allocator::conformance::<VAttention>(cfg, layout());
        }
    }

    #[test]
    fn configs() {
        assert_eq!(parse_config("").unwrap(), Config::default());
        let c = parse_config("page_kb = 2048\nbudget_mb = 8 # cap\nprefault=false").unwrap();
        assert_eq!(c.page_bytes, 2 << 20);
        assert_eq!(c.budget_bytes, Some(8 << 20));
        assert!(!c.prefault);
        assert!(parse_config("page_kb = 3")
            .unwrap_err()
            .contains("power of two"));
        assert!(parse_config("page_kb = 4096")
            .unwrap_err()
            .contains("4 to 2048"));
        assert!(parse_config("pages = 1")
            .unwrap_err()
            .contains("unknown key"));
        assert!(parse_config("prefault = yes")
            .unwrap_err()
            .contains("true or false"));
        let e = VAttention::create("budget_mb = 1\npage_kb = 2048", layout())
            .err()
            .unwrap();
        assert!(e.message.contains("smaller than one page"), "{}", e.message);
    }

    /// Write token t of `slot` in every layer (K = tag, V = -tag) and read back all tokens.
    fn write_token(kv: &mut VAttention, slot: usize, t: usize, tag: f32) {
        let e = kv.layout().token_elems();
        for layer in 0..kv.layout().n_layers {
            let (k, v) = kv.kv(layer, slot).unwrap();
            for i in 0..e {
                // SAFETY: ensure() covered token t.
                unsafe {
                    *k.add(t * e + i) = tag + layer as f32;
                    *v.add(t * e + i) = -tag - layer as f32;
                }
            }
        }
    }

    fn read_token(kv: &mut VAttention, slot: usize, t: usize) -> f32 {
        let e = kv.layout().token_elems();
        let (k, v) = kv.kv(1, slot).unwrap();
        // SAFETY: covered by ensure.
        let (a, b) = unsafe { (*k.add(t * e + e - 1), *v.add(t * e)) };
        assert_eq!(a, -b, "K and V of slot {slot} token {t} disagree");
        a - 1.0
    }

    #[test]
    fn pages_follow_growth_across_boundaries() {
        let mut kv = VAttention::create("page_kb = 4\nahead_pages = 0", layout()).unwrap();
        let s = kv.acquire().unwrap();
        assert_eq!(kv.mapped_pages(s), 0);
        // 4 tokens per page: tokens 0..=3 on page 0, token 4 crosses into page 1.
        for t in 0..9 {
            kv.ensure(s, t + 1).unwrap();
            assert_eq!(kv.mapped_pages(s), t / 4 + 1, "after {} tokens", t + 1);
            write_token(&mut kv, s, t, t as f32 * 10.0);
        }
        for t in 0..9 {
            assert_eq!(read_token(&mut kv, s, t), t as f32 * 10.0);
        }
        assert_eq!(kv.capacity(s), 12);
        let st = kv.stats();
        // 3 pages × 4 KiB × 2 layers × (K, V)
        assert_eq!(st.mapped_bytes, 3 * 4096 * 4);
        assert_eq!(st.used_bytes, 9 * 1024 * 4);
        assert_eq!(st.reserved_bytes, 4 * 64 * 1024 * 4);
        assert_eq!(kv.counters().pages_mapped, 3);
    }

    #[test]
    fn background_thread_maps_ahead() {
        let mut kv = VAttention::create("page_kb = 4\nahead_pages = 2", layout()).unwrap();
        let s = kv.acquire().unwrap();
        kv.ensure(s, 1).unwrap();
        kv.settle();
        assert_eq!(kv.mapped_pages(s), 3, "one needed + two ahead");
        let before = kv.counters().sync_maps;
        // Growing within the mapped-ahead pages never waits on mapping.
        for t in 1..12 {
            kv.ensure(s, t + 1).unwrap();
            write_token(&mut kv, s, t, 1.0);
            kv.settle();
        }
        assert_eq!(kv.counters().sync_maps, before, "decode waited on mapping");
        assert!(kv.counters().ahead_map_ns > 0);
    }

    #[test]
    fn freed_slots_keep_pages_for_the_next_sequence() {
        let mut kv =
            VAttention::create("page_kb = 4\nahead_pages = 0\nretain_pages = all", layout())
                .unwrap();
        let a = kv.acquire().unwrap();
        let b = kv.acquire().unwrap();
        kv.ensure(a, 20).unwrap();
        kv.ensure(b, 4).unwrap();
        kv.release(a);
        assert_eq!(
            kv.stats().mapped_bytes,
            6 * 4096 * 4,
            "pages kept after release"
        );
        // The next sequence gets the warm slot and needs no new pages.
        let c = kv.acquire().unwrap();
        assert_eq!(c, a);
        let mapped = kv.counters().pages_mapped;
        kv.ensure(c, 20).unwrap();
        assert_eq!(kv.counters().pages_mapped, mapped);
        assert_eq!(kv.counters().pages_unmapped, 0);

        // With retain_pages = 2 a freed slot keeps two page sets and returns the rest.
        let mut kv =
            VAttention::create("page_kb = 4\nahead_pages = 0\nretain_pages = 2", layout()).unwrap();
        let a = kv.acquire().unwrap();
        kv.ensure(a, 20).unwrap();
        kv.release(a);
        assert_eq!(kv.mapped_pages(a), 2);
        assert_eq!(kv.counters().pages_unmapped, 3);
    }

    #[test]
    fn budget_exhaustion_reclaims_then_refuses_without_harm() {
        // Budget: 4 page sets (4 KiB × 4 reservations each = 64 KiB).
        let mut kv = VAttention::create("page_kb = 4\nahead_pages = 0", layout()).unwrap();
        kv.lock().budget_pages = 4;
        let a = kv.acquire().unwrap();
        kv.ensure(a, 12).unwrap(); // 3 pages
        for t in 0..12 {
            write_token(&mut kv, a, t, 7.0 + t as f32);
        }
        let b = kv.acquire().unwrap();
        kv.ensure(b, 4).unwrap(); // the 4th
        let e = kv.ensure(b, 5).unwrap_err();
        assert_eq!(e.status, switchyard_plugin::abi::Status::EXHAUSTED);
        assert!(e.message.contains("budget exhausted"), "{}", e.message);
        // Nothing else was touched: a's tokens are intact, b still has its page.
        for t in 0..12 {
            assert_eq!(read_token(&mut kv, a, t), 7.0 + t as f32);
        }
        assert_eq!(kv.capacity(b), 4);
        // A third sequence cannot even start while the budget is spent.
        let e = kv.acquire().unwrap_err();
        assert!(e.message.contains("budget exhausted"), "{}", e.message);
        // Freeing a makes its pages reclaimable: b can now grow (taking a's pages).
        kv.release(a);
        kv.ensure(b, 16).unwrap();
        assert_eq!(kv.mapped_pages(b), 4);
        assert_eq!(kv.mapped_pages(a), 0);
        assert!(kv.counters().pages_unmapped >= 3);
        assert!(kv.stats().mapped_bytes <= 4 * 4096 * 4);
    }

    #[test]
    fn randomized_against_a_model_of_what_is_mapped() {
        let l = layout();
        let mut rng = ts::linear_kernels::Rng(12345);
        let mut r = move |n: usize| ((rng.next_f32() + 1.0) / 2.0 * n as f32) as usize % n;
        for (cfg, budget) in [
            ("page_kb = 4\nahead_pages = 0", 10usize),
            ("page_kb = 8\nahead_pages = 0", 5),
        ] {
            let mut kv = VAttention::create(cfg, l).unwrap();
            kv.lock().budget_pages = budget;
            let tpp = kv.config().page_bytes / 1024; // tokens per page
                                                     // model: per slot (live?, tokens, tag)
            let mut live: Vec<Option<(usize, f32)>> = vec![None; l.max_slots];
            for step in 0..3000 {
                match r(4) {
                    0 => {
                        if let Ok(s) = kv.acquire() {
                            assert!(live[s].is_none(), "slot {s} handed out twice");
                            live[s] = Some((0, step as f32));
                        } else {
                            let need_new = live.iter().all(|x| x.is_some())
                                || kv.stats().mapped_bytes as usize / (kv.config().page_bytes * 4)
                                    >= budget;
                            assert!(need_new, "acquire refused with room left");
                        }
                    }
                    1 => {
                        let s = r(l.max_slots);
                        if live[s].is_some() {
                            kv.release(s);
                            live[s] = None;
                        }
                    }
                    _ => {
                        let s = r(l.max_slots);
                        if let Some((n, tag)) = live[s] {
                            let to = (n + 1 + r(9)).min(l.max_context);
                            match kv.ensure(s, to) {
                                Ok(()) => {
                                    for t in n..to {
                                        write_token(&mut kv, s, t, tag + t as f32);
                                    }
                                    live[s] = Some((to, tag));
                                }
                                Err(e) => assert!(e.message.contains("budget exhausted")),
                            }
                        }
                    }
                }
                // The model: every live slot has its tokens covered and readable; the budget
                // holds; mapped bytes = Σ mapped pages.
                let mut total = 0;
                for s in 0..l.max_slots {
                    let pages = kv.mapped_pages(s);
                    total += pages;
                    if let Some((n, tag)) = live[s] {
                        assert!(
                            pages >= n.div_ceil(tpp),
                            "slot {s}: {n} tokens on {pages} pages"
                        );
                        assert!(kv.capacity(s) >= n);
                        for t in 0..n {
                            assert_eq!(
                                read_token(&mut kv, s, t),
                                tag + t as f32,
                                "slot {s} token {t}"
                            );
                        }
                    }
                }
                assert!(
                    total <= budget,
                    "{total} pages mapped over a budget of {budget}"
                );
                assert_eq!(
                    kv.stats().mapped_bytes as usize,
                    total * kv.config().page_bytes * 4
                );
                assert_eq!(
                    kv.stats().slots_in_use,
                    live.iter().filter(|x| x.is_some()).count()
                );
            }
        }
    }
}
