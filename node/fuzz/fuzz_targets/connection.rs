//! Runs arbitrary bytes as a script of client connections against one in-process broker core
//! and checks the broker's answers and state afterwards. The logic lives in
//! `petrel_node::fuzz::fuzz_connection`, which `cargo test` also runs for a time budget.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    petrel_node::fuzz::fuzz_connection(data);
});
