//! Template native plugin: a `kv-allocator` that gives every slot its whole context when the
//! slot is acquired (what a naive server does). It shows the parts every native plugin has:
//! a type implementing the kind's trait, configuration parsing with clear errors, and the
//! export macro, which writes the C ABI (root symbol, descriptor, vtable, panic catching).
//!
//! Configuration (the pipeline stage's `config` text): `max_slots = N` optionally caps the
//! slots below the host's layout.

use switchyard_plugin::{
    export_kv_allocator, KvAllocator, KvLayout, KvStats, PluginError, PluginResult,
};

pub struct StaticKv {
    layout: KvLayout,
    max_slots: usize,
    /// Per slot: None when free; else per layer (K, V), each max_context × token_elems.
    slots: Vec<Option<Vec<(Vec<f32>, Vec<f32>)>>>,
    /// Tokens each live slot was asked to hold.
    used: Vec<usize>,
}

impl StaticKv {
    fn slot_bytes(&self) -> u64 {
        (2 * self.layout.n_layers * self.layout.max_context * self.layout.token_elems() * 4) as u64
    }
}

fn parse_config(config: &str, layout: &KvLayout) -> PluginResult<usize> {
    let mut max_slots = layout.max_slots;
    for (n, line) in config.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| PluginError::invalid(format!("line {}: expected key = value", n + 1)))?;
        match k.trim() {
            "max_slots" => {
                max_slots = v.trim().parse().map_err(|_| {
                    PluginError::invalid(format!("line {}: max_slots must be a number", n + 1))
                })?;
                if max_slots == 0 || max_slots > layout.max_slots {
                    return Err(PluginError::invalid(format!(
                        "max_slots must be in 1..={}",
                        layout.max_slots
                    )));
                }
            }
            other => {
                return Err(PluginError::invalid(format!(
                    "line {}: unknown key {other:?} (known: max_slots)",
                    n + 1
                )))
            }
        }
    }
    Ok(max_slots)
}

impl KvAllocator for StaticKv {
    fn create(config: &str, layout: KvLayout) -> PluginResult<Self> {
        let max_slots = parse_config(config, &layout)?;
        Ok(Self {
            layout,
            max_slots,
            slots: (0..max_slots).map(|_| None).collect(),
            used: vec![0; max_slots],
        })
    }

    fn acquire(&mut self) -> PluginResult<usize> {
        let i = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| PluginError::exhausted(format!("all {} slots in use", self.max_slots)))?;
        let n = self.layout.max_context * self.layout.token_elems();
        self.slots[i] = Some(
            (0..self.layout.n_layers)
                .map(|_| (vec![0.0; n], vec![0.0; n]))
                .collect(),
        );
        self.used[i] = 0;
        Ok(i)
    }

    fn ensure(&mut self, slot: usize, n_tokens: usize) -> PluginResult<()> {
        if self.slots.get(slot).is_none_or(Option::is_none) {
            return Err(PluginError::invalid(format!("slot {slot} is not acquired")));
        }
        if n_tokens > self.layout.max_context {
            return Err(PluginError::exhausted(format!(
                "{n_tokens} tokens exceed the context of {}",
                self.layout.max_context
            )));
        }
        self.used[slot] = self.used[slot].max(n_tokens);
        Ok(())
    }

    fn capacity(&self, slot: usize) -> usize {
        match self.slots.get(slot) {
            Some(Some(_)) => self.layout.max_context,
            _ => 0,
        }
    }

    fn release(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = None;
            self.used[slot] = 0;
        }
    }

    fn kv(&mut self, layer: usize, slot: usize) -> PluginResult<(*mut f32, *mut f32)> {
        let s = self
            .slots
            .get_mut(slot)
            .and_then(Option::as_mut)
            .ok_or_else(|| PluginError::invalid(format!("slot {slot} is not acquired")))?;
        let (k, v) = s
            .get_mut(layer)
            .ok_or_else(|| PluginError::invalid(format!("no layer {layer}")))?;
        Ok((k.as_mut_ptr(), v.as_mut_ptr()))
    }

    fn stats(&self) -> KvStats {
        let live = self.slots.iter().filter(|s| s.is_some()).count();
        let per_token = (2 * self.layout.n_layers * self.layout.token_elems() * 4) as u64;
        KvStats {
            reserved_bytes: live as u64 * self.slot_bytes(),
            mapped_bytes: live as u64 * self.slot_bytes(),
            used_bytes: self.used.iter().map(|&u| u as u64 * per_token).sum(),
            slots_in_use: live,
        }
    }
}

export_kv_allocator!(StaticKv, name = "static-kv", version = "0.1.0");

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin_test_support as ts;

    #[test]
    fn passes_the_kv_allocator_conformance_suite() {
        ts::kv_allocator::conformance::<StaticKv>("", ts::kv_allocator::small_layout());
    }

    #[test]
    fn the_exported_plugin_loads_through_the_abi() {
        let p = ts::root_descriptor(switchyard_plugin_v1).unwrap();
        assert_eq!((p.kind.as_str(), p.name.as_str()), ("kv-allocator", "static-kv"));
        ts::kv_allocator::conformance_abi(switchyard_plugin_v1, "", ts::kv_allocator::small_layout());
    }

    #[test]
    fn bad_configuration_is_refused() {
        let e = ts::kv_allocator::create_err::<StaticKv>("slots = 3", ts::kv_allocator::small_layout());
        assert!(e.contains("unknown key"), "{e}");
    }
}
