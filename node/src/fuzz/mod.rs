//! Fuzzing whole connections in process, and the drivers that run it (and the codec's check)
//! for a time budget inside `cargo test`.
//!
//! [`fuzz_connection`] reads its input as a script: broker settings, then up to three client
//! connections on in-memory sockets, each served by the real `connection::serve` of one broker
//! core (with the process's RocksDB store). A connection opens with a CONNECT (3.1, 3.1.1 or
//! 5.0, sometimes mutated, refused by a limit, or junk), then sends packets drawn from small
//! pools (PUBLISH QoS 0-2 with retain and aliases, SUBSCRIBE with wildcards and `$share`,
//! UNSUBSCRIBE, acknowledgements with ids the broker uses, PINGREQ, DISCONNECT, packets only
//! a server sends), mutated packets and junk, split into writes at chosen points. Client ids
//! repeat across connections, so sessions are taken over and resumed.
//!
//! Checked: nothing panics; what the broker writes decodes and keeps the protocol's rules as
//! [`view`] follows them; every connection answers and closes within a deadline; a fresh
//! client still gets a publish round trip; afterwards only sessions with an expiry remain, and
//! ending them empties the registry and the subscription trie.
//!
//! Built for tests and with the `fuzzing` feature (the cargo-fuzz crate in `node/fuzz`).

mod after;
mod client;
mod coverage;
mod input;
mod packets;
mod panics;
mod run;
mod script;
mod view;

#[cfg(test)]
mod fuzz_test;

pub use run::fuzz_connection;

/// The codec's fuzz check on `data` itself and on the client bytes of `data` read as a
/// connection script (valid packets of every protocol level, mutated ones and junk).
pub fn fuzz_codec(data: &[u8]) {
    crate::codec::fuzz_logic(data);
    crate::codec::fuzz_logic(&script::Script::parse(data).wire());
}
