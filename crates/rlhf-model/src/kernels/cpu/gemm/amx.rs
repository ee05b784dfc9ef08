//! The bf16 products on AMX tiles (Intel's Advanced Matrix Extensions: `tdpbf16ps` multiplies
//! a 16 × 32 bf16 tile of A by a 32 × 16 tile of B into a 16 × 16 f32 tile of C, 16,384
//! products an instruction where `vdpbf16ps` does 32).
//!
//! The arithmetic is the AVX512_BF16 kernel's (operands rounded to bf16, nearest even; the
//! products summed in f32), so it stands in for [`super::block_bf16`] unit for unit, behind
//! the same pool walk; only the order of the f32 sums differs. The block shape:
//!
//! - a block of C is `TM × NR` = 32 × 32, four C tiles (tmm0–3) held over a whole K slice;
//!   per 32 values of k it loads two A tiles (tmm4–5, rows 0–15 and 16–31) and two B tiles
//!   (tmm6–7, columns 0–15 and 16–31) and issues four `tdpbf16ps`;
//! - B is packed exactly as for the AVX512_BF16 kernel (pairs of k, `NR` columns a row:
//!   `pack_b_bf16`), which is already AMX's "VNNI" layout: a B tile is 16 rows of that
//!   buffer, 64 of its 128 bytes a row;
//! - A is packed row by row (each row's k as bf16 pairs, contiguous), as an A tile reads it;
//! - K slices are padded to a multiple of 32 with zeros in both buffers, so every tile is
//!   whole; ragged rows and columns of C are computed into a scratch block and copied.
//!
//! The CPU must say it has AMX-TILE and AMX-BF16 (cpuid leaf 7), and Linux must grant this
//! process the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16
//! and later); where either fails the AVX512_BF16 kernel runs. `RLHF_AMX=0` turns AMX off for
//! side-by-side runs. Rust has no stable AMX intrinsics, so the tile instructions are written
//! as inline assembly; the compiler never uses the tile registers itself.

use std::arch::asm;
use std::cell::{Cell, RefCell};

use super::{
    bf16_pair, lines, pack_b_bf16, pack_pairs_at, pack_pairs_by_rows, pairs_of_run, transpose16,
    write_edge, Line, MatRef, Src, NR,
};

/// Rows of C per block: two 16-row tiles.
pub(super) const TM: usize = 32;
/// Pairs of k per tile (32 bf16 values, 64 bytes a tile row).
const KT: usize = 16;
/// Depth of one packed K slice (pairs of k: 512 bf16 values). A slab's B slice, 512 columns,
/// is 512 KB.
const KC_AMX: usize = 512;
/// Blocks of rows per packed A block (256 rows × 512 k: 256 KB).
const MC_BLOCKS: usize = 8;

/// Whether this CPU has AMX-TILE and AMX-BF16 and Linux granted this process their state
/// (asked once). Never true off x86_64.
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("RLHF_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, bf16) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 22 & 1 == 1);
        super::bf16_available() && tile && bf16 && request_tile_state()
    })
}

/// Asks Linux for the AMX tile data state (`ARCH_REQ_XCOMP_PERM` = 0x1023,
/// `XFEATURE_XTILEDATA` = 18): granted for the whole process, its threads included.
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    let ret: isize;
    // SAFETY: the arch_prctl system call reads its two integer arguments only; `syscall`
    // clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") 0x1023usize,
            in("rsi") 18usize,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

