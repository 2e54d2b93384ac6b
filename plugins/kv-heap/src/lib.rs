//! `kv-heap`: heap buffers per slot and layer, grown by doubling, as a `kv-allocator` plugin.
//! The same policy as the engine's built-in `HeapKv`, shipped through the SDK so that the
//! pipeline's KV stage is a plugin from day one.

use switchyard_plugin::{
    export_kv_allocator, KvAllocator, KvLayout, KvStats, PluginError, PluginResult,
};

/// Per layer: (K, V) buffers of one slot.
type SlotBuffers = Vec<(Vec<f32>, Vec<f32>)>;

pub struct HeapKv {
    layout: KvLayout,
    /// Per slot: its buffers when in use.
    slots: Vec<Option<SlotBuffers>>,
    used: Vec<usize>,
}

impl KvAllocator for HeapKv {
    fn create(config: &str, layout: KvLayout) -> PluginResult<Self> {
        if !config.trim().is_empty() {
            return Err(PluginError::invalid(format!(
                "kv-heap takes no configuration, got {config:?}"
            )));
        }
        if layout.max_slots == 0 || layout.n_layers == 0 {
            return Err(PluginError::invalid("layout has no slots or no layers"));
        }
        Ok(Self {
            layout,
            slots: (0..layout.max_slots).map(|_| None).collect(),
            used: vec![0; layout.max_slots],
        })
    }

    fn acquire(&mut self) -> PluginResult<usize> {
        let i = self.slots.iter().position(|s| s.is_none()).ok_or_else(|| {
            PluginError::exhausted(format!("all {} slots are in use", self.layout.max_slots))
        })?;
        self.slots[i] = Some(
            (0..self.layout.n_layers)
                .map(|_| (Vec::new(), Vec::new()))
                .collect(),
        );
        self.used[i] = 0;
        Ok(i)
    }

    fn ensure(&mut self, slot: usize, n_tokens: usize) -> PluginResult<()> {
        let max = self.layout.max_context;
        if n_tokens > max {
            return Err(PluginError::exhausted(format!(
                "sequence needs {n_tokens} tokens but the context is {max}"
            )));
        }
        let te = self.layout.token_elems();
        let layers = self
            .slots
            .get_mut(slot)
            .and_then(|s| s.as_mut())
            .ok_or_else(|| PluginError::invalid(format!("slot {slot} is not in use")))?;
        if layers[0].0.len() < n_tokens * te {
            let cap = n_tokens.next_power_of_two().clamp(16, max);
            for (k, v) in layers.iter_mut() {
                k.resize(cap * te, 0.0);
                v.resize(cap * te, 0.0);
            }
        }
        self.used[slot] = self.used[slot].max(n_tokens);
        Ok(())
    }

    fn capacity(&self, slot: usize) -> usize {
        self.slots
            .get(slot)
            .and_then(|s| s.as_ref())
            .map_or(0, |l| l[0].0.len() / self.layout.token_elems())
    }

    fn release(&mut self, slot: usize) {
        if slot < self.slots.len() {
            self.slots[slot] = None;
            self.used[slot] = 0;
        }
    }

    fn kv(&mut self, layer: usize, slot: usize) -> PluginResult<(*mut f32, *mut f32)> {
        let (k, v) = self
            .slots
            .get_mut(slot)
            .and_then(|s| s.as_mut())
            .and_then(|l| l.get_mut(layer))
            .ok_or_else(|| PluginError::invalid(format!("no layer {layer} in slot {slot}")))?;
        Ok((k.as_mut_ptr(), v.as_mut_ptr()))
    }

    fn stats(&self) -> KvStats {
        let per_token = (2 * self.layout.n_layers * self.layout.token_elems() * 4) as u64;
        let mapped: usize = (0..self.slots.len()).map(|s| self.capacity(s)).sum();
        KvStats {
            reserved_bytes: mapped as u64 * per_token,
            mapped_bytes: mapped as u64 * per_token,
            used_bytes: self.used.iter().sum::<usize>() as u64 * per_token,
            slots_in_use: self.slots.iter().filter(|s| s.is_some()).count(),
        }
    }
}

export_kv_allocator!(
    HeapKv,
    name = "kv-heap",
    version = env!("CARGO_PKG_VERSION")
);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin_test_support as ts;

    #[test]
    fn conformance_on_the_type_and_through_the_abi() {
        let l = ts::kv_allocator::small_layout();
        ts::kv_allocator::conformance::<HeapKv>("", l);
        ts::kv_allocator::conformance_abi(switchyard_plugin_v1, "", l);
        let d = ts::root_descriptor(switchyard_plugin_v1).unwrap();
        assert_eq!(
            (d.kind.as_str(), d.name.as_str()),
            ("kv-allocator", "kv-heap")
        );
    }
}
