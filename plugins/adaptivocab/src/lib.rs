//! AdaptiVocab tokenizer patch as a WebAssembly component (world `tokenizer-patch`).
//!
//! `init` takes an AdaptiVocab patch file (JSON, format `switchyard-adaptivocab-patch` v1,
//! written by `switchyard vocab build`; give it to the pipeline stage as `config_file`).
//! `encode` maps base ids to patched ids (removed tokens expanded, domain n-grams merged),
//! `decode` maps them back. The algorithm lives in `switchyard-adaptivocab`, the same code the
//! host tools run natively.

use std::cell::RefCell;

use switchyard_adaptivocab::Patch;

wit_bindgen::generate!({
    path: "../../sdk/wit",
    world: "tokenizer-patch",
});

thread_local! {
    static PATCH: RefCell<Option<Patch>> = const { RefCell::new(None) };
}

fn with<T>(f: impl FnOnce(&Patch) -> Result<T, String>) -> Result<T, String> {
    PATCH.with(|p| match p.borrow().as_ref() {
        Some(p) => f(p),
        None => Err("adaptivocab: init was not called with a patch".into()),
    })
}

struct AdaptiVocab;

impl Guest for AdaptiVocab {
    fn init(config: Vec<u8>) -> Result<(), String> {
        if config.iter().all(|b| b.is_ascii_whitespace()) {
            return Err("adaptivocab needs a patch file as its configuration \
                        (pipeline stage `config_file = \"PATCH.json\"`)"
                .into());
        }
        let p = Patch::from_json(&config)?;
        PATCH.with(|s| *s.borrow_mut() = Some(p));
        Ok(())
    }

    fn encode(ids: Vec<u32>) -> Result<Vec<u32>, String> {
        with(|p| p.encode(&ids))
    }

    fn decode(ids: Vec<u32>) -> Result<Vec<u32>, String> {
        with(|p| p.decode(&ids))
    }

    fn info() -> PatchInfo {
        PATCH.with(|p| {
            let p = p.borrow();
            let (base, desc) = match p.as_ref() {
                Some(p) => (
                    p.base_vocab_size(),
                    format!(
                        "{} domain n-grams in {} freed ids ({} matching){}{}",
                        p.file.added.len(),
                        p.file.removed.len(),
                        match p.matching {
                            switchyard_adaptivocab::Matching::Longest => "longest",
                            switchyard_adaptivocab::Matching::SelectionOrder => "selection-order",
                        },
                        if p.file.description.is_empty() { "" } else { ": " },
                        p.file.description
                    ),
                ),
                None => (0, "no patch loaded".into()),
            };
            PatchInfo {
                name: "adaptivocab".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                base_vocab_size: base,
                // Ids are redefined (freed ids carry n-grams): the model must be the patched one.
                patched_vocab_size: base,
                description: desc,
            }
        })
    }
}

export!(AdaptiVocab);