thread_local! {
    /// Set by [`Off`] on this thread: the bf16 products it starts run on AVX512_BF16 even
    /// where AMX is there (tests compare the two kernels on one machine).
    static OFF: Cell<bool> = const { Cell::new(false) };
    /// Per-thread packing buffers for A and B.
    static PACK: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Whether the bf16 products started on this thread run on AMX.
pub(super) fn enabled() -> bool {
    !OFF.get() && available()
}

/// While alive, the bf16 products started on this thread run on the AVX512_BF16 kernel.
pub struct Off(bool);

impl Off {
    /// Turns AMX off on this thread until the guard drops.
    pub fn new() -> Self {
        Off(OFF.replace(true))
    }
}

impl Default for Off {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Off {
    fn drop(&mut self) {
        OFF.set(self.0);
    }
}

/// The tile configuration: palette 1, tiles 0–7 each 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

const CONFIG: Config = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    Config(c)
};

/// One `rows × cols` block of C (row stride `ldc`), all of K, on AMX tiles; with `acc` the
/// product is added to what C holds.
///
/// # Safety
/// [`available`] must be true, and `c` must point to a buffer holding the whole of C.
pub(super) unsafe fn block(
    a: MatRef<'_>,
    b: Src<'_>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let k = a.cols;
    let n_tiles = cols.len().div_ceil(NR);
    let kpad_max = (KC_AMX / 2).next_multiple_of(KT);
    PACK.with_borrow_mut(|(pa, pb)| {
        let pa: *mut u32 = lines(pa, MC_BLOCKS * TM * kpad_max).cast();
        let pb: *mut u32 = lines(pb, n_tiles * NR * kpad_max).cast();
        // SAFETY: the tile state was granted (`available`); the configuration is 64 bytes.
        unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack)) };
        let mut k0 = 0;
        while k0 < k {
            let kc = KC_AMX.min(k - k0);
            let kp = kc.div_ceil(2);
            let kpad = kp.next_multiple_of(KT);
            for t in 0..n_tiles {
                let c0 = cols.start + t * NR;
                let nr = NR.min(cols.end - c0);
                let dst = unsafe { pb.add(t * NR * kpad) };
                // SAFETY: the buffer holds n_tiles panels of kpad × NR pairs.
                unsafe {
                    pack_b_bf16(b, k0, kc, c0, nr, dst);
                    std::ptr::write_bytes(dst.add(kp * NR), 0, (kpad - kp) * NR);
                }
            }
            let accumulate = acc || k0 > 0;
            let mut m0 = rows.start;
            while m0 < rows.end {
                let mb = (MC_BLOCKS * TM).min(rows.end - m0);
                let m_blocks = mb.div_ceil(TM);
                for t in 0..m_blocks {
                    let r0 = m0 + t * TM;
                    let mr = TM.min(m0 + mb - r0);
                    // SAFETY: the buffer holds MC_BLOCKS blocks of TM × kpad pairs.
                    unsafe { pack_a(a, r0, mr, k0, kc, kpad, pa.add(t * TM * kpad)) };
                }
                for tj in 0..n_tiles {
                    let c0 = cols.start + tj * NR;
                    let nr = NR.min(cols.end - c0);
                    for ti in 0..m_blocks {
                        let r0 = m0 + ti * TM;
                        let mr = TM.min(m0 + mb - r0);
                        // SAFETY: both panels are whole (padded); the C block lies inside C,
                        // or is the scratch block.
                        unsafe {
                            let ap = pa.add(ti * TM * kpad);
                            let bp = pb.add(tj * NR * kpad);
                            let cp = c.add(r0 * ldc + c0);
                            if mr == TM && nr == NR {
                                tiles(kpad / KT, ap, kpad, bp, cp, ldc, accumulate);
                            } else {
                                let mut tile = [Line([0.0; 16]); TM * NR / 16];
                                let tp: *mut f32 = tile.as_mut_ptr().cast();
                                tiles(kpad / KT, ap, kpad, bp, tp, NR, false);
                                write_edge(tp, cp, ldc, mr, nr, accumulate);
                            }
                        }
                    }
                }
                m0 += mb;
            }
            k0 += kc;
        }
        // SAFETY: returns the tiles to their initial state (as the ABI expects between
        // functions that use them).
        unsafe { asm!("tilerelease", options(nostack)) };
    });
}

/// Packs rows `r0..r0 + mr` × columns `k0..k0 + kc` of A for the A tiles: `TM` rows of
/// `kpad` pairs of k each (row i's pairs contiguous), zero past `mr` rows and past `kc`.
///
/// # Safety
/// `dst` must hold `TM · kpad` u32s, `kpad` a multiple of 16 and at least `kc / 2` rounded up;
/// the block must lie inside A; AVX512_BF16 must be available.
unsafe fn pack_a(
    a: MatRef<'_>,
    r0: usize,
    mr: usize,
    k0: usize,
    kc: usize,
    kpad: usize,
    dst: *mut u32,
) {
    let kp = kc.div_ceil(2);
    // SAFETY: as the caller guarantees.
    unsafe {
        if a.cs == 1 {
            for i in 0..mr {
                let x = &a.data[(r0 + i) * a.rs + k0..][..kc];
                let row = std::slice::from_raw_parts_mut(dst.add(i * kpad), kpad);
                pairs_of_run(x, row);
                if kc % 2 == 1 {
                    row[kc / 2] = bf16_pair(x[kc - 1], 0.0);
                }
                row[kp..].fill(0);
            }
            std::ptr::write_bytes(dst.add(mr * kpad), 0, (TM - mr) * kpad);
            return;
        }
        // Strided rows: packed k-major as the AVX512_BF16 kernel packs them (`TM` wide), then
        // 16 × 16 blocks of pairs transposed into rows.
        SCRATCH.with_borrow_mut(|t| {
            let t: *mut u32 = lines(t, TM * kpad).cast();
            if a.rs == 1 {
                pack_pairs_by_rows(t, TM, kc, mr, |p| &a.data[(k0 + p) * a.cs + r0..]);
            } else {
                pack_pairs_at(t, TM, kc, mr, |p, i| {
                    a.data[(r0 + i) * a.rs + (k0 + p) * a.cs]
                });
            }
            std::ptr::write_bytes(t.add(kp * TM), 0, (kpad - kp) * TM);
            for qb in (0..kpad).step_by(16) {
                for ib in (0..TM).step_by(16) {
                    transpose16(
                        t.add(qb * TM + ib).cast(),
                        TM,
                        dst.add(ib * kpad + qb).cast(),
                        kpad,
                    );
                }
            }
        });
    }
}

