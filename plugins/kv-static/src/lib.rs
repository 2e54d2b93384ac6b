//! `kv-static`: every slot owns its full `[max_context, kv_heads, head_dim]` K and V for every
//! layer from the start, committed (touched) at creation: what a naive server does, and the
//! baseline vAttention is measured against.

use switchyard_plugin::{
    export_kv_allocator, KvAllocator, KvLayout, KvStats, PluginError, PluginResult,
};

pub struct StaticKv {
    layout: KvLayout,
    /// Per layer: K and V for all slots, `[max_slots, max_context, kv_heads, head_dim]`.
    buffers: Vec<(Vec<f32>, Vec<f32>)>,
    in_use: Vec<bool>,
    used: Vec<usize>,
}

fn commit(v: &mut [f32]) {
    // vec![0.0; n] comes from calloc and stays virtual until written: touch every page so the
    // memory is really held, as a static allocation on a GPU is.
    for c in v.chunks_mut(1024) {
        // SAFETY: in-bounds write to an owned buffer; volatile so it is not elided.
        unsafe { std::ptr::write_volatile(c.as_mut_ptr(), 0.0) };
    }
}

impl KvAllocator for StaticKv {
    fn create(config: &str, layout: KvLayout) -> PluginResult<Self> {
        if !config.trim().is_empty() {
            return Err(PluginError::invalid(format!(
                "kv-static takes no configuration, got {config:?}"
            )));
        }
        if layout.max_slots == 0 || layout.n_layers == 0 {
            return Err(PluginError::invalid("layout has no slots or no layers"));
        }
        let n = layout
            .max_slots
            .checked_mul(layout.max_context)
            .and_then(|x| x.checked_mul(layout.token_elems()))
            .ok_or_else(|| PluginError::invalid("KV cache size overflows"))?;
        let buffers = (0..layout.n_layers)
            .map(|_| {
                let (mut k, mut v) = (vec![0f32; n], vec![0f32; n]);
                commit(&mut k);
                commit(&mut v);
                (k, v)
            })
            .collect();
        Ok(Self {
            layout,
            buffers,
            in_use: vec![false; layout.max_slots],
            used: vec![0; layout.max_slots],
        })
    }

    fn acquire(&mut self) -> PluginResult<usize> {
        let i = self.in_use.iter().position(|u| !u).ok_or_else(|| {
            PluginError::exhausted(format!("all {} slots are in use", self.layout.max_slots))
        })?;
        self.in_use[i] = true;
        self.used[i] = 0;
        Ok(i)
    }

    fn ensure(&mut self, slot: usize, n_tokens: usize) -> PluginResult<()> {
        if !self.in_use.get(slot).copied().unwrap_or(false) {
            return Err(PluginError::invalid(format!("slot {slot} is not in use")));
        }
        if n_tokens > self.layout.max_context {
            return Err(PluginError::invalid(format!(
                "sequence needs {n_tokens} tokens but the context is {}",
                self.layout.max_context
            )));
        }
        self.used[slot] = self.used[slot].max(n_tokens);
        Ok(())
    }

    fn capacity(&self, slot: usize) -> usize {
        if self.in_use.get(slot).copied().unwrap_or(false) {
            self.layout.max_context
        } else {
            0
        }
    }

    fn release(&mut self, slot: usize) {
        if let Some(u) = self.in_use.get_mut(slot) {
            *u = false;
            self.used[slot] = 0;
        }
    }

    fn kv(&mut self, layer: usize, slot: usize) -> PluginResult<(*mut f32, *mut f32)> {
        if !self.in_use.get(slot).copied().unwrap_or(false) || layer >= self.layout.n_layers {
            return Err(PluginError::invalid(format!(
                "no layer {layer} of slot {slot} in use"
            )));
        }
        let off = slot * self.layout.max_context * self.layout.token_elems();
        let (k, v) = &mut self.buffers[layer];
        // SAFETY: off is within the buffers (slot < max_slots).
        Ok(unsafe { (k.as_mut_ptr().add(off), v.as_mut_ptr().add(off)) })
    }

    fn stats(&self) -> KvStats {
        let per_token = (2 * self.layout.n_layers * self.layout.token_elems() * 4) as u64;
        let all = (self.layout.max_slots * self.layout.max_context) as u64 * per_token;
        KvStats {
            reserved_bytes: all,
            mapped_bytes: all,
            used_bytes: self.used.iter().sum::<usize>() as u64 * per_token,
            slots_in_use: self.in_use.iter().filter(|u| **u).count(),
        }
    }
}

export_kv_allocator!(
    StaticKv,
    name = "kv-static",
    version = env!("CARGO_PKG_VERSION")
);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin_test_support as ts;

    #[test]
    fn conformance_on_the_type_and_through_the_abi() {
        let l = ts::kv_allocator::small_layout();
        ts::kv_allocator::conformance::<StaticKv>("", l);
        ts::kv_allocator::conformance_abi(switchyard_plugin_v1, "", l);
    }
}
