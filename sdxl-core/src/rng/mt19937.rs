//! The 32-bit Mersenne Twister as torch's CPU generator runs it (`at::mt19937`), with the two
//! uniform conversions torch's distributions use.

/// Words of state.
const N: usize = 624;
/// Offset of the word mixed into each twisted word.
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// MT19937 with torch's seeding: only the low 32 bits of the `u64` seed reach the state, so
/// seeds `s` and `s + 2³²` give the same stream (as in torch).
#[derive(Clone)]
pub(crate) struct Mt19937 {
    state: [u32; N],
    /// Index of the next word to temper; `N` means the state must be twisted first.
    next: usize,
}

impl Mt19937 {
    /// The engine after `torch.Generator().manual_seed(seed)`.
    pub(crate) fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        let mut prev = (seed & 0xffff_ffff) as u32;
        for (j, word) in state.iter_mut().enumerate() {
            if j > 0 {
                // j < 624, so the cast is exact.
                prev = 1_812_433_253u32
                    .wrapping_mul(prev ^ (prev >> 30))
                    .wrapping_add(j as u32);
            }
            *word = prev;
        }
        Self { state, next: N }
    }

    /// The word at `i` modulo the state size (always in range).
    fn word(&self, i: usize) -> u32 {
        self.state[i % N]
    }

    /// Regenerates all 624 words in place, in the reference order (words already twisted feed
    /// the later ones).
    fn twist(&mut self) {
        for i in 0..N {
            let mixed = (self.word(i) & UPPER_MASK) | (self.word(i + 1) & LOWER_MASK);
            let odd = if self.word(i + 1) & 1 == 1 {
                MATRIX_A
            } else {
                0
            };
            self.state[i % N] = self.word(i + M) ^ (mixed >> 1) ^ odd;
        }
        self.next = 0;
    }

    /// The next 32 random bits (`CPUGeneratorImpl::random`).
    pub(crate) fn next_u32(&mut self) -> u32 {
        if self.next >= N {
            self.twist();
        }
        let mut y = self.word(self.next);
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// The next 64 random bits (`CPUGeneratorImpl::random64`): the first word is the high half.
    fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (hi << 32) | lo
    }

    /// `at::uniform_real_distribution<float>(0, 1)`: the low 24 bits of one word times 2⁻²⁴,
    /// in [0, 1).
    pub(crate) fn uniform_f32(&mut self) -> f32 {
        // Exact: a 24-bit integer and a power of two.
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `at::uniform_real_distribution<double>(0, 1)`: the low 53 bits of two words times 2⁻⁵³,
    /// in [0, 1).
    pub(crate) fn uniform_f64(&mut self) -> f64 {
        // Exact: a 53-bit integer and a power of two.
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn matches_the_standard_mt19937() {
        // C++ [rand.predef]: the 10000th output of a default-constructed std::mt19937 (seed 5489).
        let mut mt = Mt19937::new(5489);
        let last = (0..10_000).map(|_| mt.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    #[test]
    fn only_the_low_32_bits_of_the_seed_count() {
        let mut a = Mt19937::new(42);
        let mut b = Mt19937::new((1u64 << 32) + 42);
        for _ in 0..1000 {
            assert_eq!(a.next_u32(), b.next_u32());
        }
    }

    #[test]
    fn uniforms_stay_in_the_unit_interval() {
        let mut mt = Mt19937::new(0);
        for _ in 0..10_000 {
            let f = mt.uniform_f32();
            let d = mt.uniform_f64();
            assert!((0.0..1.0).contains(&f) && (0.0..1.0).contains(&d));
        }
    }
}