thread_local! {
    /// Per-thread scratch for packing strided rows of A.
    static SCRATCH: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    /// Per-thread buffers of [`wt_few`]: x's rows as pairs, and x as B tiles.
    static FEW: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// C[32 × 32] (+)= A block · B panel over `kt` × 16 pairs of k on AMX tiles.
///
/// # Safety
/// The tiles are configured ([`CONFIG`]); `a` holds `TM` rows of `lda` pairs (at least
/// `kt · 16`), `b` `kt · 16` rows of `NR` pairs, and `c` a 32 × 32 block with row stride `ldc`
/// floats.
#[inline]
unsafe fn tiles(
    kt: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let (sa, sb, sc) = (lda * 4, NR * 4, ldc * 4);
    // SAFETY: as the caller guarantees; every tile read or written lies in its buffer.
    unsafe {
        let (c1, c2, c3) = (c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
        if acc {
            asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                s = in(reg) sc, options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        let a1 = a.add(16 * lda);
        for kb in 0..kt {
            let q = kb * KT;
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(q), a1 = in(reg) a1.add(q),
                b0 = in(reg) b.add(q * NR), b1 = in(reg) b.add(q * NR + 16),
                sa = in(reg) sa, sb = in(reg) sb, options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
            s = in(reg) sc, options(nostack),
        );
    }
}

/// x·Wᵀ for at most `TM` rows of x (decoding) and a row-major bf16 W `(out, inp)`, both
/// multiples of 32 (else `None`): W's rows are the A tiles, read in place from W with its row
/// stride (nothing of W is packed or copied), and x, packed once as pairs of k, the B tiles;
/// each 16 × 16 C tile holds 16 outputs of up to 16 rows of x and is written transposed.
/// Over candle's pool, `STREAM_UNIT` rows of W a unit.
///
/// # Safety
/// [`available`] must be true; `w` holds `out · inp` values and x has `inp` columns.
pub(super) unsafe fn wt_few(a: MatRef<'_>, w: &[u16], out: usize, inp: usize) -> Option<Vec<f32>> {
    let m = a.rows;
    if m == 0 || m > TM || !out.is_multiple_of(32) || !inp.is_multiple_of(32) || w.len() < out * inp
    {
        return None;
    }
    let kp = inp / 2;
    let width = if m > 16 { 32 } else { 16 };
    FEW.with_borrow_mut(|(rows, xb)| {
        // x's rows as pairs of k (`width` rows, those past m zero), then transposed into the
        // B tiles: row q (a pair of k), column i (a row of x), `width` columns.
        let rp: *mut u32 = lines(rows, width * kp).cast();
        let bp: *mut u32 = lines(xb, kp * width).cast();
        // SAFETY: `rows` holds `width` rows of kp pairs, `xb` kp rows of `width`;
        // AVX512_BF16 is there (AMX implies it).
        unsafe {
            for i in 0..m {
                let x: Vec<f32>;
                let run: &[f32] = if a.cs == 1 {
                    &a.data[i * a.rs..][..inp]
                } else {
                    x = (0..inp).map(|p| a.data[i * a.rs + p * a.cs]).collect();
                    &x
                };
                pairs_of_run(run, std::slice::from_raw_parts_mut(rp.add(i * kp), kp));
            }
            std::ptr::write_bytes(rp.add(m * kp), 0, (width - m) * kp);
            for qb in (0..kp).step_by(16) {
                for ib in (0..width).step_by(16) {
                    transpose16(
                        rp.add(ib * kp + qb).cast(),
                        kp,
                        bp.add(qb * width + ib).cast(),
                        width,
                    );
                }
            }
        }
        let xb: &[Line] = xb;
        // SAFETY: each unit writes rows 0..m of its own columns of C; the tiles read W's rows
        // `cols` in full (inp / 2 u32s each) and all of x's tiles.
        let c = unsafe {
            super::by_stream_units(m, out, |cols, c| {
                let (xb, w) = (xb.as_ptr().cast::<u32>(), w.as_ptr().cast::<u32>());
                asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack));
                let mut t = [Line([0.0; 16]); 16 * 4];
                let tp: *mut f32 = t.as_mut_ptr().cast();
                for j0 in cols.clone().step_by(32) {
                    few_tiles(kp / KT, w.add(j0 * kp), kp, xb, width, m > 16, tp);
                    // t: four 16 × 16 blocks, [W rows 0-15 | 16-31] × [x rows 0-15 | 16-31],
                    // each row an output, each column a row of x.
                    for (blk, (jo, io)) in
                        [(0, 0), (0, 16), (16, 0), (16, 16)].into_iter().enumerate()
                    {
                        for i in io..m.min(io + 16) {
                            for jj in 0..16 {
                                *c.add(i * out + j0 + jo + jj) =
                                    *tp.add(blk * 256 + jj * 16 + i - io);
                            }
                        }
                    }
                }
                asm!("tilerelease", options(nostack));
            })
        };
        Some(c)
    })
}

/// 32 outputs (W rows at `w`, row stride `ldw` pairs) × up to 32 rows of x (B tiles at `x`,
/// `width` columns a row) over `kt` × 16 pairs of k, into `t`: four 16 × 16 f32 blocks, W's
/// rows 0-15 by x's rows 0-15, 0-15 by 16-31, 16-31 by 0-15, 16-31 by 16-31 (the second and
/// fourth only where `two`).
///
/// # Safety
/// The tiles are configured ([`CONFIG`]); every buffer holds what it is said to.
#[inline]
unsafe fn few_tiles(
    kt: usize,
    w: *const u32,
    ldw: usize,
    x: *const u32,
    width: usize,
    two: bool,
    t: *mut f32,
) {
    let (sw, sx) = (ldw * 4, width * 4);
    // SAFETY: as the caller guarantees.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let w1 = w.add(16 * ldw);
        for kb in 0..kt {
            let q = kb * KT;
            if two {
                asm!(
                    "tileloadd tmm6, [{x0} + {sx}*1]",
                    "tileloadd tmm4, [{w0} + {sw}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{x1} + {sx}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{w1} + {sw}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    x0 = in(reg) x.add(q * width), x1 = in(reg) x.add(q * width + 16),
                    w0 = in(reg) w.add(q), w1 = in(reg) w1.add(q),
                    sx = in(reg) sx, sw = in(reg) sw, options(nostack, readonly),
                );
            } else {
                asm!(
                    "tileloadd tmm6, [{x0} + {sx}*1]",
                    "tileloadd tmm4, [{w0} + {sw}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm5, [{w1} + {sw}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    x0 = in(reg) x.add(q * width),
                    w0 = in(reg) w.add(q), w1 = in(reg) w1.add(q),
                    sx = in(reg) sx, sw = in(reg) sw, options(nostack, readonly),
                );
            }
        }
        asm!(
            "tilestored [{t0} + {s}*1], tmm0",
            "tilestored [{t1} + {s}*1], tmm1",
            "tilestored [{t2} + {s}*1], tmm2",
            "tilestored [{t3} + {s}*1], tmm3",
            t0 = in(reg) t, t1 = in(reg) t.add(256), t2 = in(reg) t.add(512), t3 = in(reg) t.add(768),
            s = in(reg) 64usize, options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::bf16_weight_tests::assert_close;
    use super::super::tests::naive;
    use super::super::{matmul_bf16, Bf16Weight, MatRef};
    use super::*;
    use crate::kernels::round_bf16;
    use crate::test_util::values;

    /// Values already on bf16's grid, so the f64 product of them is the reference.
    fn rounded(n: usize, seed: u32) -> Vec<f32> {
        values(n, seed).iter().map(|&v| round_bf16(v)).collect()
    }

    /// The shapes: whole and ragged blocks, K below a tile, across a slice, odd.
    const SHAPES: [(usize, usize, usize); 7] = [
        (65, 1, 33),
        (65, 31, 64),
        (96, 64, 32),
        (100, 517, 70),
        (257, 1030, 97),
        (66, 33, 31),
        (300, 96, 600),
    ];

    #[test]
    fn amx_products_match_the_f32_product_of_rounded_operands() {
        if !available() {
            eprintln!("skipped: no AMX on this CPU (or Linux did not grant the tile state)");
            return;
        }
        for &(m, k, n) in &SHAPES {
            let av = rounded(m * k, 1);
            let bv = rounded(k * n, 2);
            // A as it is and transposed in place; B as it is and transposed in place.
            let at: Vec<f32> = (0..k * m).map(|x| av[(x % m) * k + x / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|x| bv[(x % k) * n + x / k]).collect();
            let a_views = [MatRef::new(&av, m, k, k, 1), MatRef::new(&at, m, k, 1, m)];
            let b_views = [MatRef::new(&bv, k, n, n, 1), MatRef::new(&bt, k, n, 1, k)];
            let want = naive(a_views[0], b_views[0]);
            for (ai, &a) in a_views.iter().enumerate() {
                for (bi, &b) in b_views.iter().enumerate() {
                    let got = matmul_bf16(a, b).expect("AMX implies AVX512_BF16");
                    assert_close(&format!("{m}x{k}x{n} A{ai} B{bi} AMX"), &got, &want, k);
                    let avx = {
                        let _off = Off::new();
                        matmul_bf16(a, b).expect("AVX512_BF16")
                    };
                    assert_close(
                        &format!("{m}x{k}x{n} A{ai} B{bi} AVX512_BF16"),
                        &avx,
                        &want,
                        k,
                    );
                }
            }
        }
    }

    #[test]
    fn amx_products_with_a_bf16_weight_and_accumulation() {
        if !available() {
            eprintln!("skipped: no AMX on this CPU (or Linux did not grant the tile state)");
            return;
        }
        let (m, out, inp) = (130, 96, 200);
        let x = rounded(m * inp, 3);
        let w = rounded(out * inp, 4);
        let bw = Bf16Weight::new(&w, out, inp);
        // x·Wᵀ: W (out, inp) read transposed.
        let want = naive(
            MatRef::new(&x, m, inp, inp, 1),
            MatRef::new(&w, inp, out, 1, inp),
        );
        let got = bw
            .product(MatRef::new(&x, m, inp, inp, 1), true, None)
            .expect("AVX512_BF16")
            .expect("a new buffer");
        assert_close("x·Wᵀ", &got, &want, inp);
        // g·W accumulated onto ones.
        let g = rounded(m * out, 5);
        let mut acc = vec![1f32; m * inp];
        bw.product(MatRef::new(&g, m, out, out, 1), false, Some(&mut acc))
            .expect("AVX512_BF16");
        let want = naive(
            MatRef::new(&g, m, out, out, 1),
            MatRef::new(&w, out, inp, inp, 1),
        );
        let want: Vec<f64> = want.iter().map(|v| v + 1.0).collect();
        assert_close("1 + g·W", &acc, &want, out);
    }

    #[test]
    fn amx_decoding_rows_against_a_bf16_weight_read_in_place() {
        if !available() {
            eprintln!("skipped: no AMX on this CPU (or Linux did not grant the tile state)");
            return;
        }
        // Shapes AMX takes (out and inp multiples of 32) and one it leaves to `stream_dp`.
        for &(out, inp) in &[(96, 64), (64, 608), (128, 1536), (40, 64)] {
            let w = rounded(out * inp, 6);
            let bw = Bf16Weight::new(&w, out, inp);
            let wt = MatRef::new(&w, inp, out, 1, inp);
            for m in [1, 7, 16, 17, 32] {
                let x = rounded(m * inp, 7 + m as u32);
                let xa = MatRef::new(&x, m, inp, inp, 1);
                let want = naive(xa, wt);
                let got = bw
                    .product(xa, true, None)
                    .expect("AVX512_BF16")
                    .expect("new");
                assert_close(&format!("AMX {m} x {inp} -> {out}"), &got, &want, inp);
                let _off = Off::new();
                let avx = bw
                    .product(xa, true, None)
                    .expect("AVX512_BF16")
                    .expect("new");
                assert_close(&format!("stream_dp {m} x {inp} -> {out}"), &avx, &want, inp);
            }
        }
    }
}
