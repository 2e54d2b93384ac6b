//! A tokenizer patch for the host's tests. Its `init` config selects the misbehaviour:
//!
//! - `ok`: identity patch;
//! - `init-error`: `init` returns an error;
//! - `trap`: `encode` traps (a Rust panic is `unreachable` in a panic=abort guest);
//! - `loop`: `encode` never returns (the host's deadline must stop it);
//! - `grow`: `encode` allocates until the host's memory cap refuses;
//! - `bad-roundtrip`: `decode` does not invert `encode`.

use std::cell::RefCell;

wit_bindgen::generate!({
    path: "../../../sdk/wit",
    world: "tokenizer-patch",
});


thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Faulty;

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
        if !["ok", "trap", "loop", "grow", "bad-roundtrip"].contains(&m.as_str()) {
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
            _ => Ok(ids),
        }
    }

    fn decode(ids: Vec<u32>) -> Result<Vec<u32>, String> {
        if mode() == "bad-roundtrip" {
            return Ok(ids.into_iter().map(|i| i ^ 1).collect());
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
