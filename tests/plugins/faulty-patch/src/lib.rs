//! A tokenizer patch for the host's tests. Its `init` config selects the misbehaviour:
//!
//! - `ok`: identity patch;
//! - `init-error`: `init` returns an error;
//! - `trap`: `encode` traps (a Rust panic is `unreachable` in a panic=abort guest);
//! - `loop`: `encode` never returns (the host's deadline must stop it);
//! - `grow`: `encode` allocates until the host's memory cap refuses;
//! - `bad-roundtrip`: `decode` does not invert `encode`;
//! - `merge A B C`: a working patch that reads each adjacent pair of ids A B as the one id C
//!   (and C back as A B), to test the accounting of tokens saved. C must be an id the base
//!   tokenizer does not produce (e.g. a byte token that valid UTF-8 never needs).

use std::cell::RefCell;

wit_bindgen::generate!({
    path: "../../../sdk/wit",
    world: "tokenizer-patch",
});


thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Faulty;

/// A, B and C of `merge A B C` (validated by `init`).
fn merge_ids(mode: &str) -> [u32; 3] {
    let v: Vec<u32> = mode[6..]
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    [v[0], v[1], v[2]]
}

fn mode() -> String {
    MODE.with(|m| m.borrow().clone())
}

impl Guest for Faulty {
    fn init(config: Vec<u8>) -> Result<(), String> {
        let m = String::from_utf8(config).map_err(|e| e.to_string())?;
        let m = m.trim().to_string();
        if m == "init-error" {
            return Err("init-error mode: refusing to start".into());
        }
        if let Some(rest) = m.strip_prefix("merge ") {
            let v: Vec<u32> = rest
                .split_whitespace()
                .map(|x| x.parse::<u32>().map_err(|e| format!("merge: {x:?}: {e}")))
                .collect::<Result<_, _>>()?;
            if v.len() != 3 {
                return Err("merge takes three ids: A B C".into());
            }
        } else if !["ok", "trap", "loop", "grow", "bad-roundtrip"].contains(&m.as_str()) {
            return Err(format!("unknown mode {m:?}"));
        }
        MODE.with(|x| *x.borrow_mut() = m);
        Ok(())
    }

    fn encode(ids: Vec<u32>) -> Result<Vec<u32>, String> {
        match mode().as_str() {
            "trap" => panic!("trap mode"),
            "loop" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            m if m.starts_with("merge ") => {
                let [a, b, c] = merge_ids(m);
                let mut out = Vec::with_capacity(ids.len());
                let mut i = 0;
                while i < ids.len() {
                    if i + 1 < ids.len() && ids[i] == a && ids[i + 1] == b {
                        out.push(c);
                        i += 2;
                    } else {
                        out.push(ids[i]);
                        i += 1;
                    }
                }
                Ok(out)
            }
            _ => Ok(ids),
        }
    }

    fn decode(ids: Vec<u32>) -> Result<Vec<u32>, String> {
        let m = mode();
        if m == "bad-roundtrip" {
            return Ok(ids.into_iter().map(|i| i ^ 1).collect());
        }
        if m.starts_with("merge ") {
            let [a, b, c] = merge_ids(&m);
            return Ok(ids
                .into_iter()
                .flat_map(|i| if i == c { vec![a, b] } else { vec![i] })
                .collect());
        }
        Ok(ids)
    }

    fn info() -> PatchInfo {
        PatchInfo {
            name: "faulty-patch".into(),
            version: "0.1.0".into(),
            base_vocab_size: 0,
            patched_vocab_size: 0,
            description: format!("misbehaves on request (mode {:?})", mode()),
        }
    }
}

export!(Faulty);
