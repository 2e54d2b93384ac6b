//! Fuzz the GGUF header parser: any byte string must give Ok or Err, never a panic, a hang
//! or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = switchyard_engine::gguf::parse_header(data) {
        // Every tensor the parser accepts lies inside the buffer.
        for t in &h.tensors {
            let end = h.data_offset as usize + t.offset as usize + t.n_bytes;
            assert!(end <= data.len());
        }
    }
});
