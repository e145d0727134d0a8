//! The hot loops, compiled once for the build's baseline CPU and, on x86-64,
//! again for AVX2 and for AVX-512, chosen at run time. Every version runs the
//! same source, so the same floating-point operations in the same order, and
//! gives the same bits: only the width of the vectors differs. (Without FMA:
//! Rust never contracts `a * b + c`, and the code calls no `mul_add`.)
//!
//! On arm64, NEON is part of the baseline: there is one version.

/// An instruction set the CPU running this process has. Only `detect` and
/// `supported` make one, which is what makes `run` sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isa(Level);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// What every CPU the build targets has.
    pub fn baseline() -> Self {
        Self(Level::Baseline)
    }

    /// The widest vectors this CPU has.
    pub fn detect() -> Self {
        Self::supported().pop().unwrap_or_else(Self::baseline)
    }

    /// Every instruction set this CPU has, narrowest first.
    pub fn supported() -> Vec<Self> {
        let levels = [
            (Level::Baseline, true),
            #[cfg(target_arch = "x86_64")]
            (Level::Avx2, is_x86_feature_detected!("avx2")),
            #[cfg(target_arch = "x86_64")]
            (
                Level::Avx512,
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq"),
            ),
        ];
        levels
            .into_iter()
            .filter_map(|(level, present)| present.then_some(Self(level)))
            .collect()
    }

    /// Runs `f` compiled for this instruction set. `f` should be an
    /// `#[inline(always)]` closure calling `#[inline(always)]` functions: what
    /// is not inlined runs as the baseline build (slower, the same bits).
    #[inline(always)]
    #[allow(
        unsafe_code,
        reason = "calling a `target_feature` function needs the features, which `supported` checked"
    )]
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        match self.0 {
            Level::Baseline => f(),
            // SAFETY: an `Isa` names only features `supported` found on this CPU.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { avx2(f) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { avx512(f) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}
