//! WebAssembly plugins: components of the `switchyard:plugin@1.0.0` package run by wasmtime.
//!
//! Limits, per instance:
//! - a deadline on every call, through epoch interruption (one process-wide ticker thread
//!   advances the epoch every [`EPOCH_TICK`]); a guest that loops forever traps at the
//!   deadline;
//! - a memory cap through a [`wasmtime::ResourceLimiter`]: growth past the cap is refused and
//!   the call fails with a message naming the cap;
//! - no WASI and no other imports: the linker is empty, so a component that imports anything
//!   (files, clocks, sockets) is refused at load with the import named.
//!
//! A trap fails the call that trapped; the instance is then discarded (a component instance
//! cannot be re-entered after a trap) and the next call starts a fresh one, initialized with
//! the same configuration.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, Store};

use crate::{CallObserver, CallOutcome, HostError, Manifest, Result};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../sdk/wit",
        world: "tokenizer-patch",
    });
}

pub use bindings::PatchInfo;

/// The WIT package version this host implements.
pub const WIT_VERSION: (u32, u32) = (1, 0);

/// Resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Limits of one WebAssembly plugin instance.
#[derive(Debug, Clone, Copy)]
pub struct WasmLimits {
    /// Longest a single call may run.
    pub call_deadline: Duration,
    /// Linear memory cap, bytes (all memories of the instance together).
    pub max_memory: usize,
}

impl Default for WasmLimits {
    fn default() -> Self {
        Self {
            call_deadline: Duration::from_millis(1000),
            max_memory: 256 << 20,
        }
    }
}

/// The process's wasmtime engine with epoch interruption, and its ticker thread.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut c = Config::new();
        c.wasm_component_model(true);
        c.epoch_interruption(true);
        let e = Engine::new(&c).expect("wasmtime engine with the default configuration");
        let weak = e.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => return,
                }
            })
            .expect("spawn the epoch thread");
        e
    })
}

/// Refuses memory and table growth past the caps, and remembers that it did.
struct Limiter {
    max_memory: usize,
    memory: usize,
    refused: bool,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory - current.min(self.memory) + desired;
        if total > self.max_memory {
            self.refused = true;
            return Ok(false);
        }
        self.memory = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

struct Live {
    store: Store<Limiter>,
    patch: bindings::TokenizerPatch,
}

/// A loaded tokenizer-patch component (compiled once; instances made on demand).
pub struct WasmPlugin {
    pub name: String,
    pub version: String,
    pub path: PathBuf,
    pub sha256: String,
    component: Component,
    linker: Linker<Limiter>,
}

impl std::fmt::Debug for WasmPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmPlugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("path", &self.path)
            .finish()
    }
}

pub(crate) fn load(m: &Manifest, file: &Path) -> Result<WasmPlugin> {
    let hs = |msg: String| HostError::Handshake {
        path: file.to_path_buf(),
        msg,
    };
    let (major, minor) = m.abi_version().map_err(&hs)?;
    if major != WIT_VERSION.0 || minor > WIT_VERSION.1 {
        return Err(hs(format!(
            "the manifest says switchyard:plugin@{major}.{minor}, this host runs {}.{} \
             (majors must be equal, the host's minor at least the plugin's)",
            WIT_VERSION.0, WIT_VERSION.1
        )));
    }
    let bytes = std::fs::read(file).map_err(|e| HostError::Io {
        path: file.to_path_buf(),
        source: e,
    })?;
    if is_core_module(&bytes) {
        return Err(hs(
            "is a core WebAssembly module, not a component: turn it into one with \
             `switchyard plugin pack` (see docs/writing-a-plugin.md)"
                .into(),
        ));
    }
    let component = Component::new(engine(), &bytes).map_err(|e| HostError::Load {
        path: file.to_path_buf(),
        msg: format!("not a valid WebAssembly component: {e:#}"),
    })?;
    let ty = component.component_type();
    if let Some((name, _)) = ty.imports(engine()).next() {
        return Err(hs(format!(
            "imports `{name}`, but this host grants WebAssembly plugins no capabilities \
             (no WASI): build the guest for wasm32-unknown-unknown without imports"
        )));
    }
    let linker = Linker::new(engine());
    let p = WasmPlugin {
        name: m.name.clone(),
        version: m.version.clone(),
        path: file.to_path_buf(),
        sha256: m.sha256.to_ascii_lowercase(),
        component,
        linker,
    };
    // The component must really be a tokenizer patch: instantiate it once.
    let mut live = p.instantiate(WasmLimits::default()).map_err(hs)?;
    let info = live
        .patch
        .call_info(&mut live.store)
        .map_err(|e| hs(format!("info() failed: {e:#}")))?;
    if info.name != m.name {
        return Err(hs(format!(
            "the component is plugin {:?}, the manifest says {:?}",
            info.name, m.name
        )));
    }
    Ok(p)
}

