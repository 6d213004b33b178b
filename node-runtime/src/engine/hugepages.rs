//! Weight buffers backed by huge pages where the kernel allows it. Decode streams every
//! weight once per token: with 4 KiB pages that is a TLB miss every 4 KiB and the
//! hardware prefetcher stopping at each page edge; 2 MiB pages remove both.

/// An empty vector with room for `len` elements, its memory marked for huge pages
/// before anything touches it (the kernel backs only untouched ranges with them).
pub fn weight_buffer<T>(len: usize) -> Vec<T> {
    let v = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (start, bytes) = (v.as_ptr() as usize, len * std::mem::size_of::<T>());
        // Only whole huge pages inside the allocation.
        let first = start.next_multiple_of(HUGE);
        let end = (start + bytes) / HUGE * HUGE;
        if end > first {
            // SAFETY: the range lies inside this vector's allocation; MADV_HUGEPAGE only
            // changes how the kernel backs it. Failure (THP off) leaves normal pages.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}
