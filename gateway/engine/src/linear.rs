//! Linear kernels from outside the engine: a pipeline's `linear-kernels` plugin (LaRoSA's
//! sparse kernels) computes the seven projections of every layer in place of the engine's
//! dense matrix products. The output head and LaRoSA's residual adapters stay dense.

use crate::Result;

/// The projections of a layer, numbered as the SDK's `LinearId` numbers them.
pub mod proj {
    pub const Q: u64 = 0;
    pub const K: u64 = 1;
    pub const V: u64 = 2;
    pub const O: u64 = 3;
    pub const GATE: u64 = 4;
    pub const UP: u64 = 5;
    pub const DOWN: u64 = 6;
    pub const NAMES: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];
}

pub trait LinearKernels: Send + Sync {
    fn name(&self) -> &str;
    /// `y[n, out] = x[n, in] · W[layer, projection]ᵀ`.
    fn linear(
        &self,
        layer: usize,
        projection: u64,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<()>;
}