impl WasmPlugin {
    fn instantiate(&self, limits: WasmLimits) -> std::result::Result<Live, String> {
        let mut store = Store::new(
            engine(),
            Limiter {
                max_memory: limits.max_memory,
                memory: 0,
                refused: false,
            },
        );
        store.limiter(|l| l);
        store.set_epoch_deadline(deadline_ticks(limits.call_deadline));
        let patch =
            bindings::TokenizerPatch::instantiate(&mut store, &self.component, &self.linker)
                .map_err(|e| format!("cannot instantiate the component: {e:#}"))?;
        Ok(Live { store, patch })
    }

    /// A tokenizer-patch instance initialized with `config`, under `limits`.
    pub fn tokenizer_patch(
        self: &Arc<Self>,
        config: &[u8],
        limits: WasmLimits,
        observer: Option<Arc<dyn CallObserver>>,
    ) -> Result<WasmTokenizerPatch> {
        let p = WasmTokenizerPatch {
            plugin: self.clone(),
            config: config.to_vec(),
            limits,
            live: Mutex::new(None),
            observer,
            traps: AtomicU64::new(0),
        };
        // Run init now: a bad configuration refuses the plugin at load.
        p.with_live("init", |_| Ok(Ok(())))
            .map_err(|e| HostError::Call {
                name: self.name.clone(),
                msg: e.to_string(),
            })?;
        Ok(p)
    }
}

fn deadline_ticks(d: Duration) -> u64 {
    (d.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// Why a WebAssembly call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WasmCallError {
    /// The guest returned an error.
    #[error("plugin {plugin}: {op} failed: {msg}")]
    Guest {
        plugin: String,
        op: String,
        msg: String,
    },
    /// The guest trapped (including running past its deadline or its memory cap).
    #[error("plugin {plugin}: {op} trapped: {msg}")]
    Trap {
        plugin: String,
        op: String,
        msg: String,
    },
    /// The call ran past its deadline.
    #[error("plugin {plugin}: {op} ran past its deadline of {deadline:?} and was stopped")]
    Deadline {
        plugin: String,
        op: String,
        deadline: Duration,
    },
    /// The guest tried to grow its memory past the cap.
    #[error(
        "plugin {plugin}: {op} tried to grow memory past the cap of {cap} MiB and was stopped"
    )]
    Memory {
        plugin: String,
        op: String,
        cap: usize,
    },
}

impl WasmCallError {
    fn outcome(&self) -> CallOutcome {
        match self {
            WasmCallError::Guest { .. } => CallOutcome::Error,
            WasmCallError::Trap { .. } => CallOutcome::Trap,
            WasmCallError::Deadline { .. } => CallOutcome::Deadline,
            WasmCallError::Memory { .. } => CallOutcome::Memory,
        }
    }
}

/// An initialized tokenizer-patch instance. Calls are serialized (one store).
pub struct WasmTokenizerPatch {
    plugin: Arc<WasmPlugin>,
    config: Vec<u8>,
    limits: WasmLimits,
    live: Mutex<Option<Live>>,
    observer: Option<Arc<dyn CallObserver>>,
    traps: AtomicU64,
}

impl std::fmt::Debug for WasmTokenizerPatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmTokenizerPatch")
            .field("plugin", &self.plugin.name)
            .field("limits", &self.limits)
            .finish()
    }
}

impl WasmTokenizerPatch {
    pub fn name(&self) -> &str {
        &self.plugin.name
    }

    pub fn plugin(&self) -> &Arc<WasmPlugin> {
        &self.plugin
    }

    /// Traps (deadline and memory cap included) since this instance was made.
    pub fn traps(&self) -> u64 {
        self.traps.load(Ordering::Relaxed)
    }

    fn classify(&self, op: &str, e: wasmtime::Error, store: &Store<Limiter>) -> WasmCallError {
        let plugin = self.plugin.name.clone();
        let op = op.to_string();
        if let Some(wasmtime::Trap::Interrupt) = e.downcast_ref::<wasmtime::Trap>() {
            return WasmCallError::Deadline {
                plugin,
                op,
                deadline: self.limits.call_deadline,
            };
        }
        if store.data().refused {
            return WasmCallError::Memory {
                plugin,
                op,
                cap: self.limits.max_memory >> 20,
            };
        }
        let msg = match e.downcast_ref::<wasmtime::Trap>() {
            Some(t) => t.to_string(),
            None => format!("{e:#}"),
        };
        WasmCallError::Trap { plugin, op, msg }
    }

