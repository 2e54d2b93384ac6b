//! A kv-allocator plugin that misbehaves as its configuration asks: `error` (create returns an
//! error status), `panic` (create panics), `panic-acquire` (acquire panics), `bad-kv` (slots
//! are handed out, but `kv` returns no memory).

use switchyard_plugin::{
    export_kv_allocator, KvAllocator, KvLayout, KvStats, PluginError, PluginResult,
};

pub struct Faulty {
    mode: String,
}

impl KvAllocator for Faulty {
    fn create(config: &str, _layout: KvLayout) -> PluginResult<Self> {
        match config {
            "error" => Err(PluginError::new("refusing to start, as configured")),
            "panic" => panic!("deliberate panic in create"),
            m => Ok(Self {
                mode: m.to_string(),
            }),
        }
    }
    fn acquire(&mut self) -> PluginResult<usize> {
        match self.mode.as_str() {
            "panic-acquire" => panic!("deliberate panic in acquire"),
            "bad-kv" => Ok(0),
            _ => Err(PluginError::exhausted("no slots, ever")),
        }
    }
    fn ensure(&mut self, _slot: usize, _n: usize) -> PluginResult<()> {
        if self.mode == "bad-kv" {
            return Ok(());
        }
        Err(PluginError::new("never ready"))
    }
    fn capacity(&self, _slot: usize) -> usize {
        0
    }
    fn release(&mut self, _slot: usize) {}
    fn kv(&mut self, _l: usize, _s: usize) -> PluginResult<(*mut f32, *mut f32)> {
        Err(PluginError::new("no memory"))
    }
    fn stats(&self) -> KvStats {
        KvStats::default()
    }
}

export_kv_allocator!(Faulty, name = "faulty-kv", version = "0.0.1");
