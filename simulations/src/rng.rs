//! Seeded randomness: a small PRNG of our own, so that a seed means the same numbers on every
//! platform and with every dependency version, and keyed streams, so that what a job samples
//! (its duration, its bundle size) does not depend on how many other random numbers were drawn
//! before it (the push and the polling model then run the very same jobs).

use serde::{Deserialize, Serialize};

/// SplitMix64: used to seed [`Rng`] and to mix keys.
const fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Mixes a seed and a list of keys into one 64-bit value.
pub fn mix(seed: u64, keys: &[u64]) -> u64 {
    let mut h = splitmix(seed);
    for &k in keys {
        h = splitmix(h ^ splitmix(k));
    }
    h
}

/// xoshiro256** (Blackman and Vigna), seeded through SplitMix64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        // The reference seeding: four outputs of SplitMix64 started at `seed`.
        let mut x = seed;
        let mut s = [0u64; 4];
        for v in &mut s {
            *v = splitmix(x);
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        }
        Self { s }
    }

    /// A generator for `seed` and a key path: the same keys always give the same stream.
    pub fn keyed(seed: u64, keys: &[u64]) -> Self {
        Self::new(mix(seed, keys))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        // 53 random mantissa bits.
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Lemire's multiply-shift; the tiny bias is irrelevant here.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// A standard normal variate (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// 32 random bytes.
    pub fn bytes32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        out
    }

    /// 16 random bytes.
    pub fn bytes16(&mut self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        out
    }
}

/// A distribution of non-negative values, as scenario files write it: a bare number (a
/// constant), `{ uniform = [min, max] }`, `{ exp = mean }` or
/// `{ lognormal = { median = m, sigma = s } }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dist {
    /// Always this value.
    Const(f64),
    /// One of the named shapes.
    Shaped(Shape),
}

/// The named distribution shapes of [`Dist`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Shape {
    /// Uniform between the two bounds.
    Uniform([f64; 2]),
    /// Exponential with this mean.
    Exp(f64),
    /// Log-normal with this median and shape (the standard deviation of the log).
    Lognormal {
        /// The median.
        median: f64,
        /// The standard deviation of the logarithm.
        sigma: f64,
    },
}

impl Dist {
    /// A constant.
    pub const fn constant(v: f64) -> Self {
        Self::Const(v)
    }

    /// A log-normal distribution.
    pub const fn lognormal(median: f64, sigma: f64) -> Self {
        Self::Shaped(Shape::Lognormal { median, sigma })
    }

    /// A uniform distribution.
    pub const fn uniform(min: f64, max: f64) -> Self {
        Self::Shaped(Shape::Uniform([min, max]))
    }

    /// Draws one value (never negative).
    pub fn sample(&self, rng: &mut Rng) -> f64 {
        let v = match self {
            Self::Const(v) => *v,
            Self::Shaped(Shape::Uniform([a, b])) => a + (b - a) * rng.unit(),
            Self::Shaped(Shape::Exp(mean)) => -mean * (1.0 - rng.unit()).ln(),
            Self::Shaped(Shape::Lognormal { median, sigma }) => {
                median * (sigma * rng.normal()).exp()
            }
        };
        if v.is_finite() { v.max(0.0) } else { 0.0 }
    }

    /// Its mean, for documentation and sanity checks.
    pub fn mean(&self) -> f64 {
        match self {
            Self::Const(v) => *v,
            Self::Shaped(Shape::Uniform([a, b])) => (a + b) / 2.0,
            Self::Shaped(Shape::Exp(mean)) => *mean,
            Self::Shaped(Shape::Lognormal { median, sigma }) => {
                median * (sigma * sigma / 2.0).exp()
            }
        }
    }

    /// Whether its parameters make sense (finite, non-negative, ordered bounds).
    pub fn is_valid(&self) -> bool {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        match self {
            Self::Const(v) => ok(*v),
            Self::Shaped(Shape::Uniform([a, b])) => ok(*a) && ok(*b) && a <= b,
            Self::Shaped(Shape::Exp(mean)) => ok(*mean),
            Self::Shaped(Shape::Lognormal { median, sigma }) => ok(*median) && ok(*sigma),
        }
    }
}
