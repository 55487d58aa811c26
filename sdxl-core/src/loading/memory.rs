//! Hints to the operating system about how weight buffers are used.

/// Asks Linux to back a fresh, untouched weight buffer with transparent huge pages: 512× fewer
/// page faults while it is filled, and fewer TLB misses whenever the GEMM packs the weight.
/// Only the 2 MiB-aligned middle of the buffer qualifies; small buffers are left alone.
pub(crate) fn advise_huge_pages<T>(buffer: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buffer.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buffer);
        let (first, last) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if last > first {
            // SAFETY: the range lies inside `buffer`, which this function borrows mutably;
            // MADV_HUGEPAGE only changes how the kernel backs the pages, never their contents.
            let _ = unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buffer;
}

/// Hands memory that the allocator holds free back to the system (glibc's `malloc_trim`): after
/// a component read on demand is dropped, its weights' pages would otherwise stay with the
/// process, counted in its resident set, until the allocator reuses them. Elsewhere a no-op.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
