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
    b: &IndexedB<'_, u32>,
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

/// The portable f32 kernel over an f32 [`IndexedB`] (rows `steps` of panel `panel`): fused
/// multiply-adds in the same order as the AVX-512 one, so the two agree bit for bit.
#[allow(clippy::too_many_arguments)]
pub(super) fn portable_f32<const MR: usize, const NR: usize>(
    steps: std::ops::Range<usize>,
    a: &[f32],
    b: &IndexedB<'_, f32>,
    panel: usize,
    c: &mut [f32],
    ldc: usize,
    first: bool,
) -> bool {
    if a.len() < steps.len() * MR || ldc < NR || c.len() < (MR - 1) * ldc + NR {
        return false;
    }
    let mut acc = [[0f32; NR]; MR];
    for (step, ap) in steps.zip(a.chunks_exact(MR)) {
        let Some(run) = b.run(step, panel) else {
            return false;
        };
        for (row, &av) in acc.iter_mut().zip(ap) {
            for (x, &bv) in row.iter_mut().zip(run) {
                *x = av.mul_add(bv, *x);
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

/// The AVX-512 micro-kernels, x86-64 only: bf16 pairs with `vdpbf16ps` (AVX512-BF16, whose
/// intrinsics are stable since Rust 1.89, the workspace's `rust-version`), and f32 with
/// `vfmadd231ps` (AVX-512F) for the f32 convolution. Both share one register-blocked loop.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::{
        __m512, __m512bh, __m512i, _mm512_add_ps, _mm512_castsi512_ps, _mm512_dpbf16_ps,
        _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_set1_epi32, _mm512_set1_ps,
        _mm512_setzero_ps, _mm512_storeu_ps,
    };

    use super::{tile_fits, IndexedB};

    /// Whether this CPU runs the bf16 kernel (`avx512f` and `avx512bf16`; std caches the
    /// probe).
    pub(in crate::kernels) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    /// Whether this CPU runs the f32 kernel (`avx512f`).
    pub(in crate::kernels) fn f32_available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// An `MR x (16*NV)` bf16 tile; see the module docs. Returns `false` (and does nothing)
    /// when the slices are too short or the CPU lacks AVX512-BF16.
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
            Bf16Pairs::compiled_tile::<MR, NV, _>(
                kp,
                a.as_ptr(),
                Packed::<u32, NV>(b.as_ptr()),
                c.as_mut_ptr(),
                ldc,
                first,
            )
        }
        true
    }

    /// An `MR x (16*NV)` tile in the arithmetic `Ar` ([`Bf16Pairs`] or [`F32`]): `c (=|+=)
    /// a · b`, A packed as `[k-step][MR]` and B read through an [`IndexedB`] (k-steps `steps`
    /// of panel `panel`). Returns `false` (and does nothing) when the slices are too short or
    /// the CPU lacks the kernel's features.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::kernels) fn kernel_indexed<Ar: Arith, const MR: usize, const NV: usize>(
        steps: std::ops::Range<usize>,
        a: &[Ar::A],
        b: &IndexedB<'_, Ar::B>,
        panel: usize,
        c: &mut [f32],
        ldc: usize,
        first: bool,
    ) -> bool {
        let Some(rows) = Offsets::checked::<MR, NV, _>(steps, a, b, panel, c, ldc) else {
            return false;
        };
        if !Ar::available() {
            return false;
        }
        // SAFETY: the CPU supports the kernel's features (checked just above);
        // `Offsets::checked` sized `a` and `c` and made `rows` yield only runs inside B's
        // buffer.
        unsafe {
            Ar::compiled_tile::<MR, NV, _>(rows.steps, a.as_ptr(), rows, c.as_mut_ptr(), ldc, first)
        }
        true
    }

    /// Where the register-blocked loop finds each k-step's `16 * NV` B values.
    pub(in crate::kernels) trait BRows<T> {
        /// The next k-step's values.
        ///
        /// # Safety
        /// At most as many calls as the source has k-steps.
        unsafe fn next_row(&mut self) -> *const T;
    }

    /// Packed panels: k-step rows one after the other.
    struct Packed<T, const NV: usize>(*const T);

    impl<T, const NV: usize> BRows<T> for Packed<T, NV> {
        #[inline(always)]
        unsafe fn next_row(&mut self) -> *const T {
            let row = self.0;
            // SAFETY: the caller stays within the panel's k-steps; one past the last is
            // allowed.
            self.0 = unsafe { row.add(16 * NV) };
            row
        }
    }

    /// Runs found through a table of k-step offsets plus the panel's own offset.
    struct Offsets<T> {
        values: *const T,
        base: usize,
        offsets: *const usize,
        steps: usize,
    }

    impl<T> Offsets<T> {
        /// The runs of k-steps `steps` of panel `panel` of `b`, if `a` holds `MR` values per
        /// step and `c` holds `MR` rows of `16 * NV` floats `ldc` apart.
        fn checked<const MR: usize, const NV: usize, A>(
            steps: std::ops::Range<usize>,
            a: &[A],
            b: &IndexedB<'_, T>,
            panel: usize,
            c: &[f32],
            ldc: usize,
        ) -> Option<Self> {
            let count = steps.len();
            let (values, offsets, base) = b.panel(steps, panel)?;
            let nr = 16 * NV;
            let fits = nr <= super::super::NR
                && a.len() >= count * MR
                && ldc >= nr
                && c.len() >= (MR - 1) * ldc + nr;
            fits.then_some(Self {
                values: values.as_ptr(),
                base,
                offsets: offsets.as_ptr(),
                steps: count,
            })
        }
    }

    impl<T> BRows<T> for Offsets<T> {
        #[inline(always)]
        unsafe fn next_row(&mut self) -> *const T {
            // SAFETY: the caller reads no more offsets than the table holds, and each offset
            // plus `base` starts a run of `NR` values inside `values` (an invariant of
            // `IndexedB`, checked when it was built).
            unsafe {
                let row = self.values.add(*self.offsets + self.base);
                self.offsets = self.offsets.add(1);
                row
            }
        }
    }

    /// The arithmetic of a kernel: its A and B elements, how a broadcast A element times a
    /// vector of B is accumulated, and the register-blocked loop compiled for its features.
    pub(in crate::kernels) trait Arith {
        /// One A element, broadcast to a whole register.
        type A: Copy;
        /// One B element (4 bytes: 16 per register).
        type B;

        /// Whether this CPU has the kernel's features.
        fn available() -> bool;

        /// The register-blocked loop [`tile`] compiled for the kernel's features.
        ///
        /// # Safety
        /// As [`tile`]; the CPU must have the kernel's features ([`Arith::available`]).
        unsafe fn compiled_tile<const MR: usize, const NV: usize, B: BRows<Self::B>>(
            kp: usize,
            a: *const Self::A,
            b: B,
            c: *mut f32,
            ldc: usize,
            first: bool,
        );

        /// `a` in every lane.
        ///
        /// # Safety
        /// The CPU must support the kernel's features.
        unsafe fn splat(a: Self::A) -> __m512i;

        /// `acc + a · b`, lane by lane (for bf16 pairs: both products of each pair).
        ///
        /// # Safety
        /// The CPU must support the kernel's features.
        unsafe fn madd(acc: __m512, a: __m512i, b: __m512i) -> __m512;
    }

    /// bf16 pairs and `vdpbf16ps`.
    pub(in crate::kernels) struct Bf16Pairs;

    impl Arith for Bf16Pairs {
        type A = u32;
        type B = u32;

        fn available() -> bool {
            available()
        }

        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn compiled_tile<const MR: usize, const NV: usize, B: BRows<u32>>(
            kp: usize,
            a: *const u32,
            b: B,
            c: *mut f32,
            ldc: usize,
            first: bool,
        ) {
            // SAFETY: forwarded from the caller.
            unsafe { tile::<Self, MR, NV, B>(kp, a, b, c, ldc, first) }
        }

        #[inline(always)]
        unsafe fn splat(a: u32) -> __m512i {
            _mm512_set1_epi32(a as i32)
        }

        #[inline(always)]
        unsafe fn madd(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
            // SAFETY: both reinterpretations are of 64 plain bytes; bf16 pairs stay as they
            // are. The caller guarantees the CPU features.
            unsafe {
                _mm512_dpbf16_ps(
                    acc,
                    std::mem::transmute::<__m512i, __m512bh>(a),
                    std::mem::transmute::<__m512i, __m512bh>(b),
                )
            }
        }
    }

    /// f32 and `vfmadd231ps`.
    pub(in crate::kernels) struct F32;

    impl Arith for F32 {
        type A = f32;
        type B = f32;

        fn available() -> bool {
            f32_available()
        }

        #[target_feature(enable = "avx512f")]
        unsafe fn compiled_tile<const MR: usize, const NV: usize, B: BRows<f32>>(
            kp: usize,
            a: *const f32,
            b: B,
            c: *mut f32,
            ldc: usize,
            first: bool,
        ) {
            // SAFETY: forwarded from the caller.
            unsafe { tile::<Self, MR, NV, B>(kp, a, b, c, ldc, first) }
        }

        #[inline(always)]
        unsafe fn splat(a: f32) -> __m512i {
            std::arch::x86_64::_mm512_castps_si512(_mm512_set1_ps(a))
        }

        #[inline(always)]
        unsafe fn madd(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
            _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc)
        }
    }

    /// The register-blocked loop.
    ///
    /// # Safety
    /// The CPU must support the features of `Ar`'s kernel; `a` must point at `kp*MR` readable
    /// A elements, `b` must yield `kp` rows of `16*NV` readable B elements, and `c` must point
    /// at `MR` rows of `16*NV` writable floats `ldc` apart.
    #[inline(always)]
    unsafe fn tile<Ar: Arith, const MR: usize, const NV: usize, B: BRows<Ar::B>>(
        kp: usize,
        mut a: *const Ar::A,
        mut b: B,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        // SAFETY (whole body): the caller guarantees the CPU features and the extents above.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NV]; MR];
            for _ in 0..kp {
                let row = b.next_row();
                let bv: [__m512i; NV] =
                    std::array::from_fn(|v| _mm512_loadu_si512(row.add(16 * v).cast()));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = Ar::splat(a.add(i).read_unaligned());
                    for (x, &bvv) in row.iter_mut().zip(bv.iter()) {
                        *x = Ar::madd(*x, av, bvv);
                    }
                }
                a = a.add(MR);
            }
            for (i, row) in acc.iter().enumerate() {
                for (v, x) in row.iter().enumerate() {
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
