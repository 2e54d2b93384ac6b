//! Switchyard's inference engine.
//!
//! - [`gguf`] and [`model`]: GGUF v3 (mmap) and Hugging Face safetensors directories, llama
//!   architecture (GQA, tied or separate head, RoPE in either pairing).
//! - [`quant`]: tensor types and the SIMD dot products (f32 activations on every path).
//! - [`tokenizer`] and [`chat`]: HF `tokenizers` built from tokenizer.json or GGUF metadata;
//!   the model's Jinja chat template.
//! - [`forward`]: the batched forward pass over several sequences; [`kv`]: the KV-cache
//!   allocator interface; [`pool`]: the thread pool; [`linear`]: linear kernels from a
//!   plugin; [`larosa`]: LaRoSA calibration and rotated models.
//! - [`engine`]: generation and perplexity loops; [`sampling`]: the sampler;
//!   [`scheduler`]: continuous batching with chunked prefill over many sequences.

pub mod backend;
pub mod chat;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod forward;
pub mod gguf;
pub mod kv;
pub mod larosa;
pub mod linear;
pub mod model;
pub mod patch;
pub mod pool;
pub mod quant;
pub mod sampling;
pub mod scheduler;
pub mod tensors;
pub mod tokenizer;

pub use engine::{Engine, EngineOptions, FinishReason, GenerateOutput, GenerateRequest};
pub use error::{EngineError, Result};