    /// Run `f` on a live instance (made and initialized if needed) under the call deadline.
    fn with_live<T>(
        &self,
        op: &str,
        f: impl FnOnce(&mut Live) -> wasmtime::Result<std::result::Result<T, String>>,
    ) -> std::result::Result<T, WasmCallError> {
        let t0 = Instant::now();
        let mut guard = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.call_locked(&mut guard, op, f);
        drop(guard);
        if let Some(o) = &self.observer {
            let outcome = match &r {
                Ok(_) => CallOutcome::Ok,
                Err(e) => e.outcome(),
            };
            o.call(&self.plugin.name, op, t0.elapsed(), outcome);
        }
        r
    }

    fn call_locked<T>(
        &self,
        slot: &mut Option<Live>,
        op: &str,
        f: impl FnOnce(&mut Live) -> wasmtime::Result<std::result::Result<T, String>>,
    ) -> std::result::Result<T, WasmCallError> {
        if slot.is_none() {
            let mut live =
                self.plugin
                    .instantiate(self.limits)
                    .map_err(|msg| WasmCallError::Trap {
                        plugin: self.plugin.name.clone(),
                        op: "instantiate".into(),
                        msg,
                    })?;
            let r = live.patch.call_init(&mut live.store, &self.config);
            match r {
                Ok(Ok(())) => *slot = Some(live),
                Ok(Err(msg)) => {
                    return Err(WasmCallError::Guest {
                        plugin: self.plugin.name.clone(),
                        op: "init".into(),
                        msg,
                    })
                }
                Err(e) => {
                    self.traps.fetch_add(1, Ordering::Relaxed);
                    return Err(self.classify("init", e, &live.store));
                }
            }
        }
        let live = slot.as_mut().expect("instance made above");
        live.store.data_mut().refused = false;
        live.store
            .set_epoch_deadline(deadline_ticks(self.limits.call_deadline));
        match f(live) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(msg)) => Err(WasmCallError::Guest {
                plugin: self.plugin.name.clone(),
                op: op.into(),
                msg,
            }),
            Err(e) => {
                self.traps.fetch_add(1, Ordering::Relaxed);
                let err = self.classify(op, e, &live.store);
                // A trapped instance cannot be entered again: start afresh next call.
                *slot = None;
                Err(err)
            }
        }
    }

    /// Base ids → patched ids.
    pub fn encode(&self, ids: &[u32]) -> std::result::Result<Vec<u32>, WasmCallError> {
        self.with_live("encode", |l| l.patch.call_encode(&mut l.store, ids))
    }

    /// Patched ids → base ids.
    pub fn decode(&self, ids: &[u32]) -> std::result::Result<Vec<u32>, WasmCallError> {
        self.with_live("decode", |l| l.patch.call_decode(&mut l.store, ids))
    }

    pub fn info(&self) -> std::result::Result<PatchInfo, WasmCallError> {
        self.with_live("info", |l| l.patch.call_info(&mut l.store).map(Ok))
    }
}

/// True for a core WebAssembly module (version 1), false for a component.
pub fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

/// Turn a core module built with wit-bindgen (it carries its component type in a custom
/// section) into a component.
pub fn componentize(core: &[u8]) -> std::result::Result<Vec<u8>, String> {
    wit_component::ComponentEncoder::default()
        .module(core)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| format!("cannot turn the module into a component: {e:#}"))
}

/// Compile and instantiate a component (default limits, no config) and ask its `info()`.
pub fn describe(component: &[u8]) -> std::result::Result<PatchInfo, String> {
    let c = Component::new(engine(), component)
        .map_err(|e| format!("not a valid WebAssembly component: {e:#}"))?;
    let p = WasmPlugin {
        name: String::new(),
        version: String::new(),
        path: PathBuf::new(),
        sha256: String::new(),
        component: c,
        linker: Linker::new(engine()),
    };
    let mut live = p.instantiate(WasmLimits::default())?;
    live.patch
        .call_info(&mut live.store)
        .map_err(|e| format!("info() failed: {e:#}"))
}

/// A WebAssembly tokenizer patch behind the engine's [`TokenPatch`] trait.
pub struct PatchStage(pub Arc<WasmTokenizerPatch>);

impl switchyard_engine::patch::TokenPatch for PatchStage {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn encode(&self, ids: &[u32]) -> switchyard_engine::Result<Vec<u32>> {
        self.0
            .encode(ids)
            .map_err(|e| switchyard_engine::EngineError::Patch(e.to_string()))
    }
    fn decode(&self, ids: &[u32]) -> switchyard_engine::Result<Vec<u32>> {
        self.0
            .decode(ids)
            .map_err(|e| switchyard_engine::EngineError::Patch(e.to_string()))
    }
}
