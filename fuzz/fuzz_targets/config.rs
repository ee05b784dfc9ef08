//! The config reader: any bytes as a trainer's TOML config (and a pipeline's), through every
//! trainer's loader with its key checks and validation. Errors are fine; a panic is a bug.
#![no_main]

#[path = "scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = scratch::file("config.toml", data);
    let none: &[String] = &[];
    let _ = rlhf_train::sft::SftConfig::load(&path, none);
    let _ = rlhf_train::reward::RewardConfig::load(&path, none);
    let _ = rlhf_train::ppo::PpoConfig::load(&path, none);
    let _ = rlhf_train::dpo::DpoConfig::load(&path, none);
    let _ = rlhf_train::kto::KtoConfig::load(&path, none);
    let _ = rlhf_train::rejection_sampling::RsConfig::load(&path, none);
    let _ = rlhf_train::rest::RestConfig::load(&path, none);
});
