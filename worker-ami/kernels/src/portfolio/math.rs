//! exp, ln, sin/cos and the normal CDF, written branch-free in plain
//! arithmetic. Loops over lanes that call them vectorise (calls into libm do
//! not), and the results do not depend on the platform's libm, so a run gives
//! the same bits on every machine.

use std::f64::consts::{FRAC_PI_2, LOG2_E, SQRT_2};

/// Adding then subtracting this rounds a float below 2^51 to an integer.
const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
/// `f64::from_bits(TWO_52_BITS | n) == 2^52 + n` for `n < 2^52`.
const TWO_52_BITS: u64 = 0x4330_0000_0000_0000;
const TWO_52: f64 = 4_503_599_627_370_496.0;
const ONE_BITS: u64 = 0x3ff0_0000_0000_0000;
const MANTISSA: u64 = 0x000f_ffff_ffff_ffff;
// ln 2 split so that k * LN2_HI is exact for |k| < 2^20 (fdlibm).
const LN2_HI: f64 = 6.931_471_803_691_238e-1;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;

/// e^r on |r| <= ln2/2 to 3e-18: the degree-11 Chebyshev interpolant
/// (mpmath's `chebyfit`), in the monomial basis.
const EXP_POLY: [f64; 12] = [
    1.0,
    1.0,
    0.500_000_000_000_001_9,
    0.166_666_666_666_666_8,
    0.041_666_666_666_488_1,
    0.008_333_333_333_319_601,
    0.001_388_888_895_231_477_5,
    0.000_198_412_698_900_471_13,
    2.480_148_548_232_849_4e-5,
    2.755_724_091_857_897e-6,
    2.763_263_963_904_103e-7,
    2.511_003_760_596_377_7e-8,
];

/// fdlibm's minimax coefficients for ln(1+f) = f - f²/2 + s·(f²/2 + R(s²)).
const LG: [f64; 7] = [
    6.666_666_666_666_735e-1,
    3.999_999_999_940_942e-1,
    2.857_142_874_366_239e-1,
    2.222_219_843_214_978_4e-1,
    1.818_357_216_161_805e-1,
    1.531_383_769_920_937_3e-1,
    1.479_819_860_511_658_6e-1,
];

/// Hart's (1968) rational approximation of the normal tail (algorithm 5666),
/// used over the whole line: absolute error below 2e-16. Beyond 7 sigma,
/// where Hart switches to a continued fraction, its relative error grows to
/// 4e-6 of a tail below 1e-12, which no option value can tell.
const HART_P: [f64; 7] = [
    220.206_867_912_376,
    221.213_596_169_931,
    112.079_291_497_871,
    33.912_866_078_383,
    6.373_962_203_531_65,
    0.700_383_064_443_688,
    3.526_249_659_989_11e-2,
];
const HART_Q: [f64; 8] = [
    440.413_735_824_752,
    793.826_512_519_948,
    637.333_633_378_831,
    296.564_248_779_674,
    86.780_732_202_946_1,
    16.064_177_579_207,
    1.755_667_163_182_64,
    8.838_834_764_831_84e-2,
];

/// The polynomial with `coefficients` (constant term first) at `x`: Horner's
/// rule on the even and the odd coefficients at once, in x², which halves
/// the chain of dependent operations.
#[inline(always)]
fn poly<const N: usize>(x: f64, coefficients: &[f64; N]) -> f64 {
    let x2 = x * x;
    let chain = |first: usize| {
        let mut terms = coefficients.iter().skip(first).step_by(2).rev();
        let highest = terms.next().copied().unwrap_or_default();
        terms.fold(highest, |acc, c| acc * x2 + c)
    };
    chain(0) + x * chain(1)
}

/// e^x, relative error below 4e-16; 0 below -708 (where e^x is subnormal).
#[inline(always)]
pub fn exp(x: f64) -> f64 {
    let clamped = x.clamp(-708.0, 709.0);
    let k = (clamped * LOG2_E + ROUND) - ROUND;
    let r = (clamped - k * LN2_HI) - k * LN2_LO;
    // k + 1023 lies in 1..=2046: it is the biased exponent of 2^k.
    let biased = (k + (ROUND + 1023.0)).to_bits() & 0x7ff;
    let scaled = poly(r, &EXP_POLY) * f64::from_bits(biased << 52);
    if x < -708.0 { 0.0 } else { scaled }
}

/// ln x for positive normal x, error below 2 ulp.
#[inline(always)]
pub fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mantissa = f64::from_bits((bits & MANTISSA) | ONE_BITS);
    let exponent = f64::from_bits(TWO_52_BITS | (bits >> 52)) - (TWO_52 + 1023.0);
    // Centre the mantissa on 1: [sqrt(1/2), sqrt(2)).
    let big = mantissa > SQRT_2;
    let m = if big { 0.5 * mantissa } else { mantissa };
    let e = if big { exponent + 1.0 } else { exponent };
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let even = w * (LG[1] + w * (LG[3] + w * LG[5]));
    let odd = z * (LG[0] + w * (LG[2] + w * (LG[4] + w * LG[6])));
    let half_f2 = 0.5 * f * f;
    e * LN2_HI - ((half_f2 - (s * (half_f2 + odd + even) + e * LN2_LO)) - f)
}

