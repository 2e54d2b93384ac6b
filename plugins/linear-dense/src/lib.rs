//! Dense linear layers as a `linear-kernels` plugin: `y = x · Wᵀ` over every input, f32 on
//! the CPU. The reference the sparse kernels (LaRoSA) are compared with, and the built-in
//! default of the linear stage exposed through the same ABI.

use std::collections::HashMap;

use switchyard_plugin::{
    abi, export_linear_kernels, LinearId, LinearKernels, PluginError, PluginResult, Tensor,
};

pub struct DenseLinear {
    /// id → (out, in, weights row-major)
    weights: HashMap<LinearId, (usize, usize, Vec<f32>)>,
}

impl LinearKernels for DenseLinear {
    fn create(config: &str) -> PluginResult<Self> {
        if !config.trim().is_empty() {
            return Err(PluginError::invalid("linear-dense takes no configuration"));
        }
        Ok(Self {
            weights: HashMap::new(),
        })
    }

    fn prepare(&mut self, id: LinearId, weight: &Tensor) -> PluginResult<()> {
        let s = weight.shape();
        if s.len() != 2 {
            return Err(PluginError::invalid(format!(
                "weight {id:?} must be 2-D, got {s:?}"
            )));
        }
        // SAFETY: the host's view is valid for this call; we copy it.
        let w = unsafe { weight.as_f32()? }.to_vec();
        self.weights.insert(id, (s[0] as usize, s[1] as usize, w));
        Ok(())
    }

    fn linear(
        &self,
        id: LinearId,
        x: &Tensor,
        y: &Tensor,
        cuda: Option<&abi::CudaContext>,
    ) -> PluginResult<()> {
        if cuda.is_some() {
            return Err(PluginError::invalid("linear-dense runs on the CPU only"));
        }
        let (out, inp, w) = self
            .weights
            .get(&id)
            .ok_or_else(|| PluginError::invalid(format!("weight {id:?} was not prepared")))?;
        // SAFETY: views valid for the call.
        let (xs, ys) = unsafe { (x.as_f32()?, y.as_f32_mut()?) };
        if xs.len() % inp != 0 || ys.len() != xs.len() / inp * out {
            return Err(PluginError::invalid(format!(
                "x {:?} / y {:?} do not fit weight {out} x {inp}",
                x.shape(),
                y.shape()
            )));
        }
        for (xr, yr) in xs.chunks_exact(*inp).zip(ys.chunks_exact_mut(*out)) {
            for (o, wr) in yr.iter_mut().zip(w.chunks_exact(*inp)) {
                *o = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            }
        }
        Ok(())
    }
}

export_linear_kernels!(DenseLinear, name = "linear-dense", version = "0.1.0");

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin_test_support as ts;

    #[test]
    fn conformance() {
        ts::linear_kernels::conformance::<DenseLinear>("");
        let d = ts::root_descriptor(switchyard_plugin_v1).unwrap();
        assert_eq!(
            (d.kind.as_str(), d.name.as_str()),
            ("linear-kernels", "linear-dense")
        );
    }
}
