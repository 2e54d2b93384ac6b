//! Tokenizer patches: a map from the base tokenizer's ids to the ids a patched model reads,
//! and back (AdaptiVocab-style domain vocabularies). The scheduler encodes each prompt when
//! it admits the request, and decodes each generated id before detokenizing it, so the rest
//! of the engine (tokenizer, stop strings, streaming text) sees base ids only.

use crate::Result;

pub trait TokenPatch: Send + Sync {
    fn name(&self) -> &str;
    /// Base ids → patched ids.
    fn encode(&self, ids: &[u32]) -> Result<Vec<u32>>;
    /// Patched ids → base ids.
    fn decode(&self, ids: &[u32]) -> Result<Vec<u32>>;
}
