//! Template tokenizer patch: merges configured pairs of base ids into new ids.
//!
//! Configuration (the pipeline stage's `config` text):
//!
//! ```text
//! vocab 49152        # size of the base vocabulary; new ids start here
//! pair 504 28        # base id pair -> 49152
//! pair 28 30         # base id pair -> 49153
//! ```
//!
//! `encode` scans left to right and replaces each configured pair by its new id (the first
//! configured pair wins where two overlap); `decode` expands new ids back into their pairs,
//! so `decode(encode(x)) == x` for every x. A real patch (AdaptiVocab) replaces ids of the
//! base vocabulary and needs the matching model; this template only shows the plumbing.
//! Copy this directory, rename the crate and the name in `info`, and change the logic.

use std::cell::RefCell;
use std::collections::HashMap;

// The WIT package of the Switchyard SDK. In a copy outside the repository, point this at
// your copy of sdk/wit.
wit_bindgen::generate!({
    path: "../../wit",
    world: "tokenizer-patch",
});

#[derive(Default)]
struct State {
    vocab: u32,
    pairs: Vec<(u32, u32)>,
    index: HashMap<(u32, u32), u32>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

struct PairMerge;

fn parse(config: &str) -> Result<State, String> {
    let mut st = State::default();
    for (n, line) in config.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| format!("line {}: {s:?} is not an id", n + 1))
        };
        match f.as_slice() {
            ["vocab", v] => st.vocab = num(v)?,
            ["pair", a, b] => {
                let (a, b) = (num(a)?, num(b)?);
                if st.vocab == 0 {
                    return Err(format!("line {}: `vocab N` must come before pairs", n + 1));
                }
                if a >= st.vocab || b >= st.vocab {
                    return Err(format!("line {}: ids must be below vocab {}", n + 1, st.vocab));
                }
                let id = st.vocab + st.pairs.len() as u32;
                if st.index.insert((a, b), id).is_some() {
                    return Err(format!("line {}: pair {a} {b} given twice", n + 1));
                }
                st.pairs.push((a, b));
            }
            _ => return Err(format!("line {}: expected `vocab N` or `pair A B`", n + 1)),
        }
    }
    Ok(st)
}

impl Guest for PairMerge {
    fn init(config: Vec<u8>) -> Result<(), String> {
        let text = String::from_utf8(config).map_err(|e| format!("config is not UTF-8: {e}"))?;
        let st = parse(&text)?;
        STATE.with(|s| *s.borrow_mut() = st);
        Ok(())
    }

    fn encode(ids: Vec<u32>) -> Result<Vec<u32>, String> {
        STATE.with(|s| {
            let s = s.borrow();
            let mut out = Vec::with_capacity(ids.len());
            let mut i = 0;
            while i < ids.len() {
                if i + 1 < ids.len() {
                    if let Some(&m) = s.index.get(&(ids[i], ids[i + 1])) {
                        out.push(m);
                        i += 2;
                        continue;
                    }
                }
                out.push(ids[i]);
                i += 1;
            }
            Ok(out)
        })
    }

    fn decode(ids: Vec<u32>) -> Result<Vec<u32>, String> {
        STATE.with(|s| {
            let s = s.borrow();
            let mut out = Vec::with_capacity(ids.len() + 4);
            for id in ids {
                if s.vocab > 0 && id >= s.vocab {
                    let (a, b) = *s
                        .pairs
                        .get((id - s.vocab) as usize)
                        .ok_or_else(|| format!("id {id} is not in the patched vocabulary"))?;
                    out.push(a);
                    out.push(b);
                } else {
                    out.push(id);
                }
            }
            Ok(out)
        })
    }

    fn info() -> PatchInfo {
        STATE.with(|s| {
            let s = s.borrow();
            PatchInfo {
                name: "pair-merge-patch".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                base_vocab_size: s.vocab,
                patched_vocab_size: if s.pairs.is_empty() {
                    0
                } else {
                    s.vocab + s.pairs.len() as u32
                },
                description: format!("merges {} configured id pairs", s.pairs.len()),
            }
        })
    }
}

export!(PairMerge);
