//! Reading a CPU tensor's values in place, and allocating the buffers that kernels write, for
//! the kernels.

use std::mem::MaybeUninit;

use candle_core::{Layout, Storage, WithDType};

use crate::loading::memory::advise_huge_pages;

/// The values of a contiguous tensor of `T` on the CPU, from the storage and layout that
/// `Tensor::storage_and_layout` gives; `what` names the caller in errors.
///
/// # Errors
/// The tensor is not on the CPU, not contiguous, not of `T`, or its storage is shorter than
/// its layout.
pub(crate) fn contiguous_values<'a, T: WithDType>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("{what}: expected a CPU tensor")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: expected a contiguous tensor")
    };
    cpu.as_slice::<T>()?
        .get(start..end)
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: storage too short")))
}

/// A buffer of `len` values for a kernel that writes every one of them: neither zeroed nor
/// touched here, so the pages are faulted in by the threads that write them (in huge pages
/// where Linux allows), not by the calling thread alone, and no zeros are written first.
///
/// [`assume_written`] turns it into values once the kernel has written them.
pub(crate) fn unwritten<T>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut buffer = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`, and `MaybeUninit` values need no initialisation.
    unsafe { buffer.set_len(len) };
    advise_huge_pages(&mut buffer);
    buffer
}

/// The values of a buffer from [`unwritten`].
///
/// # Safety
/// Every element of `buffer` has been written.
pub(crate) unsafe fn assume_written<T>(buffer: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut buffer = std::mem::ManuallyDrop::new(buffer);
    let (ptr, len, capacity) = (buffer.as_mut_ptr(), buffer.len(), buffer.capacity());
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, the allocation is the vector's own (not
    // dropped: `ManuallyDrop`), and the caller guarantees the `len` elements are initialised.
    unsafe { Vec::from_raw_parts(ptr.cast::<T>(), len, capacity) }
}
