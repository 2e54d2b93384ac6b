//! Compute backends. The CPU backend is [`crate::forward::Forward`]; with the `cuda` feature
//! a CUDA backend can take the forward pass over (see [`crate::cuda`]). Callers go through
//! [`crate::Engine::forward`] and never name a backend; [`open`] falls back to the CPU with
//! a clear message when no GPU can be used.

use crate::error::Result;
use crate::forward::SeqChunk;
use crate::kv::{KvAllocator, KvLayout};
use crate::model::Model;
use crate::sampling::RowSampling;

/// Where the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(format!(
                    "unknown device '{s}' (expected cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

/// A device backend: runs the forward pass with its own copy of the weights. K/V live in
/// the allocator it was created with (device memory: `KvAllocator::kv` returns device
/// addresses of bf16 data there).
pub trait Backend: Send {
    fn name(&self) -> String;
    /// As [`crate::forward::Forward::forward`]: the requested logits rows on the host.
    fn forward(
        &mut self,
        m: &Model,
        kv: &mut dyn KvAllocator,
        batch: &[SeqChunk],
    ) -> Result<&[f32]>;
    /// Whether [`Self::forward_sampled`] samples on the device (ask before drawing the
    /// rows' random numbers, so that a host fallback does not draw twice).
    fn samples_on_device(&self) -> bool {
        false
    }
    /// The pass with sampling on the device: one id per logits row, drawn with `rows`
    /// (in row order). `None`, without running the pass, when this backend samples on the
    /// host only; then call [`Self::forward`].
    fn forward_sampled(
        &mut self,
        m: &Model,
        kv: &mut dyn KvAllocator,
        batch: &[SeqChunk],
        rows: &[RowSampling],
    ) -> Result<Option<Vec<u32>>> {
        let _ = (m, kv, batch, rows);
        Ok(None)
    }
    /// Another backend over the same device weights with a fresh KV allocator of `layout`
    /// (a new pipeline generation).
    fn fork(&self, layout: KvLayout) -> Result<(Box<dyn Backend>, Box<dyn KvAllocator>)>;
}

/// Whether this build has the CUDA backend.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// A backend for `device` over `m`, or why there is none.
#[allow(clippy::type_complexity)]
pub fn open(
    device: Device,
    m: &Model,
    layout: KvLayout,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Option<(Box<dyn Backend>, Box<dyn KvAllocator>)>> {
    match device {
        Device::Cpu => Ok(None),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => crate::cuda::open(i, m, layout, progress).map(Some),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = (m, layout, progress);
            Err(crate::EngineError::Invalid(
                "this binary was built without the `cuda` feature".into(),
            ))
        }
    }
}
