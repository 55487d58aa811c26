//! Reading a CPU tensor's values in place, for the kernels.

use candle_core::{Layout, Storage, WithDType};

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
