//! The random stream, counter-based: word `i` of the stream for `key` is
//! SplitMix64's i-th output from seed `key`, computed directly from `i`. Any
//! path's draws can be produced on any thread, in any order, or again later
//! (the tail pass re-simulates the worst paths), and they are always the same.

use super::math;

/// SplitMix64's increment: word `i + 1`'s state is word `i`'s plus this.
pub const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
const ONE_BITS: u64 = 0x3ff0_0000_0000_0000;
const MANTISSA: u64 = 0x000f_ffff_ffff_ffff;

/// SplitMix64's output function (Stafford's mix 13): a bijection on u64.
#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The state behind word `counter` of the stream `key`: the word is `mix(state)`.
#[inline(always)]
pub fn state(key: u64, counter: u64) -> u64 {
    key.wrapping_add(counter.wrapping_add(1).wrapping_mul(GAMMA))
}

/// Word `counter` of the stream `key`.
#[inline(always)]
pub fn word(key: u64, counter: u64) -> u64 {
    mix(state(key, counter))
}

/// A 64-bit hash of `bytes` seeded with `seed` (FNV-1a, then mixed).
pub fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let fnv = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    mix(fnv ^ mix(seed))
}

// Box-Muller: two independent standard normals are `radius(a)·direction(b)`
// for two random words a and b.

/// sqrt(−2 ln u) for u uniform on (0, 1]; 52 bits cut the tail at 8.5 sigma.
#[inline(always)]
pub fn radius(word: u64) -> f64 {
    let u = 2.0 - f64::from_bits(ONE_BITS | (word & MANTISSA));
    (-2.0 * math::ln(u)).sqrt()
}

/// (cos θ, sin θ) for θ uniform on the circle: a quadrant from the top two
/// bits, an offset in it from the low 52.
#[inline(always)]
pub fn direction(word: u64) -> (f64, f64) {
    let turn = f64::from_bits(ONE_BITS | (word & MANTISSA)) - 1.5;
    math::cos_sin_quadrant(word >> 62, turn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_splitmix64() {
        // SplitMix64 from seed 1234567: the reference sequence's first outputs.
        let mut state = 1_234_567_u64;
        for i in 0..5 {
            state = state.wrapping_add(GAMMA);
            assert_eq!(word(1_234_567, i), mix(state));
        }
        assert_eq!(word(1_234_567, 0), 6_457_827_717_110_365_317);
    }

    #[test]
    fn normals_have_the_right_moments() {
        let n = 200_000_u64;
        let (mut s1, mut s2, mut s4, mut cross) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..n {
            let (r, (cos, sin)) = (radius(word(7, 2 * i)), direction(word(7, 2 * i + 1)));
            let (a, b) = (r * cos, r * sin);
            s1 += a + b;
            s2 += a * a + b * b;
            s4 += a.powi(4) + b.powi(4);
            cross += a * b;
        }
        let m = 2.0 * n as f64;
        assert!((s1 / m).abs() < 0.01, "mean {}", s1 / m);
        assert!((s2 / m - 1.0).abs() < 0.01, "variance {}", s2 / m);
        assert!((s4 / m - 3.0).abs() < 0.05, "fourth moment {}", s4 / m);
        assert!(
            (cross / n as f64).abs() < 0.01,
            "correlation {}",
            cross / n as f64
        );
    }
}
