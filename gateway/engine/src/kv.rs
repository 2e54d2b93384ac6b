//! The KV-cache allocator interface and the engine's default allocator.
//!
//! Every sequence lives in a slot. For each layer, a slot's K (and V) is one contiguous
//! `[max_context, kv_heads, head_dim]` f32 region, so the attention kernel reads a plain
//! contiguous tensor whatever the allocator does underneath (the vAttention plugin maps
//! physical pages into a virtual reservation; this default one grows heap buffers).

use crate::error::{EngineError, Result};

/// Shape of the cache the model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_context: usize,
    pub max_slots: usize,
}

impl KvLayout {
    /// f32 elements of one token's K (or V) in one layer.
    pub fn token_elems(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Address space reserved (bytes).
    pub reserved_bytes: u64,
    /// Memory actually backing the cache (bytes).
    pub mapped_bytes: u64,
    /// Bytes holding live tokens.
    pub used_bytes: u64,
    pub slots_in_use: usize,
    /// Page-level counters, for allocators that map pages (vAttention).
    pub pages: Option<PageStats>,
}

/// Cumulative page-mapping counters of a paging allocator (Prometheus counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Bytes of one page.
    pub page_bytes: u64,
    /// Pages mapped and unmapped since the allocator was created (per reservation).
    pub mapped: u64,
    pub unmapped: u64,
    /// Time callers (`ensure`/`acquire`) waited on mapping, and how many calls waited.
    pub sync_map_ns: u64,
    pub sync_maps: u64,
    /// Time a background thread spent mapping ahead of need.
    pub ahead_map_ns: u64,
}

/// A KV-cache allocator. Pointers returned by [`kv`](KvAllocator::kv)
/// stay valid until the next `ensure` or `release` call on that slot.
pub trait KvAllocator: Send {
    fn layout(&self) -> KvLayout;
    /// Claim a free slot for a new sequence.
    fn acquire(&mut self) -> Result<usize>;
    /// Make room for `n_tokens` tokens in `slot` (positions `0..n_tokens`).
    fn ensure(&mut self, slot: usize, n_tokens: usize) -> Result<()>;
    /// Number of tokens `slot` can hold now without another `ensure`.
    fn capacity(&self, slot: usize) -> usize;
    /// Free `slot` (its tokens are gone).
    fn release(&mut self, slot: usize);
    /// Bases of `slot`'s K and V for `layer`: each `[capacity, kv_heads, head_dim]` f32,
    /// contiguous.
    fn kv(&mut self, layer: usize, slot: usize) -> (*mut f32, *mut f32);
    fn stats(&self) -> KvStats;
    fn name(&self) -> &str;
}

/// Per layer: (K, V) buffers of one slot.
type SlotBuffers = Vec<(Vec<f32>, Vec<f32>)>;

/// Heap buffers per slot and layer, grown by doubling (a realloc moves the tokens).
pub struct HeapKv {
    layout: KvLayout,
    /// `slots[s]` = Some(per-layer (K, V)) when in use.
    slots: Vec<Option<SlotBuffers>>,
    used_tokens: Vec<usize>,
}

impl HeapKv {
    pub fn new(layout: KvLayout) -> Self {
        Self {
            layout,
            slots: (0..layout.max_slots).map(|_| None).collect(),
            used_tokens: vec![0; layout.max_slots],
        }
    }
}

impl KvAllocator for HeapKv {
    fn layout(&self) -> KvLayout {
        self.layout
    }
    fn acquire(&mut self) -> Result<usize> {
        let i = self.slots.iter().position(|s| s.is_none()).ok_or_else(|| {
            EngineError::Kv(format!(
                "all {} sequence slots are in use",
                self.layout.max_slots
            ))
        })?;
        self.slots[i] = Some(
            (0..self.layout.n_layers)
                .map(|_| (Vec::new(), Vec::new()))
                .collect(),
        );
        self.used_tokens[i] = 0;
        Ok(i)
    }
    fn ensure(&mut self, slot: usize, n_tokens: usize) -> Result<()> {
        if n_tokens > self.layout.max_context {
            return Err(EngineError::Kv(format!(
                "sequence needs {n_tokens} tokens but the context is {}",
                self.layout.max_context
            )));
        }
        let te = self.layout.token_elems();
        let max = self.layout.max_context;
        let layers = self.slots[slot]
            .as_mut()
            .ok_or_else(|| EngineError::Kv(format!("slot {slot} is not in use")))?;
        if layers[0].0.len() < n_tokens * te {
            let cap = n_tokens.next_power_of_two().clamp(16, max);
            for (k, v) in layers.iter_mut() {
                k.resize(cap * te, 0.0);
                v.resize(cap * te, 0.0);
            }
        }
        self.used_tokens[slot] = self.used_tokens[slot].max(n_tokens);
        Ok(())
    }
    fn capacity(&self, slot: usize) -> usize {
        self.slots[slot]
            .as_ref()
            .map_or(0, |l| l[0].0.len() / self.layout.token_elems())
    }
    fn release(&mut self, slot: usize) {
        self.slots[slot] = None;
        self.used_tokens[slot] = 0;
    }
    fn kv(&mut self, layer: usize, slot: usize) -> (*mut f32, *mut f32) {
        let (k, v) = &mut self.slots[slot].as_mut().expect("slot in use")[layer];
        (k.as_mut_ptr(), v.as_mut_ptr())
    }
    fn stats(&self) -> KvStats {
        let per_token = (2 * self.layout.n_layers * self.layout.token_elems() * 4) as u64;
        let mapped: usize = (0..self.slots.len()).map(|s| self.capacity(s)).sum();
        KvStats {
            reserved_bytes: mapped as u64 * per_token,
            mapped_bytes: mapped as u64 * per_token,
            used_bytes: self.used_tokens.iter().sum::<usize>() as u64 * per_token,
            slots_in_use: self.slots.iter().filter(|s| s.is_some()).count(),
            pages: None,
        }
    }
    fn name(&self) -> &str {
        "heap"
    }
}