/// (cos, sin) of `quadrant * pi/2 + turn * pi/2` for `turn` in [-1/2, 1/2].
#[inline(always)]
pub fn cos_sin_quadrant(quadrant: u64, turn: f64) -> (f64, f64) {
    let r = turn * FRAC_PI_2;
    let r2 = r * r;
    // Taylor series on |r| <= pi/4, to the terms below 1e-17.
    let sin = r * poly(r2, &SIN_TAYLOR);
    let cos = poly(r2, &COS_TAYLOR);
    // Rotate by quadrant * pi/2: swap for odd quadrants, then flip signs.
    let odd = quadrant & 1 == 1;
    let (c, s) = if odd { (sin, cos) } else { (cos, sin) };
    let cos_sign = ((quadrant ^ (quadrant >> 1)) & 1) << 63;
    let sin_sign = ((quadrant >> 1) & 1) << 63;
    (
        f64::from_bits(c.to_bits() ^ cos_sign),
        f64::from_bits(s.to_bits() ^ sin_sign),
    )
}

const SIN_TAYLOR: [f64; 8] = [
    1.0,
    -1.0 / 6.0,
    1.0 / 120.0,
    -1.0 / 5_040.0,
    1.0 / 362_880.0,
    -1.0 / 39_916_800.0,
    1.0 / 6_227_020_800.0,
    -1.0 / 1_307_674_368_000.0,
];
const COS_TAYLOR: [f64; 9] = [
    1.0,
    -1.0 / 2.0,
    1.0 / 24.0,
    -1.0 / 720.0,
    1.0 / 40_320.0,
    -1.0 / 3_628_800.0,
    1.0 / 479_001_600.0,
    -1.0 / 87_178_291_200.0,
    1.0 / 20_922_789_888_000.0,
];

/// The standard normal CDF, absolute error below 3e-16.
#[inline(always)]
pub fn norm_cdf(x: f64) -> f64 {
    norm_cdf_given(x, exp(-0.5 * x * x))
}

/// Φ(x) when e^(−x²/2) is already known.
#[inline(always)]
pub fn norm_cdf_given(x: f64, gauss: f64) -> f64 {
    let a = x.abs().min(40.0);
    let tail = gauss * poly(a, &HART_P) / poly(a, &HART_Q);
    if x > 0.0 { 1.0 - tail } else { tail }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative_error(got: f64, want: f64) -> f64 {
        ((got - want) / want).abs()
    }

    #[test]
    fn exp_matches_std() {
        for i in -70_000..=70_890 {
            let x = f64::from(i) * 0.01 + 0.003_7;
            assert!(relative_error(exp(x), x.exp()) < 4e-16, "exp({x})");
        }
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn ln_matches_std() {
        let mut x = 1e-300;
        while x < 1e300 {
            assert!(
                (ln(x) - x.ln()).abs() <= 2.0 * f64::EPSILON * x.ln().abs().max(1.0),
                "ln({x})"
            );
            x *= 1.000_7_f64.powi(97);
        }
        for i in 1..10_000 {
            let x = f64::from(i) * 1e-4;
            assert!(
                (ln(x) - x.ln()).abs() <= 2.0 * f64::EPSILON * x.ln().abs().max(1.0),
                "ln({x})"
            );
        }
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn cos_sin_cover_the_circle() {
        for quadrant in 0..4_u64 {
            for i in -500..=500 {
                let turn = f64::from(i) / 1000.0;
                let angle = (quadrant as f64 + turn) * FRAC_PI_2;
                let (c, s) = cos_sin_quadrant(quadrant, turn);
                // The reference angle itself is rounded: up to 2.2e-16 · 4.7.
                assert!((c - angle.cos()).abs() < 1.2e-15, "cos {quadrant} {turn}");
                assert!((s - angle.sin()).abs() < 1.2e-15, "sin {quadrant} {turn}");
            }
        }
    }

    /// Φ by its series (small |x|) and continued fraction (large |x|), slow and accurate.
    fn reference_cdf(x: f64) -> f64 {
        let a = x.abs();
        let density = (-0.5 * a * a).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let upper = if a < 3.0 {
            let (mut term, mut sum, mut k) = (a, a, 1.0);
            while term.abs() > 1e-18 * sum.abs() {
                term *= a * a / (2.0 * k + 1.0);
                sum += term;
                k += 1.0;
            }
            0.5 - density * sum
        } else {
            let mut fraction = a;
            for k in (1..200).rev() {
                fraction = a + f64::from(k) / fraction;
            }
            density / fraction
        };
        if x > 0.0 { 1.0 - upper } else { upper }
    }

    #[test]
    fn norm_cdf_is_accurate() {
        for i in -4_000..=4_000 {
            let x = f64::from(i) * 0.01 + 0.000_3;
            let want = reference_cdf(x);
            assert!(
                (norm_cdf(x) - want).abs() < 6e-16,
                "Φ({x}) = {} want {want}",
                norm_cdf(x)
            );
        }
        assert_eq!(norm_cdf(-1e9), 0.0);
        assert_eq!(norm_cdf(1e9), 1.0);
        assert_eq!(norm_cdf(0.0), 0.5);
    }
}
