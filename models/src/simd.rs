//! Runs a kernel compiled for the widest x86-64 vector instructions the CPU
//! has (AVX-512, else AVX2 + FMA), chosen at run time, so the portable
//! release build still gets 16-lane loops where the machine offers them.
//!
//! The kernels are plain Rust loops written to vectorise, passed as closures
//! marked `#[inline(always)]`; what they call must be `#[inline(always)]`
//! too, or it is compiled without the wider features.
//! The arithmetic is the same operations in the same order on every path
//! (no contraction into FMA), so results do not depend on the CPU.

// `#[target_feature]` functions can only be called in unsafe blocks; each
// call below follows a run-time check that the CPU has those features.
#![allow(unsafe_code)]

/// Calls `kernel` compiled for the widest instruction set available.
#[inline(always)]
pub fn widest<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: the CPU has every feature `avx512` is compiled with.
            return unsafe { avx512(kernel) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has every feature `avx2` is compiled with.
            return unsafe { avx2(kernel) };
        }
    }
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
fn avx512<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_path_gives_the_scalar_result() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let scalar: f32 = x
            .chunks(16)
            .map(|c| c.iter().map(|v| v * v).sum::<f32>())
            .sum();
        let wide = super::widest(|| {
            x.chunks(16)
                .map(|c| c.iter().map(|v| v * v).sum::<f32>())
                .sum::<f32>()
        });
        assert_eq!(scalar.to_bits(), wide.to_bits());
    }
}
