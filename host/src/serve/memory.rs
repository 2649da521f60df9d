//! The allocator under large answers: memory given back when it is freed.
//!
//! With glibc's defaults a freed buffer of a heavy answer (tens of MB: a
//! report read from the store, its encoded body) often stays with the
//! process. The threshold above which a block is its own mapping rises to
//! the largest block freed so far (up to 32 MB), so later large buffers
//! come from the heap arenas, which keep what they once held; and each of
//! up to eight arenas a core keeps its own. Under floods of heavy `GET`s
//! the process held 1.5 times `max_buffered_answers` and, idle afterwards,
//! 0.6 GB. [`tune`] fixes the threshold at 128 KiB (a large block is
//! mapped and unmapped, given back when freed) and allows two arenas a core;
//! [`trim_soon`] gives back the free pages of the arenas each time a heavy
//! answer is done, or a heavy job nobody waited for. Elsewhere than glibc
//! both do nothing.

/// Blocks at least this large are mappings of their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 << 10;

/// Sets the allocator's options for a long-running process; call it first,
/// before any thread is started.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let arenas = libc::c_int::try_from(cores.saturating_mul(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt(3) only sets the allocator's parameters; it is
        // called before other threads exist.
        let set = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_ARENA_MAX, arenas) == 1
        };
        if !set {
            tracing::warn!(
                "cannot set the allocator's options; large answers may leave memory held"
            );
        }
    }
}

/// Set while [`trim_soon`]'s trim runs.
static TRIMMING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Trims ([`trim`]) off the async threads, one trim at a time: a heavy
/// answer or job is done, and what the allocator kept of it goes back
/// (a walk of its arenas), also while others are still under way. A call
/// while a trim runs is that trim's.
pub fn trim_soon() {
    use std::sync::atomic::Ordering;
    if TRIMMING.swap(true, Ordering::SeqCst) {
        return;
    }
    let run = || {
        trim();
        TRIMMING.store(false, Ordering::SeqCst);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(run)),
        Err(_) => run(),
    }
}

/// Gives the free pages of every arena back to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
