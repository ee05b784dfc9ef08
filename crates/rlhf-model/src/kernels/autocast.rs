//! bf16 autocast: every product on operands rounded to bf16, sums in f32, on every device.

static AUTOCAST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether products run under bf16 autocast ([`Autocast`]).
pub fn autocast_bf16() -> bool {
    AUTOCAST.load(std::sync::atomic::Ordering::Relaxed)
}

/// bf16 autocast, as torch's CPU autocast runs a product (transformers' `bf16=True`): while
/// one of these is alive, every product of the kernels (and the candle fallbacks of
/// [`super::generic`]) reads its operands rounded to bf16 (nearest even) and sums in f32;
/// what is not a product (norms, softmax, losses, the optimiser) stays f32, as do the
/// weights themselves. Dropping it restores the setting it replaced.
///
/// The switch is process-wide, not per thread: the products run on candle's thread pool and
/// attention's products inside its units. A process runs one job at a time, and the switch
/// is set around a job; tests that use it keep to test binaries of their own.
///
/// On the CPU, where it has AVX512_BF16 ([`bf16_kernel`](super::cpu::gemm::bf16_kernel)),
/// products of more than 64 rows (attention's included) run on the bf16 kernel (`vdpbf16ps`:
/// 32 products a vector, f32 sums). Elsewhere, and for fewer rows, the operands are rounded as they are packed and the f32 kernel multiplies
/// them: a bf16 times a bf16 is exact in f32, so the products are a bf16 unit's and only the
/// order of the f32 sums differs. AMX is not implemented.
#[must_use = "autocast ends when the guard is dropped"]
pub struct Autocast {
    before: bool,
}

impl Autocast {
    /// Turns bf16 autocast on (`on`) or off until the guard is dropped.
    pub fn bf16(on: bool) -> Self {
        let before = AUTOCAST.swap(on, std::sync::atomic::Ordering::SeqCst);
        Autocast { before }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        AUTOCAST.store(self.before, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as an f32; NaN stays NaN, ±inf stays.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        return f32::from_bits((b | 0x0040_0000) & 0xFFFF_0000);
    }
    f32::from_bits((b.wrapping_add(0x7FFF + ((b >> 16) & 1))) & 0xFFFF_0000)
}
