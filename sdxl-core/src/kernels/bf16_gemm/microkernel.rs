//! Micro-kernels: one `MR x NR` tile of C from packed A and B panels.
//!
//! Each kernel computes, for `kp` k-pairs, `tile[i][j] = sum_p a[p][i] . b[p][j]` (two bf16
//! products per pair, accumulated in f32) and stores the tile into the f32 scratch block
//! (`first`) or adds it there (later k-blocks). Callers pass slices sized by
//! [`tile_fits`]; a kernel given short slices does nothing and returns `false`.

/// Whether the slices hold `kp` pairs of an `mr x nr` tile and its scratch rows.
#[inline(always)]
pub(super) fn tile_fits(
    mr: usize,
    nr: usize,
    kp: usize,
    a: &[u32],
    b: &[u32],
    c: &[f32],
    ldc: usize,
) -> bool {
    a.len() >= kp * mr && b.len() >= kp * nr && ldc >= nr && c.len() >= (mr - 1) * ldc + nr
}

use super::indexed::IndexedB;

/// Portable micro-kernel: same packed layout, plain f32 arithmetic (any target).
pub(super) fn portable<const MR: usize, const NR: usize>(
    kp: usize,
    a: &[u32],
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
    first: bool,
) -> bool {
    if !tile_fits(MR, NR, kp, a, b, c, ldc) {
        return false;
    }
    let lo = |x: u32| f32::from_bits(x << 16);
    let hi = |x: u32| f32::from_bits(x & 0xffff_0000);
    let mut acc = [[0f32; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kp) {
        for (row, &av) in acc.iter_mut().zip(ap) {
            let (a0, a1) = (lo(av), hi(av));
            for (x, &bv) in row.iter_mut().zip(bp) {
                *x += a0 * lo(bv) + a1 * hi(bv);
            }
        }
    }
    for (row, crow) in acc.iter().zip(c.chunks_mut(ldc)) {
        for (x, y) in row.iter().zip(crow.iter_mut()) {
            *y = if first { *x } else { *y + *x };
        }
    }
    true
}

/// [`portable`] with B read through an [`IndexedB`]: k-pairs `pairs` of panel `panel`.
pub(super) fn portable_indexed<const MR: usize, const NR: usize>(
    pairs: std::ops::Range<usize>,
    a: &[u32],
    b: &IndexedB<'_>,
    panel: usize,
    c: &mut [f32],
    ldc: usize,
    first: bool,
) -> bool {
    let kp = pairs.len();
    let mut panel_b = Vec::with_capacity(kp * NR);
    for p in pairs {
        match b.run(p, panel) {
            Some(run) if run.len() == NR => panel_b.extend_from_slice(run),
            _ => return false,
        }
    }
    portable::<MR, NR>(kp, a, &panel_b, c, ldc, first)
}

/// The AVX512-BF16 micro-kernel (`vdpbf16ps`), x86-64 only (its intrinsics are stable since
/// Rust 1.89, the workspace's `rust-version`).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::{
        __m512, __m512bh, __m512i, _mm512_add_ps, _mm512_dpbf16_ps, _mm512_loadu_ps,
        _mm512_loadu_si512, _mm512_set1_epi32, _mm512_setzero_ps, _mm512_storeu_ps,
    };

    use super::{tile_fits, IndexedB};

    /// Whether this CPU runs the kernel (`avx512f` and `avx512bf16`; std caches the probe).
    pub(in crate::kernels) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    /// An `MR x (16*NV)` tile; see the module docs. Returns `false` (and does nothing) when the
    /// slices are too short or the CPU lacks AVX512-BF16.
    pub(in crate::kernels) fn kernel<const MR: usize, const NV: usize>(
        kp: usize,
        a: &[u32],
        b: &[u32],
        c: &mut [f32],
        ldc: usize,
        first: bool,
    ) -> bool {
        if !tile_fits(MR, 16 * NV, kp, a, b, c, ldc) || !available() {
            return false;
        }
        // SAFETY: the CPU supports avx512f+avx512bf16 (checked above) and the slices hold
        // `kp*MR` A pairs, `kp*16*NV` B pairs and `MR` scratch rows of `16*NV` floats at
        // stride `ldc` (checked by `tile_fits`), which is all the kernel touches.
        unsafe {
            tile::<MR, NV, _>(
                kp,
                a.as_ptr(),
                Packed::<NV>(b.as_ptr()),
                c.as_mut_ptr(),
                ldc,
                first,
            )
        }
        true
    }

    /// [`kernel`] with B read through an [`IndexedB`]: k-pairs `pairs` of panel `panel`.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::kernels) fn kernel_indexed<const MR: usize, const NV: usize>(
        pairs: std::ops::Range<usize>,
        a: &[u32],
        b: &IndexedB<'_>,
        panel: usize,
        c: &mut [f32],
        ldc: usize,
        first: bool,
    ) -> bool {
        let kp = pairs.len();
        let Some((values, offsets, base)) = b.panel(pairs, panel) else {
            return false;
        };
        let nr = 16 * NV;
        if nr > super::super::NR
            || a.len() < kp * MR
            || ldc < nr
            || c.len() < (MR - 1) * ldc + nr
            || !available()
        {
            return false;
        }
        let rows = Offsets {
            values: values.as_ptr(),
            base,
            offsets: offsets.as_ptr(),
        };
        // SAFETY: the CPU supports avx512f+avx512bf16 and `a` and `c` are sized as for
        // `kernel`; every B run `values[offsets[p] + base ..][..NR]` lies inside `values`, an
        // invariant of `IndexedB` (checked when it was built), and `offsets` holds `kp` values.
        unsafe { tile::<MR, NV, _>(kp, a.as_ptr(), rows, c.as_mut_ptr(), ldc, first) }
        true
    }

    /// Where the register-blocked loop finds each k-pair's `16 * NV` B pairs.
    trait BRows {
        /// The next k-pair's pairs.
        ///
        /// # Safety
        /// At most as many calls as the source has k-pairs.
        unsafe fn next_row(&mut self) -> *const u32;
    }

    /// Packed panels: k-pair rows one after the other.
    struct Packed<const NV: usize>(*const u32);

    impl<const NV: usize> BRows for Packed<NV> {
        #[inline(always)]
        unsafe fn next_row(&mut self) -> *const u32 {
            let row = self.0;
            // SAFETY: the caller stays within the panel's k-pairs; one past the last is allowed.
            self.0 = unsafe { row.add(16 * NV) };
            row
        }
    }

    /// Runs found through a table of k-pair offsets plus the panel's own offset.
    struct Offsets {
        values: *const u32,
        base: usize,
        offsets: *const usize,
    }

    impl BRows for Offsets {
        #[inline(always)]
        unsafe fn next_row(&mut self) -> *const u32 {
            // SAFETY: the caller reads no more offsets than the table holds, and each offset
            // plus `base` starts a run inside `values` (see `kernel_indexed`).
            unsafe {
                let row = self.values.add(*self.offsets + self.base);
                self.offsets = self.offsets.add(1);
                row
            }
        }
    }

    /// The register-blocked loop.
    ///
    /// # Safety
    /// The CPU must support avx512f and avx512bf16; `a` must point at `kp*MR` readable `u32`,
    /// `b` must yield `kp` rows of `16*NV` readable `u32`, and `c` must point at `MR` rows of
    /// `16*NV` writable floats `ldc` apart.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn tile<const MR: usize, const NV: usize, B: BRows>(
        kp: usize,
        mut a: *const u32,
        mut b: B,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for _ in 0..kp {
            // SAFETY: one row per k-pair, `kp` in all.
            let row = unsafe { b.next_row() };
            let mut bv = [std::mem::MaybeUninit::<__m512bh>::uninit(); NV];
            for (v, slot) in bv.iter_mut().enumerate() {
                // SAFETY: `v < NV`, so the 16 pairs read lie inside this k-pair's B row.
                let raw: __m512i = unsafe { _mm512_loadu_si512(row.add(16 * v).cast()) };
                // SAFETY: both types are 64 plain bytes; bf16 pairs are reinterpreted as-is.
                slot.write(unsafe { std::mem::transmute::<__m512i, __m512bh>(raw) });
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: `i < MR`: inside this k-pair's A row.
                let pair = unsafe { a.add(i).read_unaligned() };
                // SAFETY: reinterpretation of 64 plain bytes, as above.
                let av = unsafe {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32))
                };
                for (x, bvv) in row.iter_mut().zip(bv.iter()) {
                    // SAFETY: every slot of `bv` was written above.
                    *x = _mm512_dpbf16_ps(*x, av, unsafe { bvv.assume_init() });
                }
            }
            // SAFETY: advancing by one k-pair stays inside (or one past) the panels.
            unsafe {
                a = a.add(MR);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                // SAFETY: row `i < MR`, columns `16*v .. 16*v+16 <= 16*NV <= ldc`.
                unsafe {
                    let p = c.add(i * ldc + 16 * v);
                    let out: __m512 = if first {
                        *x
                    } else {
                        _mm512_add_ps(_mm512_loadu_ps(p), *x)
                    };
                    _mm512_storeu_ps(p, out);
                }
            }
        }
    }
}
