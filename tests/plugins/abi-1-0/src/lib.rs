//! A kv-allocator whose descriptor says ABI 1.0 and whose vtable stops at `stats` (the 1.0
//! size): what a plugin built before 1.1 looks like. A 1.1 host must load it, use it, and
//! never read the `page_stats` entry it does not have.

use std::ffi::c_void;

use switchyard_plugin::abi::{kind, KvAllocatorVTable, PluginDescriptor, Str};
use switchyard_plugin::{KvAllocator, KvLayout, KvStats, PluginError, PluginResult};

/// Per layer: (K, V) of one slot.
type SlotBuffers = Vec<(Vec<f32>, Vec<f32>)>;

/// Max-context buffers per slot, allocated at `acquire`.
pub struct Fixed {
    layout: KvLayout,
    slots: Vec<Option<SlotBuffers>>,
}

impl KvAllocator for Fixed {
    fn create(_config: &str, layout: KvLayout) -> PluginResult<Self> {
        Ok(Self {
            layout,
            slots: (0..layout.max_slots).map(|_| None).collect(),
        })
    }
    fn acquire(&mut self) -> PluginResult<usize> {
        let i = self
            .slots
            .iter()
            .position(|s| s.is_none())
            .ok_or_else(|| PluginError::exhausted("all slots are in use"))?;
        let n = self.layout.max_context * self.layout.token_elems();
        self.slots[i] = Some(
            (0..self.layout.n_layers)
                .map(|_| (vec![0.0; n], vec![0.0; n]))
                .collect(),
        );
        Ok(i)
    }
    fn ensure(&mut self, slot: usize, n_tokens: usize) -> PluginResult<()> {
        if n_tokens > self.layout.max_context || self.slots.get(slot).is_none_or(|s| s.is_none()) {
            return Err(PluginError::invalid("no room"));
        }
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
        }
    }
    fn kv(&mut self, layer: usize, slot: usize) -> PluginResult<(*mut f32, *mut f32)> {
        let (k, v) = self
            .slots
            .get_mut(slot)
            .and_then(|s| s.as_mut())
            .and_then(|l| l.get_mut(layer))
            .ok_or_else(|| PluginError::invalid("no such slot"))?;
        Ok((k.as_mut_ptr(), v.as_mut_ptr()))
    }
    fn stats(&self) -> KvStats {
        KvStats {
            slots_in_use: self.slots.iter().filter(|s| s.is_some()).count(),
            ..KvStats::default()
        }
    }
}

static VTABLE: KvAllocatorVTable = switchyard_plugin::kv_trampolines::vtable::<Fixed>();

static DESC: PluginDescriptor = PluginDescriptor {
    abi_major: 1,
    abi_minor: 0,
    kind: kind::KV_ALLOCATOR,
    name: Str::new("kv-abi-1-0"),
    version: Str::new("0.1.0"),
    features: 0,
    vtable: &VTABLE as *const KvAllocatorVTable as *const c_void,
    vtable_size: KvAllocatorVTable::SIZE_1_0,
};

/// The root symbol.
#[no_mangle]
pub extern "C" fn switchyard_plugin_v1() -> *const PluginDescriptor {
    &DESC
}
