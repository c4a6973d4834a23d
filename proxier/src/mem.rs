//! Returning freed heap memory to the kernel. Effectful (one libc call).
//!
//! The first sync at 10,000 Services deserializes every listed object (one page at a time),
//! renders and writes a payload of tens of MiB, and frees all of it; glibc keeps most of
//! that freed memory in its arenas (the watcher thread allocates in an arena of its own), so
//! the process would hold its peak for good. `malloc_trim(0)` walks every arena and gives
//! the free pages back (`madvise(MADV_DONTNEED)`), which is what RSS then shows.
#![allow(unsafe_code)]

/// Gives the allocator's free memory back to the kernel (glibc `malloc_trim(0)`); returns
/// whether any was released. A no-op elsewhere than glibc.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a plain integer, touches only the allocator's own state
        // under its locks, and is safe to call from any thread at any time.
        let r = unsafe { libc::malloc_trim(0) };
        r != 0
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn trimming_after_a_large_free_does_not_fail() {
        // 64 MiB in small blocks (below the mmap threshold, so they live in the heap),
        // freed: the call must return without harm; whether pages came back depends on
        // fragmentation, so only the call is checked.
        let v: Vec<Vec<u8>> = (0..65_536).map(|_| vec![1u8; 1024]).collect();
        drop(v);
        let _ = super::release_free_memory();
    }
}
