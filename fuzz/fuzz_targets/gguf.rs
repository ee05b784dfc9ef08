//! The GGUF reader: any bytes as a .gguf file, converted as `rlhf convert gguf` would.
//! Errors are fine; a panic (or an allocation the file's sizes ask for without the bytes to
//! back it) is a bug.
#![no_main]

#[path = "scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = scratch::file("model.gguf", data);
    let out = scratch::dir().join("gguf-out");
    let _ = rlhf_model::gguf::convert_gguf(&path, &out, candle_core::DType::F32);
    let _ = std::fs::remove_dir_all(&out);
});
