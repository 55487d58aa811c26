//! The order of k in a packed bf16 kernel: input channels in pairs.
//!
//! The bf16 GEMM multiplies k-pairs, two bf16 in one `u32`. In the NCHW weight's order,
//! k runs over (channel, tap), so a pair would join two taps of one channel (or, a 3×3 kernel
//! having an odd number of taps, the last tap of one channel and the first of the next), and
//! each pair of each column would be gathered from two places. A [`PackedKernel`] of a kernel
//! with several taps and an even number of channels orders k as (channel pair, tap, channel in
//! the pair) instead ([`pair_order`]). Then:
//! - a tile's input is rewritten as planes of `u32` pairs of channels `2c` and `2c + 1` (a
//!   [`Slab`](super::slab::Slab));
//! - k-pair (pair, tap) over consecutive output columns of one row is a run of consecutive
//!   pairs of that pair's plane (of one column phase of it, for strides above 1), shifted by
//!   the tap, which the GEMM reads in place.
//!
//! [`PackedKernel`]: super::PackedKernel

use half::bf16;

/// The order of k (the columns of the packed weight, the rows of the column matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KOrder {
    /// (channel, tap), as the NCHW weight stores it.
    Nchw,
    /// (channel pair, tap, channel in the pair); see the module docs.
    ChannelPairs,
}

impl KOrder {
    /// The order [`super::PackedKernel`] uses for a kernel: channel pairs where there are
    /// several taps and an even number of channels (a 1×1 kernel's two orders are the same).
    pub(super) fn for_kernel(c_in: usize, taps: usize) -> Self {
        if taps > 1 && c_in.is_multiple_of(2) {
            KOrder::ChannelPairs
        } else {
            KOrder::Nchw
        }
    }

    /// The NCHW index (channel · taps + tap) of k index `r` in this order.
    #[inline]
    pub(super) fn nchw_index(self, r: usize, taps: usize) -> usize {
        match self {
            KOrder::Nchw => r,
            KOrder::ChannelPairs => {
                let (pair, tap, half) = (r / (2 * taps), (r / 2) % taps, r % 2);
                (2 * pair + half) * taps + tap
            }
        }
    }
}

/// The NCHW index of each k index of a row in the channel-pair order, in order (as
/// [`KOrder::nchw_index`], without a division per value).
pub(super) fn pair_indices(c_in: usize, taps: usize) -> impl Iterator<Item = usize> {
    (0..c_in / 2).flat_map(move |pair| {
        (0..taps).flat_map(move |tap| (0..2).map(move |half| (2 * pair + half) * taps + tap))
    })
}

/// The `[c_out, c_in · taps]` NCHW weight rows in `order`.
pub(super) fn pair_order(weight: &[bf16], c_in: usize, taps: usize, order: KOrder) -> Vec<bf16> {
    let mut out = weight.to_vec();
    if order == KOrder::ChannelPairs {
        let k = c_in * taps;
        for (dst, src) in out.chunks_exact_mut(k).zip(weight.chunks_exact(k)) {
            for (d, nchw) in dst.iter_mut().zip(pair_indices(c_in, taps)) {
                *d = src[nchw];
            }
        }
    }
    out
}

/// The inverse of [`pair_order`]: NCHW weight rows from rows in `order`.
pub(super) fn nchw_order(rows: &[bf16], c_in: usize, taps: usize, order: KOrder) -> Vec<bf16> {
    let mut out = rows.to_vec();
    if order == KOrder::ChannelPairs {
        let k = c_in * taps;
        for (dst, src) in out.chunks_exact_mut(k).zip(rows.chunks_exact(k)) {
            for (&v, nchw) in src.iter().zip(pair_indices(c_in, taps)) {
                dst[nchw] = v;
            }
        }
    }
    out
}
