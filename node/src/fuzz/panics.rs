//! Counts panics per thread, so a panic that the runtime catches in a spawned connection task
//! still fails the case, and keeps them quiet while the test driver shrinks an input.

use std::cell::{Cell, RefCell};
use std::sync::Once;

thread_local! {
    static COUNT: Cell<u64> = const { Cell::new(0) };
    static LAST: RefCell<String> = const { RefCell::new(String::new()) };
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Installs the counting hook once; the previous hook still runs unless the thread is quiet.
pub(super) fn install() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            COUNT.set(COUNT.get() + 1);
            let payload = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info.location().map(|l| l.to_string()).unwrap_or_default();
            LAST.with_borrow_mut(|last| *last = format!("{payload} (at {at})"));
            if !QUIET.get() {
                previous(info);
            }
        }));
    });
}

/// Panics on this thread so far.
pub(super) fn count() -> u64 {
    COUNT.get()
}

/// The last panic's message and location on this thread.
pub(super) fn last() -> String {
    LAST.with_borrow(Clone::clone)
}

/// Stops (or resumes) printing panics of this thread.
#[cfg(test)]
pub(super) fn set_quiet(quiet: bool) {
    QUIET.set(quiet);
}
