//! The safetensors and index reader: the first byte picks what the rest is: a single
//! `model.safetensors`, or a `model.safetensors.index.json` beside one small valid shard.
//! Errors are fine; a panic is a bug.
#![no_main]

#[path = "scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;

/// A valid shard holding one 2x2 f32 tensor `a`.
fn shard() -> Vec<u8> {
    let header = br#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(&[0u8; 16]);
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch::dir().join("st");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if which % 2 == 0 {
        std::fs::write(dir.join("model.safetensors"), rest).unwrap();
    } else {
        std::fs::write(dir.join("model-00001-of-00001.safetensors"), shard()).unwrap();
        std::fs::write(dir.join("model.safetensors.index.json"), rest).unwrap();
    }
    if let Ok(w) = rlhf_model::weights::WeightSource::from_dir(
        &dir,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    ) {
        for name in w.names() {
            let _ = w.tensor(name).map(|t| t.dims().to_vec());
        }
    }
});
