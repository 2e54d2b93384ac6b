//! Compute backends. The CPU backend is [`crate::forward::Forward`]; with the `cuda` feature
//! a CUDA backend can take the forward pass over (see [`crate::cuda`]). Callers go through
//! [`crate::Engine::forward`] and never name a backend; [`open`] falls back to the CPU with
//! a clear message when no GPU can be used.

use crate::error::Result;
use crate::forward::SeqChunk;
use crate::kv::{KvAllocator, KvLayout};
use crate::model::Model;
use crate::sampling::RowSampling;
use std::sync::Arc;

/// LaRoSA's activation sparsity as a device backend runs it (the `linear_kernels` stage's
/// settings, as the larosa plugin reads them): per token keep the `⌊(1 − coef·s)·d⌋`
/// largest |x| of each linear layer's input, `coef_in` on the q/k/v and gate/up inputs,
/// `coef_out` on the o_proj and down_proj inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActivationSparsity {
    pub sparsity: f64,
    pub coef_in: f64,
    pub coef_out: f64,
}

impl ActivationSparsity {
    /// From a `key = value` configuration (`sparsity`, `coef_in`, `coef_out`; other keys
    /// are the plugin's and ignored here); `None` at sparsity 0.
    pub fn from_config(config: &str) -> std::result::Result<Option<Self>, String> {
        let mut a = Self {
            sparsity: 0.0,
            coef_in: 0.8,
            coef_out: 1.2,
        };
        for (n, line) in config.lines().enumerate() {
            let Some((k, v)) = line.split('#').next().and_then(|l| l.split_once('=')) else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            let num = || {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| format!("line {}: {k} = {v:?} is not a number >= 0", n + 1))
            };
            match k {
                "sparsity" => a.sparsity = num()?,
                "coef_in" => a.coef_in = num()?,
                "coef_out" => a.coef_out = num()?,
                _ => {}
            }
        }
        if a.sparsity >= 1.0 {
            return Err(format!("sparsity {} must be below 1", a.sparsity));
        }
        Ok((a.sparsity > 0.0).then_some(a))
    }
}

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
    /// A backend of a new pipeline generation over host weights `m` of the same shapes
    /// (e.g. a LaRoSA-rotated model; uploaded to the device, shared while any backend uses
    /// them) running with activation sparsity `s`, and a fresh KV allocator of `layout`.
    fn fork_over(
        &self,
        layout: KvLayout,
        m: &Arc<Model>,
        s: Option<ActivationSparsity>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Box<dyn Backend>, Box<dyn KvAllocator>)> {
        let _ = (layout, m, s, progress);
        Err(crate::EngineError::Invalid(format!(
            "the {} backend serves only the weights it was opened with",
            self.name()
        )))
    }
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

#[cfg(test)]
mod tests {
    use super::ActivationSparsity;

    #[test]
    fn activation_sparsity_reads_the_larosa_configuration() {
        let a = ActivationSparsity::from_config(
            "sparsity = 0.4  # LaRoSA\ncoef_out = 1.1\nthreads = 4",
        )
        .unwrap()
        .unwrap();
        assert_eq!((a.sparsity, a.coef_in, a.coef_out), (0.4, 0.8, 1.1));
        assert_eq!(ActivationSparsity::from_config("").unwrap(), None);
        assert_eq!(
            ActivationSparsity::from_config("sparsity = 0").unwrap(),
            None
        );
        let e = ActivationSparsity::from_config("sparsity = lots").unwrap_err();
        assert!(e.contains("line 1") && e.contains("sparsity"), "{e}");
        assert!(ActivationSparsity::from_config("sparsity = 1.5").is_err());
        assert!(ActivationSparsity::from_config("coef_in = -1").is_err());
    }
}
