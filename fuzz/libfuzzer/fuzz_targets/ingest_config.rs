#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_fuzz::ingest_config(data));
