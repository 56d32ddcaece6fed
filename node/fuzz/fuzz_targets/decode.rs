//! Decodes arbitrary bytes at every protocol level; whatever decodes must re-encode to an equal
//! packet. The checks live in `petrel_node::codec::fuzz_logic` so proptest runs them too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    petrel_node::codec::fuzz_logic(data);
});
