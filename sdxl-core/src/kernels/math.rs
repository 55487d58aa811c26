//! Vectorisable scalar math for the element-wise kernels: `exp`, `erf`, GELU and SiLU built
//! from arithmetic the compiler turns into SIMD (std's `exp` and libm's `erf` are calls that
//! stop vectorisation), and the element types those kernels read and write.

use half::bf16;

/// Partial sums of [`lane_sum`]: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;

/// `Σ f(v)` over `values`, accumulated in [`LANES`] f32 partial sums (a loop the compiler
/// vectorises; inlined so that it is compiled for the caller's target features).
#[inline(always)]
pub(crate) fn lane_sum<T: Element>(values: &[T], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += f(v.load());
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v.load())).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Element types the kernel reads and writes.
pub(crate) trait Element: candle_core::WithDType + Copy + Send + Sync {
    /// Widens to f32.
    fn load(self) -> f32;
    /// Narrows from f32 (round to nearest even for bf16).
    fn store(x: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        x
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        round_bf16(x)
    }
}

/// The element types of the element-wise kernels: [`Element`]s, which on x86-64 also load
/// into AVX-512 lanes (`vector.rs`).
#[cfg(target_arch = "x86_64")]
pub(crate) trait Values: super::vector::Lanes {}
#[cfg(target_arch = "x86_64")]
impl<T: super::vector::Lanes> Values for T {}
/// The element types of the element-wise kernels: [`Element`]s.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait Values: Element {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Element> Values for T {}

/// `x` rounded to the nearest bf16, ties to even (as `bf16::from_f32`), in branch-free form
/// that vectorises.
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> bf16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x0040;
    bf16::from_bits(if x.is_nan() { quiet_nan } else { rounded } as u16)
}

/// `x · Φ(x) = x/2 · (1 + erf(x/√2))`, PyTorch's exact GELU, to about 1e-7 relative.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `x · sigmoid(x)`, to about 2e-7 relative.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `p` of Abramowitz & Stegun 7.1.26: `erf(z) ≈ 1 − t·(a₁ + t·(a₂ + …)) · e^(−z²)` with
/// `t = 1 / (1 + p·z)`, for `z ≥ 0`.
pub(crate) const ERF_P: f32 = 0.327_591_1;
/// `a₁ … a₅` of Abramowitz & Stegun 7.1.26 (see [`ERF_P`]).
pub(crate) const ERF_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_7,
    -1.453_152,
    1.061_405_4,
];

/// `erf(u)` by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), branch-free.
#[inline(always)]
fn erf(u: f32) -> f32 {
    let (p, a) = (ERF_P, ERF_A);
    let z = u.abs();
    let t = 1.0 / (1.0 + p * z);
    let poly = t * (a[0] + t * (a[1] + t * (a[2] + t * (a[3] + t * a[4]))));
    let y = 1.0 - poly * exp(-(z * z));
    y.copysign(u)
}

/// Adding then subtracting this rounds to the nearest integer (ties to even) and leaves the
/// integer in the low mantissa bits: 1.5 · 2^23.
pub(crate) const EXP_ROUND: f32 = 12_582_912.0;
/// `ln 2` in two parts, the high one exact in few bits, so that `x − n·ln 2` loses nothing.
pub(crate) const EXP_LN2_HI: f32 = 0.693_359_4;
/// The low part of `ln 2` (see [`EXP_LN2_HI`]).
pub(crate) const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// [`exp`]'s polynomial in `r`, highest degree first: `e^r ≈ 1 + r + r²·P(r)`.
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `e^x` within 2 ulp of `f32::exp`, branch-free (Cephes' `expf`: `x = n·ln 2 + r`, a degree-6
/// polynomial in `r`, the exponent `n` set in the bits): 0 below -87 (f32's normal range), +inf
/// above 88, NaN for NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let clamped = x.clamp(-87.0, 88.0);
    let shifted = clamped * std::f32::consts::LOG2_E + EXP_ROUND;
    let n = shifted - EXP_ROUND;
    let r = clamped - n * EXP_LN2_HI - n * EXP_LN2_LO;
    let poly = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p * r + c);
    let y = poly * (r * r) + r + 1.0;
    let exponent = shifted.to_bits().wrapping_sub(EXP_ROUND.to_bits());
    let pow2 = f32::from_bits(exponent.wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        // NaN falls through the comparisons; clamp passed it on, so the result is NaN.
        y * pow2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_std() {
        let mut worst: f64 = 0.0;
        for i in -86_999..=87_999 {
            let x = i as f32 / 1000.0;
            let want = f64::from(x.exp());
            worst = worst.max((f64::from(exp(x)) - want).abs() / want);
        }
        println!("exp: worst relative error {worst:e}");
        assert!(worst <= 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn silu_and_erf_limits() {
        assert_eq!(silu(-200.0), -0.0);
        assert_eq!(silu(200.0), 200.0);
        assert!(silu(f32::NAN).is_nan());
        assert!((erf(0.5) - 0.520_499_9).abs() < 2e-7);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let specials = [
            0.0,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::from_bits(0x3f80_8000), // a tie, rounds to even (down)
            f32::from_bits(0x3f81_8000), // a tie, rounds to even (up)
            f32::from_bits(0x7f7f_ffff),
        ];
        let sweep = (0..1_000_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(4_294_967_291 / 1_000_000 * 3)));
        for x in specials.into_iter().chain(sweep) {
            let (ours, half) = (round_bf16(x), bf16::from_f32(x));
            assert!(
                ours.to_bits() == half.to_bits() || (ours.is_nan() && half.is_nan()),
                "{x:e} ({:#x}): {:#x} vs {:#x}",
                x.to_bits(),
                ours.to_bits(),
                half.to_bits()
            );
        }
    }
}
