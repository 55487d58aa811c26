//! One lane of the float32 `log` and `sincos` that torch's x86-64 CPU build uses to turn
//! uniforms into normals (`log256_ps` and `sincos256_ps` of ATen's `avx_mathfun.h`, Cephes
//! polynomials), reproduced bit for bit in portable Rust.
//!
//! torch compiles these with GCC, FMA enabled and floating-point contraction on, so a multiply
//! whose only use is an add or subtract becomes one fused multiply-add. Where an add joins two
//! products, the earlier multiply is the one fused. [`fma`] marks each contracted pair; every
//! other operation rounds separately. `f32::mul_add` is always a correctly rounded fused
//! operation (hardware or software), so the result does not depend on the CPU we run on.
//!
//! The constants keep the reference's decimal spelling (more digits than f32 holds; they round to
//! the same f32 values as in the C++ source).
#![allow(clippy::excessive_precision)]

/// A fused multiply-add `a * b + c` with a single rounding.
fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// √½ (Cephes `SQRTHF`), the split point of the mantissa range.
const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// Cephes `logf` polynomial, highest degree first.
const LOG_POLY: [f32; 9] = [
    7.037_683_629_2e-2,
    -1.151_461_031_0e-1,
    1.167_699_874_0e-1,
    -1.242_014_084_6e-1,
    1.424_932_278_7e-1,
    -1.666_805_766_5e-1,
    2.000_071_476_5e-1,
    -2.499_999_399_3e-1,
    3.333_333_117_4e-1,
];
/// ln 2 split into a short high part and a correction.
const LN2_HI: f32 = 0.693_359_375;
const LN2_LO: f32 = -2.121_944_40e-4;

/// Natural logarithm of a positive, normal `x` (the AVX kernel's arithmetic; torch only calls it
/// on `1 - u`, in [2⁻²⁴, 1]).
pub(crate) fn log(x: f32) -> f32 {
    let bits = x.to_bits();
    // Unbiased exponent + 1, with the mantissa rescaled into [0.5, 1).
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    // Below √½ use 2m - 1 and one less in the exponent, else m - 1.
    let below = m < SQRT_HALF;
    let mut r = m - 1.0;
    if below {
        e -= 1.0;
        r += m;
    }
    let z = r * r;
    let mut p = LOG_POLY[0];
    for &c in &LOG_POLY[1..] {
        p = fma(p, r, c);
    }
    p *= r;
    let mut y = fma(p, z, e * LN2_LO);
    y = fma(-z, 0.5, y);
    fma(e, LN2_HI, r + y)
}

/// 4/π.
const FOUR_OVER_PI: f32 = 1.273_239_544_735_16;
/// −π/4 split into three parts for an extended-precision argument reduction.
const MINUS_PI4: [f32; 3] = [
    -0.785_156_25,
    -2.418_756_484_985_351_562_5e-4,
    -3.774_894_977_445_941_08e-8,
];
/// Cephes `sinf` polynomial (odd part, highest degree first).
const SIN_POLY: [f32; 3] = [-1.951_529_589_1e-4, 8.332_160_873_6e-3, -1.666_665_461_1e-1];
/// Cephes `cosf` polynomial (even part, highest degree first).
const COS_POLY: [f32; 3] = [
    2.443_315_711_809_948e-5,
    -1.388_731_625_493_765e-3,
    4.166_664_568_298_827e-2,
];
const SIGN: u32 = 0x8000_0000;

/// `(sin x, cos x)` for |x| up to about 8192 (the AVX kernel's arithmetic).
pub(crate) fn sin_cos(x: f32) -> (f32, f32) {
    let sign_x = x.to_bits() & SIGN;
    let ax = x.abs();
    // Octant index rounded up to even: j = (trunc(|x|·4/π) + 1) & !1.
    let j = ((ax * FOUR_OVER_PI) as i32).wrapping_add(1) & !1;
    let q = j as f32;
    let r = MINUS_PI4.iter().fold(ax, |r, &c| fma(q, c, r));

    let sign_sin = sign_x ^ (((j & 4) as u32) << 29);
    let sign_cos = ((!j.wrapping_sub(2) & 4) as u32) << 29;

    let z = r * r;
    let mut c = COS_POLY[0];
    c = fma(c, z, COS_POLY[1]);
    c = fma(c, z, COS_POLY[2]);
    c *= z;
    c = fma(c, z, -(z * 0.5)) + 1.0;

    let mut s = SIN_POLY[0];
    s = fma(s, z, SIN_POLY[1]);
    s = fma(s, z, SIN_POLY[2]);
    s *= z;
    s = fma(s, r, r);

    // Octants 0 and 4 (mod 8, after rounding up) use the polynomials as they are; 2 and 6 swap.
    let (sin, cos) = if j & 2 == 0 { (s, c) } else { (c, s) };
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        ((a as f64 - b) / (b32.abs().max(f32::MIN_POSITIVE) as f64 * f32::EPSILON as f64)).abs()
    }

    #[test]
    fn log_is_accurate_on_its_domain() {
        let mut worst = 0f64;
        for k in 1..=(1u32 << 16) {
            let x = k as f32 / 65536.0;
            let err = ulps(log(x), (x as f64).ln());
            worst = worst.max(if x == 1.0 { 0.0 } else { err });
        }
        assert!(worst < 4.0, "worst {worst} ulp");
        assert_eq!(log(1.0), 0.0);
    }

    #[test]
    fn sin_cos_are_accurate_over_a_turn() {
        let mut worst = 0f64;
        for k in 0..65536u32 {
            let x = k as f32 / 65536.0 * std::f32::consts::TAU;
            let (s, c) = sin_cos(x);
            let (es, ec) = (x as f64).sin_cos();
            // Absolute error relative to 1 ulp of 1.0: the results are combined with a radius.
            worst =
                worst.max(((s as f64 - es).abs()).max((c as f64 - ec).abs()) / f32::EPSILON as f64);
        }
        assert!(worst < 2.0, "worst {worst} ulp of 1");
    }
}
