//! Fuzzing for a time budget inside `cargo test`, and the saved failing inputs replayed.
//!
//! Inputs are random byte strings (proptest's generator, a new seed each run), each run in a
//! thread of its own so that a hang fails the test instead of stalling it. A failing input is
//! shrunk (proptest's shrinking of the byte string), written to
//! `node/fuzz/regressions/<target>/` and reported; the regression tests replay every file
//! there, so it stays a test once committed.
//!
//! `PETREL_FUZZ_SECS` sets the budget per target (default 2 s; `scripts/test.sh` gives more).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::any;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};

use super::coverage::COVERAGE;
use super::{fuzz_codec, fuzz_connection, panics, script::Script};
use crate::codec::fuzz_logic;

const DEFAULT_BUDGET: Duration = Duration::from_secs(2);
/// A case still running after this is reported as a hang.
const HANG: Duration = Duration::from_secs(30);
/// Time spent making a failing input smaller.
const SHRINK_FOR: Duration = Duration::from_secs(60);
const MAX_INPUT: usize = 768;
/// Runs of each saved input in the regression tests.
const REPLAYS: usize = 10;

fn budget() -> Duration {
    std::env::var("PETREL_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(DEFAULT_BUDGET, Duration::from_secs_f64)
}

fn regressions(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target)
}

/// Runs `check(data)` in a thread of its own: Err with the panic message, or on a hang.
fn run_case(check: fn(&[u8]), data: &[u8]) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    let data = data.to_vec();
    std::thread::Builder::new()
        .name("fuzz-case".into())
        .spawn(move || {
            panics::install();
            panics::set_quiet(true);
            let r = catch_unwind(AssertUnwindSafe(|| check(&data)));
            let _ = tx.send(r.map_err(|_| panics::last()));
        })
        .expect("spawn a fuzz case thread");
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| Err(format!("no result within {HANG:?} (hang)")))
}

/// Fuzzes `check` until the budget is spent; a failure is shrunk, saved and reported.
/// `culprit` turns the failing input into what the regression directory keeps.
fn fuzz_for_budget(
    target: &str,
    check: fn(&[u8]),
    culprit: fn(&[u8]) -> Vec<u8>,
    coverage: fn() -> String,
) {
    let budget = budget();
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let inputs = vec(any::<u8>(), 0..MAX_INPUT);
    let start = Instant::now();
    let mut cases = 0u64;
    while start.elapsed() < budget {
        let mut tree = inputs.new_tree(&mut runner).expect("generate an input");
        cases += 1;
        if let Err(why) = run_case(check, &tree.current()) {
            let (input, why) = shrink(&mut tree, check, why);
            let keep = culprit(&input);
            let saved = save(target, &keep);
            panic!(
                "fuzz {target}: case {cases} failed: {why}\nsaved as {saved}\ninput \
                 ({} bytes): {}\nscript: {:#?}",
                input.len(),
                hex(&input),
                Script::parse(&input).ops
            );
        }
    }
    eprintln!(
        "fuzz {target}: {cases} cases in {:.1?}, no failure{}",
        start.elapsed(),
        coverage()
    );
}

/// Proptest's shrinking, driven by hand so that the budget does not cut it short.
fn shrink(
    tree: &mut impl ValueTree<Value = Vec<u8>>,
    check: fn(&[u8]),
    why: String,
) -> (Vec<u8>, String) {
    let mut best = (tree.current(), why);
    let stop = Instant::now() + SHRINK_FOR;
    if !tree.simplify() {
        return best;
    }
    while Instant::now() < stop {
        let data = tree.current();
        match run_case(check, &data) {
            Err(why) => {
                best = (data, why);
                if !tree.simplify() {
                    break;
                }
            }
            Ok(()) => {
                if !tree.complicate() {
                    break;
                }
            }
        }
    }
    best
}

fn save(target: &str, data: &[u8]) -> String {
    // FNV-1a: a stable name, so the same input is saved once.
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = regressions(target).join(format!("crash-{hash:016x}"));
    match std::fs::create_dir_all(regressions(target)).and_then(|()| std::fs::write(&path, data)) {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("nowhere ({}: {e})", path.display()),
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every saved input of `target`, with its file name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let Ok(dir) = std::fs::read_dir(regressions(target)) else {
        return Vec::new();
    };
    let mut files: Vec<_> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.') && !n.ends_with(".md"))
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).expect("read a regression input");
            (p.display().to_string(), data)
        })
        .collect()
}

/// Runs each saved input of `target` a few times: a case can depend on how fast the store's
/// writer thread commits, so one run may miss what another catches.
fn replay(target: &str, check: fn(&[u8])) {
    let failures: Vec<String> = corpus(target)
        .into_iter()
        .filter_map(|(name, data)| {
            (0..REPLAYS)
                .find_map(|_| run_case(check, &data).err())
                .map(|e| format!("{name}: {e}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn connection_fuzz_for_a_time_budget() {
    fn coverage() -> String {
        format!("; {}", COVERAGE.summary())
    }
    fuzz_for_budget("connection", fuzz_connection, <[u8]>::to_vec, coverage);
}

#[test]
fn codec_fuzz_for_a_time_budget() {
    // Saved for the cargo-fuzz `decode` target, which checks raw bytes only.
    fn culprit(data: &[u8]) -> Vec<u8> {
        match run_case(fuzz_logic, data) {
            Err(_) => data.to_vec(),
            Ok(()) => Script::parse(data).wire(),
        }
    }
    fuzz_for_budget("decode", fuzz_codec, culprit, String::new);
}

#[test]
fn connection_regressions() {
    replay("connection", fuzz_connection);
}

#[test]
fn decode_regressions() {
    replay("decode", fuzz_logic);
}

/// Fixed inputs (empty, all zeros, ramps) pass: the driver itself is sound.
#[test]
fn fixed_scripts_pass() {
    fuzz_connection(&[]);
    fuzz_connection(&[0; 64]);
    let ramp: Vec<u8> = (0..=255).collect();
    fuzz_connection(&ramp);
    fuzz_connection(&ramp.iter().rev().copied().collect::<Vec<_>>());
}

/// Debugging aid: `PETREL_FUZZ_INPUT=<absolute path> cargo test -p petrel-node --lib replay_input --
/// --nocapture` prints the file's script and runs it (passes when the variable is unset).
#[test]
fn replay_input() {
    let Some(path) = std::env::var_os("PETREL_FUZZ_INPUT") else {
        return;
    };
    let data = std::fs::read(&path).expect("read PETREL_FUZZ_INPUT");
    let script = Script::parse(&data);
    eprintln!(
        "config: {:?}\nsocket buffer: {}",
        script.config, script.socket_buffer
    );
    for op in &script.ops {
        eprintln!("{op:?}");
    }
    fuzz_connection(&data);
}
