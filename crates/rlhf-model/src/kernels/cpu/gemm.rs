//! An f32 matrix product with an AVX-512 microkernel.
//!
//! candle's CPU matmul comes from the `gemm` crate, whose AVX-512 kernels sit behind its
//! `nightly` feature; on stable Rust it runs its AVX2 kernels, a quarter slower than torch's
//! GEMM on an AVX-512 CPU (BENCHMARKS.md). AVX-512 intrinsics are stable since Rust 1.89, so
//! this module carries its own kernel in the usual BLIS shape:
//!
//! - C is cut into column slabs of at most `NC` columns (and into row parts where the slabs
//!   alone would leave a thread idle); the slabs are shared out over candle's CPU thread pool,
//!   each thread packing what it reads into its own buffers.
//! - Within a slab, K is walked in slices of `KC`. For each slice the slab's columns of B are
//!   packed once into panels of `NR` columns, then the rows of A, `MC` at a time, into panels
//!   of `MR` rows (K-major), both zero-padded at the edges, so the microkernel never sees a
//!   ragged tile.
//! - The microkernel keeps an `MR × NR` tile of C in 28 zmm registers and, per k, loads two
//!   vectors of B and broadcasts `MR` values of A: 28 FMAs for 16 loads. Products of at most
//!   64 rows (decoding) use 8-row tiles instead.
//!
//! - Products of at most 32 rows against a row-major weight read transposed (x·Wᵀ while
//!   decoding) skip the packing of W: W's rows are streamed once from memory and broadcast
//!   against A's packed columns (`stream`). `RLHF_GEMM_STREAM=0` turns this off for A/B runs.
//!
//! [`matmul`] takes any strides, so transposed operands (the backward pass's `gradᵀ·x` and
//! `grad·W`) are read in place without a copy. It returns `None` where the CPU lacks
//! AVX-512F; callers then use candle's matmul.

use std::cell::RefCell;

use crate::kernels::{autocast_bf16, round_bf16};

#[cfg(target_arch = "x86_64")]
pub mod amx;
/// No AMX off x86_64.
#[cfg(not(target_arch = "x86_64"))]
pub mod amx {
    pub(super) const TM: usize = 32;
    pub fn available() -> bool {
        false
    }
    pub(super) fn enabled() -> bool {
        false
    }
    pub(super) unsafe fn wt_few(
        _: super::MatRef<'_>,
        _: &[u16],
        _: usize,
        _: usize,
    ) -> Option<Vec<f32>> {
        None
    }
    pub(super) unsafe fn block(
        _: super::MatRef<'_>,
        _: super::Src<'_>,
        _: std::ops::Range<usize>,
        _: std::ops::Range<usize>,
        _: *mut f32,
        _: usize,
        _: bool,
    ) {
        unreachable!("AMX is x86_64 only")
    }
}

/// Rows of A (and C) per microkernel tile: 14 (28 accumulators) for tall products; for at
/// most `SMALL_M` rows (decoding) 8, which wastes less of a tile on 16 or 32 rows.
const MR: usize = 14;
const MR_SMALL: usize = 8;
const SMALL_M: usize = 64;
/// Columns of B (and C) per microkernel tile: two zmm vectors.
const NR: usize = 32;
/// Depth of one packed slice: a B panel (KC × NR, 32 KB) stays in L1 while the kernel walks
/// the A panels of a block.
const KC: usize = 256;
/// Tiles of rows per packed A block (224 rows, 224 KB in L2, for MR = 14): each B panel in L1
/// serves 16 tiles. Against 8 tiles, +6% on the 100M step's products in interleaved runs
/// (`examples/gemm_shapes.rs`, median of 6 each); 32 tiles was no better.
const MC_TILES: usize = 16;
/// Most columns of C per slab (16 tiles); its packed B slice (KC × NC, 512 KB) stays in L2.
const NC: usize = NR * 16;

/// A read-only strided matrix: element (i, j) is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `data` with the given shape and strides (in elements).
    ///
    /// # Panics
    /// When the last element lies outside `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * rs + (cols - 1) * cs;
            assert!(last < data.len(), "matrix view out of bounds");
        }
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// Its number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The same matrix transposed (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// Whether this CPU runs the AVX-512 kernel (and `RLHF_GEMM=candle` does not turn it off, for
/// side-by-side measurements).
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let off = std::env::var("RLHF_GEMM").is_ok_and(|v| v == "candle");
        #[cfg(target_arch = "x86_64")]
        {
            !off && std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = off;
            false
        }
    })
}

/// Which kernel runs the products under bf16 autocast on this CPU, in words (for the log).
pub fn autocast_kernel() -> &'static str {
    if bf16_kernel() && amx::available() {
        "bf16 = true: products of more than 64 rows on AMX tiles (tdpbf16ps, f32 sums), smaller \
         ones on the AVX-512 f32 kernel with operands rounded to bf16 (RLHF_AMX=0 runs the \
         AVX512_BF16 kernel instead)"
    } else if bf16_kernel() {
        "bf16 = true: products of more than 64 rows on the AVX512_BF16 kernel (vdpbf16ps, f32 \
         sums), smaller ones on the AVX-512 f32 kernel with operands rounded to bf16 (no AMX \
         here, Linux refused the tile state, or RLHF_AMX=0)"
    } else if available() {
        "bf16 = true: products on operands rounded to bf16, summed in f32, on the AVX-512 f32 \
         kernel (no AVX512_BF16 here, or RLHF_BF16_KERNEL=0)"
    } else {
        "bf16 = true: products on operands rounded to bf16, summed in f32, on candle's f32 \
         matmul (no AVX-512 on this CPU)"
    }
}

/// Rounds `n` floats at `p` to bf16 in place ([`round_bf16`]), 16 at a time with AVX-512F.
///
/// # Safety
/// `p` must point to `n` floats this thread may write.
unsafe fn round_bf16_in_place(p: *mut f32, n: usize) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: as the caller guarantees; AVX-512F was detected.
        unsafe { round_bf16_avx512(p, n) };
        return;
    }
    for i in 0..n {
        // SAFETY: i < n.
        unsafe { *p.add(i) = round_bf16(*p.add(i)) };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_bf16_avx512(p: *mut f32, n: usize) {
    use std::arch::x86_64::*;
    let full = n / 16 * 16;
    let (abs, inf, quiet) = (
        _mm512_set1_epi32(0x7FFF_FFFF),
        _mm512_set1_epi32(0x7F80_0000),
        _mm512_set1_epi32(0x0040_0000),
    );
    let (half, one, top) = (
        _mm512_set1_epi32(0x7FFF),
        _mm512_set1_epi32(1),
        _mm512_set1_epi32(0xFFFF_0000u32 as i32),
    );
    for i in (0..full).step_by(16) {
        // SAFETY: i + 16 <= n floats at p.
        unsafe {
            let b = _mm512_loadu_si512(p.add(i) as *const _);
            let nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, abs), inf);
            let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), one);
            let r = _mm512_add_epi32(b, _mm512_add_epi32(half, odd));
            let r = _mm512_mask_or_epi32(r, nan, b, quiet);
            _mm512_storeu_si512(p.add(i) as *mut _, _mm512_and_si512(r, top));
        }
    }
    for i in full..n {
        // SAFETY: i < n.
        unsafe { *p.add(i) = round_bf16(*p.add(i)) };
    }
}

/// C = A·B as a new row-major `(a.rows, b.cols)` buffer, or `None` without AVX-512F.
///
/// # Panics
/// When the inner dimensions differ.
pub fn matmul(a: MatRef<'_>, b: MatRef<'_>) -> Option<Vec<f32>> {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m > 0 && n > 0 && k > 0 && m <= STREAM_M && b.rs == 1 && available() && stream_enabled() {
        return Some(stream(a, b));
    }
    product_into_new(a, Src::Mat(b))
}

/// C += A·B into a row-major `(a.rows, b.cols)` buffer, shared out over the pool as
/// [`matmul`] is; `false` without AVX-512F (C untouched).
///
/// # Panics
/// When the inner dimensions differ or `c` has the wrong length.
pub fn matmul_acc(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32]) -> bool {
    product_acc(a, Src::Mat(b), c)
}

/// C = A·B (or C += A·B with `acc`) for non-empty A and B, in units over candle's pool.
///
/// # Safety
/// AVX-512F must be available and `c` must point to `a.rows · b.cols` floats.
unsafe fn product_on_pool(a: MatRef<'_>, b: Src<'_>, c: *mut f32, acc: bool) {
    let (m, n) = (a.rows, b.cols());
    if m > SMALL_M && autocast_bf16() && bf16_kernel() {
        // bf16 autocast on AVX512_BF16: `vdpbf16ps` does 32 products a vector.
        // SAFETY: AVX512_BF16 was detected; C is the caller's, as the contract says.
        unsafe { bf16_on_pool(a, b, c, acc) };
        return;
    }
    let mr = if m <= SMALL_M { MR_SMALL } else { MR };
    if m > SMALL_M && m <= SHARED_M && n.div_ceil(NR) >= 2 * threads() && shared_enabled() {
        // SAFETY: as the caller guarantees.
        unsafe { product_by_panels::<MR>(a, b, c, acc) };
        return;
    }
    let units = Units::new(m, n, mr, threads());
    let out = SyncPtr(c);
    let run = |range: std::ops::Range<usize>| {
        for u in range {
            let (rows, cols) = units.unit(u);
            // SAFETY: AVX-512F was detected above; each unit writes its own block of C, and
            // `out` points to `m * n` floats that live until every unit has finished.
            unsafe {
                if mr == MR {
                    block::<MR>(a, b, rows, cols, out.get(), n, acc)
                } else {
                    block::<MR_SMALL>(a, b, rows, cols, out.get(), n, acc)
                }
            };
        }
    };
    if units.count() == 1 {
        run(0..1);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(units.count(), run);
    }
}

/// Most rows [`product_by_panels`] takes: their packed K slice (at most 1 MB) stays in L2.
const SHARED_M: usize = 4 * MC_TILES * MR;

/// Whether [`product_by_panels`] runs (`RLHF_GEMM_PANELS=0` turns it off, for A/B runs).
fn shared_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("RLHF_GEMM_PANELS").is_ok_and(|v| v == "0"))
}

/// C = A·B (or C += A·B with `acc`) for at most `SHARED_M` rows, with the work handed out
/// one item at a time: an item is one panel of `NR` columns over one K slice, all rows.
///
/// Cut into as many equal units as threads, a product waits at its end for the slowest
/// thread, and on these machines one of the two often runs slower (about a tenth of a
/// reward step went to that wait). Here the threads claim items from a shared counter, in
/// K-slice order, so they finish within one item of each other. Each thread packs A's K
/// slice once, when it first claims an item of that slice (as before, every thread packed
/// all of A); B's panel is packed by whoever claims it, or read in place ([`Src::W`]). A
/// panel's K slices are added to C in order: an item waits (rarely, and only briefly) until
/// the item of the slice before on its panel is done, so C is the same to the bit whichever
/// thread runs what.
///
/// # Safety
/// AVX-512F must be available and `c` must point to `a.rows · b.cols` floats.
#[cfg(target_arch = "x86_64")]
unsafe fn product_by_panels<const R: usize>(a: MatRef<'_>, b: Src<'_>, c: *mut f32, acc: bool) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (m, n, k) = (a.rows, b.cols(), a.cols);
    let (panels, slices) = (n.div_ceil(NR), k.div_ceil(KC));
    let items = panels * slices;
    let m_tiles = m.div_ceil(R);
    let next = AtomicUsize::new(0);
    // Per panel: how many of its K slices are in C.
    let done: Vec<AtomicUsize> = (0..panels).map(|_| AtomicUsize::new(0)).collect();
    let out = SyncPtr(c);
    let threads = threads();
    let round = autocast_bf16();
    let item = |i: usize| {
        let (s, p) = (i / panels, i % panels);
        let k0 = s * KC;
        (s, p, k0, KC.min(k - k0), p * NR)
    };
    let run = |_: std::ops::Range<usize>| {
        PACK.with_borrow_mut(|(pa, pb)| {
            let pa = lines(pa, m_tiles * R * KC);
            let pb = lines(pb, NR * KC);
            let mut packed = usize::MAX;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items {
                    break;
                }
                let (s, p, k0, kc, c0) = item(i);
                let nr = NR.min(n - c0);
                if packed != s {
                    for t in 0..m_tiles {
                        let r0 = t * R;
                        // SAFETY: the buffer holds m_tiles panels of R × KC.
                        unsafe { pack_a::<R>(a, r0, R.min(m - r0), k0, kc, pa.add(t * R * kc)) };
                    }
                    if round {
                        // SAFETY: the m_tiles panels just packed.
                        unsafe { round_bf16_in_place(pa, m_tiles * R * kc) };
                    }
                    packed = s;
                }
                // SAFETY: the buffer holds one panel of KC × NR; the item lies inside B.
                let bp = unsafe { b.slice_rounded(k0, kc, c0, nr, pb, round) };
                // What this thread likely claims next, fetched into L2 while it multiplies.
                let mut ahead = match (b, i + threads < items) {
                    (Src::W(w), true) => {
                        let (_, _, k1, kc1, c1) = item(i + threads);
                        Ahead::w_panel(w, k1, kc1, c1, m_tiles * kc.div_ceil(PF_EVERY))
                    }
                    (Src::Wt(w), true) => {
                        let (_, _, k1, kc1, c1) = item(i + threads);
                        let steps = m_tiles * kc.div_ceil(PF_EVERY);
                        Ahead::wt_slice(w, k1, kc1, c1..(c1 + NR).min(n), steps)
                    }
                    _ => Ahead::default(),
                };
                while done[p].load(Ordering::Acquire) != s {
                    std::hint::spin_loop();
                }
                let accumulate = acc || s > 0;
                for ti in 0..m_tiles {
                    let r0 = ti * R;
                    let mr = R.min(m - r0);
                    // SAFETY: the panels are packed above; the tile lies inside C, and no
                    // other thread touches this panel's columns until `done` moves on.
                    unsafe {
                        let (ap, cp) = (pa.add(ti * R * kc), out.get().add(r0 * n + c0));
                        tile::<R>(kc, ap, bp, (cp, n), (mr, nr), accumulate, &mut ahead);
                    }
                }
                done[p].store(s + 1, Ordering::Release);
            }
        });
    };
    candle_core::utils::barrier_pool().execute_chunked(threads, run);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn product_by_panels<const R: usize>(_: MatRef<'_>, _: Src<'_>, _: *mut f32, _: bool) {
    unreachable!("the AVX-512 kernel runs on x86_64 only")
}

// ---------------------------------------------------------------------------------------------
// Frozen weights kept in the kernel's layout
// ---------------------------------------------------------------------------------------------

/// A frozen weight W (`out × inp`, as a checkpoint stores it) kept in the layout the
/// microkernel reads B in, so that the backward's grad·W packs nothing, and x·Wᵀ packs from
/// contiguous blocks rather than strided rows.
///
/// W's columns are cut into panels of `NR`; panel t holds, for each row j of W, its `NR`
/// floats `W[j][NR·t..NR·t + NR]` (zero past `inp`), the rows one after another. Any slice of
/// rows of a panel is then a packed B panel of grad·W as it is. It takes as much memory as W
/// (where `inp` is a multiple of `NR`).
pub struct Panels {
    data: Vec<Line>,
    out: usize,
    inp: usize,
}

impl Panels {
    /// W's panels, from W row-major (`w.len() == out · inp`).
    ///
    /// # Panics
    /// When `w` is not `out · inp` long.
    pub fn new(w: &[f32], out: usize, inp: usize) -> Self {
        assert_eq!(w.len(), out * inp, "Panels: the weight is not out × in");
        let panels = inp.div_ceil(NR);
        let mut data = vec![Line([0.0; 16]); (panels * out * NR).div_ceil(16)];
        let dst: &mut [f32] = Line::floats_mut(&mut data);
        for t in 0..panels {
            let (c0, nr) = (t * NR, NR.min(inp - t * NR));
            for (j, row) in w.chunks_exact(inp.max(1)).enumerate() {
                let at = (t * out + j) * NR;
                dst[at..at + nr].copy_from_slice(&row[c0..c0 + nr]);
            }
        }
        Panels { data, out, inp }
    }

    /// W's rows (out features).
    pub fn out(&self) -> usize {
        self.out
    }

    /// W's columns (in features).
    pub fn inp(&self) -> usize {
        self.inp
    }

    fn floats(&self) -> &[f32] {
        Line::floats(&self.data)
    }

    /// Where element (j, i) of W lies in [`Self::floats`]: row j of panel i / NR.
    fn at(&self, j: usize, i: usize) -> usize {
        ((i / NR) * self.out + j) * NR + i % NR
    }

    /// Element (j, i) of W.
    pub fn get(&self, j: usize, i: usize) -> f32 {
        assert!(j < self.out && i < self.inp, "Panels::get out of bounds");
        self.floats()[self.at(j, i)]
    }

    /// W row-major again (`out · inp` floats).
    pub fn to_row_major(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        let src = self.floats();
        for (j, row) in w.chunks_exact_mut(self.inp.max(1)).enumerate() {
            for (t, chunk) in row.chunks_mut(NR).enumerate() {
                let at = self.at(j, t * NR);
                chunk.copy_from_slice(&src[at..at + chunk.len()]);
            }
        }
        w
    }
}

impl Line {
    fn floats(lines: &[Line]) -> &[f32] {
        // SAFETY: a Line is 16 f32s with no padding (repr(C)).
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 16) }
    }

    fn floats_mut(lines: &mut [Line]) -> &mut [f32] {
        // SAFETY: as in `floats`.
        unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 16) }
    }
}

/// x·Wᵀ for a weight kept as [`Panels`] (`x` is `m × inp`), as a new row-major `m × out`
/// buffer; `None` without AVX-512F.
///
/// # Panics
/// When x's columns are not W's in features.
pub fn matmul_wt(x: MatRef<'_>, w: &Panels) -> Option<Vec<f32>> {
    product_into_new(x, Src::Wt(w))
}

/// grad·W for a weight kept as [`Panels`] (`g` is `m × out`), as a new row-major `m × inp`
/// buffer; `None` without AVX-512F.
///
/// # Panics
/// When g's columns are not W's out features.
pub fn matmul_w(g: MatRef<'_>, w: &Panels) -> Option<Vec<f32>> {
    product_into_new(g, Src::W(w))
}

/// C += x·Wᵀ (`c` is `m × out`, row-major); `false` without AVX-512F (C untouched).
///
/// # Panics
/// When the shapes disagree.
pub fn matmul_wt_acc(x: MatRef<'_>, w: &Panels, c: &mut [f32]) -> bool {
    product_acc(x, Src::Wt(w), c)
}

/// C += grad·W (`c` is `m × inp`, row-major); `false` without AVX-512F (C untouched).
///
/// # Panics
/// When the shapes disagree.
pub fn matmul_w_acc(g: MatRef<'_>, w: &Panels, c: &mut [f32]) -> bool {
    product_acc(g, Src::W(w), c)
}

/// C = A·B as a new row-major buffer, over the pool: [`matmul`]'s body, for any B.
fn product_into_new(a: MatRef<'_>, b: Src<'_>) -> Option<Vec<f32>> {
    assert_eq!(a.cols, b.rows(), "matmul: inner dimensions differ");
    if !available() {
        return None;
    }
    let (m, n) = (a.rows, b.cols());
    if m == 0 || n == 0 || a.cols == 0 {
        return Some(vec![0f32; m * n]);
    }
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: AVX-512F was detected; c holds m · n floats.
    unsafe { product_on_pool(a, b, c.as_mut_ptr(), false) };
    // SAFETY: the units cover C, and the first K slice of each writes every element of its
    // block (k > 0 here).
    unsafe { c.set_len(m * n) };
    Some(c)
}

/// C += A·B over the pool: [`matmul_acc`]'s body, for any B.
fn product_acc(a: MatRef<'_>, b: Src<'_>, c: &mut [f32]) -> bool {
    assert_eq!(a.cols, b.rows(), "matmul: inner dimensions differ");
    assert_eq!(
        c.len(),
        a.rows * b.cols(),
        "matmul_acc: C has the wrong length"
    );
    if !available() {
        return false;
    }
    if a.rows > 0 && b.cols() > 0 && a.cols > 0 {
        // SAFETY: AVX-512F was detected; c holds the whole of C.
        unsafe { product_on_pool(a, b, c.as_mut_ptr(), true) };
    }
    true
}

/// Where a block's B comes from: a strided matrix, or a weight kept as [`Panels`], read as
/// W (grad·W) or as Wᵀ (x·Wᵀ).
#[derive(Clone, Copy)]
enum Src<'a> {
    Mat(MatRef<'a>),
    W(&'a Panels),
    Wt(&'a Panels),
    /// Wᵀ for a row-major bf16 W `(out, inp)` kept for decoding: read by the bf16 kernel only.
    Bf16Wt(Bf16W<'a>),
    /// The same W read as it is (grad·W): bf16 kernel only.
    Bf16W(Bf16W<'a>),
}

/// A row-major bf16 weight `(out, inp)`, as bits.
#[derive(Clone, Copy)]
struct Bf16W<'a> {
    w: &'a [u16],
    out: usize,
    inp: usize,
}

impl Src<'_> {
    fn rows(&self) -> usize {
        match self {
            Src::Mat(b) => b.rows,
            Src::W(w) => w.out,
            Src::Wt(w) => w.inp,
            Src::Bf16Wt(w) => w.inp,
            Src::Bf16W(w) => w.out,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Src::Mat(b) => b.cols,
            Src::W(w) => w.inp,
            Src::Wt(w) => w.out,
            Src::Bf16Wt(w) => w.out,
            Src::Bf16W(w) => w.inp,
        }
    }

    /// The packed `kc × NR` panel of rows `k0..k0+kc`, columns `c0..c0+nr` of B: packed into
    /// `dst`, or, for grad·W on [`Panels`], where it already lies (`c0` a multiple of `NR`).
    ///
    /// # Safety
    /// `dst` must hold `NR * kc` floats; the rows and columns must lie inside B.
    unsafe fn slice(
        &self,
        k0: usize,
        kc: usize,
        c0: usize,
        nr: usize,
        dst: *mut f32,
    ) -> *const f32 {
        // SAFETY: as the caller guarantees.
        unsafe {
            match self {
                Src::Mat(b) => {
                    pack_b(*b, k0, kc, c0, nr, dst);
                    dst
                }
                Src::W(w) => {
                    debug_assert!(c0.is_multiple_of(NR));
                    w.floats().as_ptr().add(w.at(k0, c0))
                }
                Src::Wt(w) => {
                    pack_wt(w, k0, kc, c0, nr, dst);
                    dst
                }
                Src::Bf16Wt(_) | Src::Bf16W(_) => {
                    unreachable!("bf16 weights go to the bf16 kernel only")
                }
            }
        }
    }
}

impl Src<'_> {
    /// [`Self::slice`], rounded to bf16 with `round` (a panel read in place is copied into
    /// `dst` first).
    ///
    /// # Safety
    /// As for [`Self::slice`].
    unsafe fn slice_rounded(
        &self,
        k0: usize,
        kc: usize,
        c0: usize,
        nr: usize,
        dst: *mut f32,
        round: bool,
    ) -> *const f32 {
        // SAFETY: as the caller guarantees; a slice is `kc × NR` floats, like `dst`.
        unsafe {
            let p = self.slice(k0, kc, c0, nr, dst);
            if !round {
                return p;
            }
            if !std::ptr::eq(p, dst) {
                std::ptr::copy_nonoverlapping(p, dst, kc * NR);
            }
            round_bf16_in_place(dst, kc * NR);
            dst
        }
    }
}

/// k steps of the microkernel per prefetch step: a few lines at a time, spread through the
/// kernel's loop, so that the fill buffers never fill up and stall it.
const PF_EVERY: usize = 8;

/// Prefetches into L2, spread over a run of kernel calls' loops: the next panel of a weight the
/// kernels read in place ([`Src::W`]), or what the next K slice packs ([`Src::Wt`]). W comes
/// from memory (the caches hold no layer's weights by the time the backward returns to it),
/// and a kernel waiting on it stalls.
#[derive(Default)]
struct Ahead {
    /// Contiguous runs of 64-byte lines: start and count.
    runs: [(usize, usize); KC / NR],
    len: usize,
    /// The run and line next issued, and lines per step.
    at: (usize, usize),
    per_step: usize,
}

impl Ahead {
    /// Rows `k0..k0+kc` of W's panel at column `c0`, over `steps` kernel calls.
    fn w_panel(w: &Panels, k0: usize, kc: usize, c0: usize, steps: usize) -> Self {
        let start = w.floats().as_ptr() as usize + w.at(k0, c0) * 4;
        Self::of([(start, kc * NR / 16)].into_iter(), steps)
    }

    /// What [`pack_wt`] reads for rows `k0..k0+kc` of Wᵀ at columns `cols`, over `steps`.
    fn wt_slice(
        w: &Panels,
        k0: usize,
        kc: usize,
        cols: std::ops::Range<usize>,
        steps: usize,
    ) -> Self {
        let base = w.floats().as_ptr() as usize;
        let runs = (k0 / NR..(k0 + kc).div_ceil(NR))
            .map(|p| (base + w.at(cols.start, p * NR) * 4, cols.len() * NR / 16));
        Self::of(runs, steps)
    }

    /// At most `KC / NR` runs (one K slice's in-panels), spread over `steps` steps.
    fn of(runs: impl Iterator<Item = (usize, usize)>, steps: usize) -> Self {
        let mut a = Ahead::default();
        let mut lines = 0;
        for (slot, run) in a.runs.iter_mut().zip(runs) {
            *slot = run;
            a.len += 1;
            lines += run.1;
        }
        a.per_step = lines.div_ceil(steps.max(1));
        a
    }

    /// Issues the next `per_step` prefetches.
    #[inline(always)]
    fn step(&mut self) {
        let mut left = self.per_step;
        while left > 0 && self.at.0 < self.len {
            let (start, lines) = self.runs[self.at.0];
            let n = left.min(lines - self.at.1);
            for l in self.at.1..self.at.1 + n {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: a prefetch does not fault, and the address lies in the weight.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm_prefetch::<_MM_HINT_T1>((start + l * 64) as *const i8);
                }
            }
            left -= n;
            self.at.1 += n;
            if self.at.1 == lines {
                self.at = (self.at.0 + 1, 0);
            }
        }
    }
}

/// Packs rows `k0..k0+kc` × columns `c0..c0+nr` of Wᵀ (in features × out features) from
/// [`Panels`] as `kc` rows of `NR` floats (zero past `nr`): 16 × 16 blocks of a panel (16 of
/// W's rows, 128 bytes apart) are transposed in registers.
///
/// # Safety
/// `dst` must hold `NR * kc` floats; the rows and columns must lie inside Wᵀ.
unsafe fn pack_wt(w: &Panels, k0: usize, kc: usize, c0: usize, nr: usize, dst: *mut f32) {
    let (src, at) = (w.floats(), |j: usize, i: usize| w.at(j, i));
    // SAFETY: every index below is inside `dst` (p < kc, j < NR) or inside `src` (j < out,
    // i < inp, the caller's bounds).
    unsafe {
        if nr == NR && k0.is_multiple_of(16) && available() {
            let full = kc / 16 * 16;
            for jb in (0..NR).step_by(16) {
                for pb in (0..full).step_by(16) {
                    let s = src.as_ptr().add(at(c0 + jb, k0 + pb));
                    transpose16(s, NR, dst.add(pb * NR + jb), NR);
                }
            }
            for p in full..kc {
                for j in 0..NR {
                    *dst.add(p * NR + j) = src[at(c0 + j, k0 + p)];
                }
            }
        } else {
            for p in 0..kc {
                for j in 0..NR {
                    *dst.add(p * NR + j) = if j < nr { src[at(c0 + j, k0 + p)] } else { 0.0 };
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Few rows against a weight matrix (decoding)
// ---------------------------------------------------------------------------------------------

/// Most rows of A the streaming path takes: two vectors of 16 lanes.
const STREAM_M: usize = 32;
/// Rows of W per streaming tile for one vector of A's rows (16 accumulators), and for two.
const STREAM_R1: usize = 16;
const STREAM_R2: usize = 8;
/// Rows of W per unit of work handed to a thread.
const STREAM_UNIT: usize = 64;

/// Whether the streaming path runs (`RLHF_GEMM_STREAM=0` turns it off, for A/B runs).
fn stream_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("RLHF_GEMM_STREAM").is_ok_and(|v| v == "0"))
}

/// C (`m × n`, row-major) made over candle's pool a unit of `STREAM_UNIT` columns (rows of W,
/// in the streaming paths) at a time.
///
/// # Safety
/// `unit(cols, c)` must write every one of C's `m` rows in columns `cols` (and nothing else).
unsafe fn by_stream_units(
    m: usize,
    n: usize,
    unit: impl Fn(std::ops::Range<usize>, *mut f32) + Sync,
) -> Vec<f32> {
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    let out = SyncPtr(c.as_mut_ptr());
    let run = |range: std::ops::Range<usize>| {
        for u in range {
            unit(u * STREAM_UNIT..((u + 1) * STREAM_UNIT).min(n), out.get());
        }
    };
    let units = n.div_ceil(STREAM_UNIT);
    if units == 1 {
        run(0..1);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(units, run);
    }
    // SAFETY: the units cover columns 0..n, and each writes every row of its columns.
    unsafe { c.set_len(m * n) };
    c
}

/// Columns `cols` of C (rows 0..m, row stride `ldc`) a tile of W's rows at a time: `tile(j,
/// left, t)` fills `t[q][i]` (W's row j + q against A's row i) for the rows of W it takes from
/// j (at most `left`) and returns how many; they are then written to C.
///
/// # Safety
/// `m <= 32`; columns `cols` of C's `m` rows must be writable by this thread alone.
#[inline(always)]
unsafe fn by_tiles(
    cols: std::ops::Range<usize>,
    m: usize,
    c: *mut f32,
    ldc: usize,
    mut tile: impl FnMut(usize, usize, &mut [[f32; 32]; STREAM_R1]) -> usize,
) {
    let mut t = [[0f32; 32]; STREAM_R1];
    let mut j = cols.start;
    while j < cols.end {
        let r = tile(j, cols.end - j, &mut t);
        for i in 0..m {
            for (q, row) in t.iter().take(r).enumerate() {
                // SAFETY: (i, j + q) is in C's rows 0..m and this unit's columns.
                unsafe { *c.add(i * ldc + j + q) = row[i] };
            }
        }
        j += r;
    }
}

/// C = A·B for at most `STREAM_M` rows of A where B is a row-major W read transposed
/// (`b.rs == 1`: column j of B is row j of W, contiguous), as in x·Wᵀ while decoding.
///
/// With so few rows the packed path spends as long packing W as multiplying, and reads W
/// through memory twice. Here A is packed transposed (K × 16 or K × 32 floats, zero-padded,
/// a few dozen KB), and W's rows are streamed once, straight from memory: each element is
/// broadcast against the vector(s) of A's column p, so the FMAs need no horizontal sums.
/// Each tile of W's rows accumulates in registers over the whole of K; the threads take
/// runs of W's rows.
fn stream(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f32> {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if autocast_bf16() && bf16_kernel() {
        // W's rows read as bf16 pairs by `vdpbf16ps` (rounded a unit at a time).
        return stream_dp(a, DpRows::F32(b.data, b.cs), n, k);
    }
    let (mut at, lanes) = pack_stream_a(a);
    let round = autocast_bf16();
    if round {
        // SAFETY: `at` is this function's own buffer.
        unsafe { round_bf16_in_place(at.as_mut_ptr(), at.len()) };
    }
    let (at, w, ldw) = (&at[..], b.data, b.cs);
    // SAFETY: AVX-512F was detected by the caller (`matmul`); W's rows j < n lie in `b.data`
    // (checked by `MatRef::new`), and a unit writes every row of its columns of C only.
    unsafe {
        by_stream_units(m, n, |cols, c| {
            if round {
                stream_unit::<true>(at, lanes, w, ldw, k, cols, m, c, n)
            } else {
                stream_unit::<false>(at, lanes, w, ldw, k, cols, m, c, n)
            }
        })
    }
}

/// A (at most `STREAM_M` rows) packed transposed for [`stream_unit`]: K groups of 16 or 32
/// floats (the lane count it returns), zero-padded past A's rows. AVX-512F must be available.
fn pack_stream_a(a: MatRef<'_>) -> (Vec<f32>, usize) {
    let (m, k) = (a.rows, a.cols);
    let lanes = if m <= 16 { 16 } else { 32 };
    let mut at = vec![0f32; k * lanes];
    if a.cs == 1 {
        // Rows contiguous along K: register transposes, per vector of 16 rows.
        for h in 0..m.div_ceil(16) {
            let rows = 16.min(m - 16 * h);
            // SAFETY: AVX-512F was detected by the caller (`matmul`); the rows lie in the
            // view, and `at` holds k groups of `lanes` floats, this vector's 16 at 16h.
            unsafe {
                let dst = at.as_mut_ptr().add(16 * h);
                pack_rows_kmajor(a, 16 * h, rows, 0, k, dst, lanes, 16);
            }
        }
    } else {
        for i in 0..m {
            for p in 0..k {
                at[p * lanes + i] = a.data[i * a.rs + p * a.cs];
            }
        }
    }
    (at, lanes)
}

/// Columns `cols` of C (rows 0..m, row stride `ldc`) from W's rows `cols`.
///
/// # Safety
/// AVX-512F must be available; rows `cols` of W (`ldw` apart, `k` long) must be readable and
/// columns `cols` of the `m` rows of C writable by this thread alone.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn stream_unit<const RND: bool>(
    at: &[f32],
    lanes: usize,
    w: &[f32],
    ldw: usize,
    k: usize,
    cols: std::ops::Range<usize>,
    m: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY (all kernels): rows j.. of W are inside `w`, and C's columns are this thread's,
    // as the caller guarantees.
    unsafe {
        by_tiles(cols, m, c, ldc, |j, left, tile| {
            let wj = w.as_ptr().add(j * ldw);
            match (lanes, left) {
                (16, l) if l >= STREAM_R1 => {
                    stream_tile::<STREAM_R1, 1, RND>(at, wj, ldw, k, tile);
                    STREAM_R1
                }
                (32, l) if l >= STREAM_R2 => {
                    stream_tile::<STREAM_R2, 2, RND>(at, wj, ldw, k, tile);
                    STREAM_R2
                }
                (16, _) => {
                    stream_tile::<1, 1, RND>(at, wj, ldw, k, tile);
                    1
                }
                _ => {
                    stream_tile::<1, 2, RND>(at, wj, ldw, k, tile);
                    1
                }
            }
        })
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn stream_unit<const RND: bool>(
    _: &[f32],
    _: usize,
    _: &[f32],
    _: usize,
    _: usize,
    _: std::ops::Range<usize>,
    _: usize,
    _: *mut f32,
    _: usize,
) {
    unreachable!("the AVX-512 kernel runs on x86_64 only")
}

/// tile[q][i] = Σ_p W[q, p] · Aᵀ[p, i] for R rows of W and V vectors of 16 rows of A.
///
/// # Safety
/// AVX-512F must be available; `w` must point at R rows of `k` floats, `ldw` apart, and
/// `at` hold `k × 16V` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn stream_tile<const R: usize, const V: usize, const RND: bool>(
    at: &[f32],
    w: *const f32,
    ldw: usize,
    k: usize,
    tile: &mut [[f32; 32]; STREAM_R1],
) {
    use std::arch::x86_64::*;
    assert!(at.len() >= k * 16 * V);
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let ap = at.as_ptr();
    // Four values of k a round: each row of W is addressed once per four broadcasts, so the
    // address arithmetic does not bind the loop.
    const U: usize = 4;
    let main = k / U * U;
    for p in (0..main).step_by(U) {
        let mut av = [[_mm512_setzero_ps(); V]; U];
        for (u, au) in av.iter_mut().enumerate() {
            for (v, x) in au.iter_mut().enumerate() {
                // SAFETY: p + u < k, so row p + u of Aᵀ is inside `at` (asserted above).
                *x = unsafe { _mm512_loadu_ps(ap.add((p + u) * 16 * V + 16 * v)) };
            }
        }
        for (q, row) in acc.iter_mut().enumerate() {
            // SAFETY: row q < R of W, elements p..p + U ≤ k, as the caller guarantees.
            let wq = unsafe { w.add(q * ldw + p) };
            for (u, au) in av.iter().enumerate() {
                let w = unsafe { *wq.add(u) };
                let bq = _mm512_set1_ps(if RND { round_bf16(w) } else { w });
                for (x, a) in row.iter_mut().zip(au) {
                    *x = _mm512_fmadd_ps(*a, bq, *x);
                }
            }
        }
    }
    for p in main..k {
        for (q, row) in acc.iter_mut().enumerate() {
            // SAFETY: as above, for the last k % U values.
            let wv = unsafe { *w.add(q * ldw + p) };
            let bq = _mm512_set1_ps(if RND { round_bf16(wv) } else { wv });
            for (v, x) in row.iter_mut().enumerate() {
                let a = unsafe { _mm512_loadu_ps(ap.add(p * 16 * V + 16 * v)) };
                *x = _mm512_fmadd_ps(a, bq, *x);
            }
        }
    }
    for (q, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            // SAFETY: 16 floats at offset 16v of a 32-float row.
            unsafe { _mm512_storeu_ps(tile[q].as_mut_ptr().add(16 * v), *x) };
        }
    }
}

/// A frozen weight W (`out × inp`, row-major) kept in bf16 for a `bf16 = true` run on a CPU
/// with AVX512_BF16: every product reads its operands rounded to bf16 there anyway, so the
/// rounded weight is all it needs, at half the memory of the f32 one, and the bf16 kernel
/// reads its pairs straight from the rows (x·Wᵀ: a row's adjacent values; grad·W: two rows
/// interleaved) instead of converting the f32 weight at every product.
pub struct Bf16Weight {
    bits: Vec<u16>,
    out: usize,
    inp: usize,
}

impl Bf16Weight {
    /// W rounded to bf16 (nearest even), from W row-major (`w.len() == out · inp`).
    ///
    /// # Panics
    /// When `w` is not `out · inp` long.
    pub fn new(w: &[f32], out: usize, inp: usize) -> Self {
        assert_eq!(w.len(), out * inp, "Bf16Weight: the weight is not out × in");
        let bits = w
            .iter()
            .map(|&x| (round_bf16(x).to_bits() >> 16) as u16)
            .collect();
        Bf16Weight { bits, out, inp }
    }

    /// W's rows (out features).
    pub fn out(&self) -> usize {
        self.out
    }

    /// W's columns (in features).
    pub fn inp(&self) -> usize {
        self.inp
    }

    /// W as f32 (the rounded values), row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        self.bits
            .iter()
            .map(|&b| f32::from_bits(u32::from(b) << 16))
            .collect()
    }

    fn src(&self, transposed: bool) -> Src<'_> {
        let w = Bf16W {
            w: &self.bits,
            out: self.out,
            inp: self.inp,
        };
        if transposed {
            Src::Bf16Wt(w)
        } else {
            Src::Bf16W(w)
        }
    }

    /// x·Wᵀ (`transposed`, x `m × inp`) or grad·W (grad `m × out`) with x (or grad) rounded
    /// to bf16 and f32 sums, as a new buffer, or added to `acc`; `None` without AVX512_BF16.
    pub fn product(
        &self,
        a: MatRef<'_>,
        transposed: bool,
        acc: Option<&mut [f32]>,
    ) -> Option<Option<Vec<f32>>> {
        if !bf16_available() {
            return None;
        }
        let b = self.src(transposed);
        assert_eq!(a.cols, b.rows(), "Bf16Weight: inner dimensions differ");
        let (m, n) = (a.rows, b.cols());
        match acc {
            Some(c) => {
                assert_eq!(c.len(), m * n, "Bf16Weight: C has the wrong length");
                if m > 0 && n > 0 && a.cols > 0 {
                    // SAFETY: AVX512_BF16 was detected; c holds the whole of C.
                    unsafe { bf16_on_pool(a, b, c.as_mut_ptr(), true) };
                }
                Some(None)
            }
            // SAFETY (both): AVX512_BF16 was detected above.
            None if transposed => Some(Some(unsafe { bf16_wt(a, &self.bits, self.out, self.inp) })),
            None => Some(Some(unsafe { bf16_into_new(a, b) })),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding with bf16 weights: W kept in bf16, products in f32
// ---------------------------------------------------------------------------------------------

/// Rows of a bf16 W converted to f32 at a time for products of more than `STREAM_M` rows
/// (prefill), each then run on the packed kernel.
const BF16_CHUNK: usize = 256;

/// C = A·Wᵀ for a row-major bf16 W `(out, inp)` (`w.len() == out · inp`) and f32 A `(m, inp)`,
/// with every product and sum in f32: a bf16 is the top half of an f32, so each weight
/// converts exactly. The weight is read from memory as bf16 (half the bytes of an f32 W, what
/// bounds decoding); on a CPU with AVX-512F, for at most `STREAM_M` rows of A (decoding), 16
/// values of a row at a time are widened in registers and multiplied against A's rows
/// (`stream_bf16`), and for more rows (prefill) `BF16_CHUNK` rows are widened into a buffer
/// and multiplied on the packed kernel; elsewhere [`matmul_wt_bf16_portable`] runs.
///
/// # Panics
/// When `w` or A does not have `inp` columns.
pub fn matmul_wt_bf16(a: MatRef<'_>, w: &[half::bf16], out: usize, inp: usize) -> Vec<f32> {
    assert_eq!(a.cols, inp, "matmul_wt_bf16: inner dimensions differ");
    assert_eq!(w.len(), out * inp, "matmul_wt_bf16: W is not (out, inp)");
    let (m, k) = (a.rows, inp);
    if m == 0 || out == 0 || k == 0 {
        return vec![0f32; m * out];
    }
    if !available() {
        return matmul_wt_bf16_portable(a, w, out, inp);
    }
    use half::slice::HalfFloatSliceExt;
    let bits: &[u16] = w.reinterpret_cast();
    if autocast_bf16() && bf16_kernel() {
        // bf16 autocast: A rounded too, so `vdpbf16ps` computes exactly these products.
        // SAFETY: AVX512_BF16 was detected (`bf16_kernel`).
        return unsafe { bf16_wt(a, bits, out, inp) };
    }
    if m <= STREAM_M {
        stream_bf16(a, bits, out, k)
    } else {
        // `matmul` rounds A under autocast as it packs.
        chunked_bf16(a, bits, out, k)
    }
}

/// [`matmul_wt_bf16`] without SIMD intrinsics: each of W's rows widened once, then one dot
/// product per row of A, summed in order. Runs where the CPU lacks AVX-512F.
pub fn matmul_wt_bf16_portable(
    a: MatRef<'_>,
    w: &[half::bf16],
    out: usize,
    inp: usize,
) -> Vec<f32> {
    assert_eq!(a.cols, inp, "matmul_wt_bf16: inner dimensions differ");
    assert_eq!(w.len(), out * inp, "matmul_wt_bf16: W is not (out, inp)");
    let m = a.rows;
    // Under bf16 autocast A is read rounded, as every product then reads its operands.
    let round = autocast_bf16();
    let mut c = vec![0f32; m * out];
    let mut row = vec![0f32; inp];
    for j in 0..out {
        for (r, x) in row.iter_mut().zip(&w[j * inp..(j + 1) * inp]) {
            *r = x.to_f32();
        }
        for i in 0..m {
            let mut s = 0f32;
            for (p, r) in row.iter().enumerate() {
                let x = a.data[i * a.rs + p * a.cs];
                s += if round { round_bf16(x) } else { x } * r;
            }
            c[i * out + j] = s;
        }
    }
    c
}

/// W's rows for [`stream_dp`]: bf16 (`k` apart), or f32 (`ldw` apart, converted to bf16 pairs
/// a unit of rows at a time).
#[derive(Clone, Copy)]
enum DpRows<'a> {
    Bf16(&'a [u16]),
    F32(&'a [f32], usize),
}

/// x·Wᵀ under bf16 autocast on AVX512_BF16 for at most `STREAM_M` rows of A (decoding): A
/// packed transposed as pairs of k (`k/2` groups of 16 or 32 lanes), rounded; each pair of a
/// W row (two adjacent bf16, one u32) broadcast against them with `vdpbf16ps`, 32 products a
/// vector where the f32 path does 16. At most 8 rows of A are packed by quads of k instead
/// and read four values of a W row at a time ([`dp_tile_quads`]), so that no lane is
/// padding. A bf16 W ([`matmul_wt_bf16`]) is streamed from memory
/// once and read in place; an f32 W ([`matmul`] under autocast: a policy that trains) is read
/// once too, each unit's rows rounded into a buffer of pairs first. The threads take runs of
/// W's rows.
fn stream_dp(a: MatRef<'_>, w: DpRows<'_>, n: usize, k: usize) -> Vec<f32> {
    let m = a.rows;
    let lanes = if m <= 16 { 16 } else { 32 };
    let kp = k.div_ceil(2);
    let mut at = vec![0u32; kp * lanes];
    for k0 in (0..k).step_by(KC_BF16) {
        let kc = KC_BF16.min(k - k0);
        // SAFETY: AVX512_BF16 was detected by the caller; `at` holds kp groups of `lanes`,
        // this slice's from pair k0 / 2 (k0 is even); the rows lie in A.
        unsafe {
            let dst = at.as_mut_ptr().add(k0 / 2 * lanes);
            if a.cs == 1 {
                pack_pairs_by_cols(dst, lanes, kc, m, kc, |i, p| {
                    &a.data[i * a.rs + k0 + p..i * a.rs + k]
                })
            } else {
                pack_pairs_at(dst, lanes, kc, m, |p, i| a.data[i * a.rs + (k0 + p) * a.cs])
            }
        }
    }
    let quads_on = m <= 8;
    if quads_on {
        // By quads of k for `dp_tile_quads`: lanes 2i and 2i + 1 of quad g are row i's pairs
        // 2g and 2g + 1 (zero past k).
        let mut quads = vec![0u32; kp.div_ceil(2) * 16];
        for (g, quad) in quads.chunks_exact_mut(16).enumerate() {
            for i in 0..m {
                quad[2 * i] = at[2 * g * 16 + i];
                quad[2 * i + 1] = at.get((2 * g + 1) * 16 + i).copied().unwrap_or(0);
            }
        }
        at = quads;
    }
    // Rows of A a vector holds (8 when packed by quads of k).
    let lanes = if quads_on { 8 } else { lanes };
    let at = &at[..];
    // SAFETY: AVX512_BF16 was detected by the caller; W's rows j < n lie in `w` (checked by
    // `matmul_wt_bf16`, or `MatRef::new`), and each unit writes every row of its columns only.
    unsafe {
        by_stream_units(m, n, |cols, c| match w {
            DpRows::Bf16(w) => dp_unit(at, lanes, w, k, k, cols, m, c, n),
            DpRows::F32(w, ldw) => DP_PAIRS.with_borrow_mut(|pairs| {
                pairs.resize(cols.len() * kp, 0);
                for (t, j) in cols.clone().enumerate() {
                    let row = &w[j * ldw..j * ldw + k];
                    let dst = &mut pairs[t * kp..(t + 1) * kp];
                    pairs_of_run(row, dst);
                    if k % 2 == 1 {
                        dst[kp - 1] = bf16_pair(row[k - 1], 0.0);
                    }
                }
                // The pairs as bf16 values, rows 2·kp apart (little-endian: a pair's low half,
                // the even k, comes first); u32 → u16 halves the alignment.
                let bits =
                    std::slice::from_raw_parts(pairs.as_ptr().cast::<u16>(), pairs.len() * 2);
                // This unit's rows are 0-based in `bits`; C's columns start at cols.start.
                dp_unit(
                    at,
                    lanes,
                    bits,
                    2 * kp,
                    k,
                    0..cols.len(),
                    m,
                    c.add(cols.start),
                    n,
                )
            }),
        })
    }
}

thread_local! {
    /// Per-thread buffer of an f32 W's rows made into bf16 pairs ([`stream_dp`]).
    static DP_PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Columns `cols` of C (rows 0..m, row stride `ldc`) from bf16 W's rows `cols` (`k` long).
///
/// # Safety
/// AVX512_BF16 must be available; rows `cols` of W must lie in `w`, `at` hold `k/2` (rounded
/// up) groups of `lanes` pairs, and columns `cols` of C's `m` rows be this thread's alone.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dp_unit(
    at: &[u32],
    lanes: usize,
    w: &[u16],
    ldw: usize,
    k: usize,
    cols: std::ops::Range<usize>,
    m: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY (all tiles): the rows j.. of W they read lie in `w`, and C's columns are this
    // thread's, as the caller guarantees.
    unsafe {
        by_tiles(cols, m, c, ldc, |j, left, tile| {
            let wj = &w[j * ldw..];
            match (lanes, left) {
                // At most 8 rows of A: A packed by quads of k (see `dp_tile_quads`).
                (8, l) if l >= STREAM_R1 => {
                    dp_tile_quads::<STREAM_R1>(at, wj, ldw, k, tile);
                    STREAM_R1
                }
                (8, _) => {
                    dp_tile_quads::<1>(at, wj, ldw, k, tile);
                    1
                }
                (16, l) if l >= STREAM_R1 => {
                    dp_tile::<STREAM_R1, 1>(at, wj, ldw, k, tile);
                    STREAM_R1
                }
                (32, l) if l >= STREAM_R2 => {
                    dp_tile::<STREAM_R2, 2>(at, wj, ldw, k, tile);
                    STREAM_R2
                }
                (16, _) => {
                    dp_tile::<1, 1>(at, wj, ldw, k, tile);
                    1
                }
                _ => {
                    dp_tile::<1, 2>(at, wj, ldw, k, tile);
                    1
                }
            }
        })
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn dp_unit(
    _: &[u32],
    _: usize,
    _: &[u16],
    _: usize,
    _: usize,
    _: std::ops::Range<usize>,
    _: usize,
    _: *mut f32,
    _: usize,
) {
    unreachable!("the bf16 kernel runs on x86_64 only")
}

/// tile[q][i] = Σ_p W[q, p] · A[i, p] for R rows of bf16 W (`k` apart) and V vectors of 16
/// rows of A packed as pairs of k, with `vdpbf16ps`.
///
/// # Safety
/// AVX512_BF16 must be available; `w` must hold R rows of `k`, `at` `k/2` (rounded up)
/// groups of 16V pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dp_tile<const R: usize, const V: usize>(
    at: &[u32],
    w: &[u16],
    ldw: usize,
    k: usize,
    tile: &mut [[f32; 32]; STREAM_R1],
) {
    use std::arch::x86_64::*;
    let kp = k.div_ceil(2);
    assert!(at.len() >= kp * 16 * V && w.len() >= (R - 1) * ldw + k);
    let (ap, wp) = (at.as_ptr(), w.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    // Whole pairs of W's rows are read as u32s; an odd k's last value is widened alone.
    let full = k / 2;
    // SAFETY (the loads): pair q < kp of Aᵀ lies in `at`, values 2q, 2q + 1 < k of row
    // r < R in `w` (asserted above).
    for q in 0..full {
        let mut av = [_mm512_setzero_ps(); V];
        for (v, x) in av.iter_mut().enumerate() {
            *x = unsafe {
                _mm512_castsi512_ps(_mm512_loadu_si512(ap.add(q * 16 * V + 16 * v).cast()))
            };
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let pair = unsafe { std::ptr::read_unaligned(wp.add(r * ldw + 2 * q).cast::<i32>()) };
            let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            for (x, a) in row.iter_mut().zip(&av) {
                *x = _mm512_dpbf16_ps(*x, std::mem::transmute::<__m512, __m512bh>(*a), b);
            }
        }
    }
    if full < kp {
        let q = full;
        for (r, row) in acc.iter_mut().enumerate() {
            let pair = i32::from(unsafe { *wp.add(r * ldw + k - 1) });
            let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            for (v, x) in row.iter_mut().enumerate() {
                let a = unsafe { _mm512_loadu_si512(ap.add(q * 16 * V + 16 * v).cast()) };
                *x = _mm512_dpbf16_ps(*x, std::mem::transmute::<__m512i, __m512bh>(a), b);
            }
        }
    }
    for (q, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            // SAFETY: 16 floats at offset 16v of a 32-float row.
            unsafe { _mm512_storeu_ps(tile[q].as_mut_ptr().add(16 * v), *x) };
        }
    }
}

/// [`dp_tile`] for at most 8 rows of A and R rows of W, four values of k a step: A is packed
/// by quads of k (see [`stream_dp`]: lane 2i holds row i's pair 2g, lane 2i + 1 its pair
/// 2g + 1), and a W row's four values 4g..4g + 4 are broadcast as one u64, so lane 2i sums
/// row i's even pairs and lane 2i + 1 its odd ones, which are added at the end. Every lane of
/// each `vdpbf16ps` makes a product that counts, where 16 lanes of A's rows leave half of
/// them or more on zero padding at 8 rows and fewer.
///
/// # Safety
/// AVX512_BF16 must be available; `w` must hold R rows of `k`, `at` `k/4` (rounded up)
/// groups of 16 u32s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dp_tile_quads<const R: usize>(
    at: &[u32],
    w: &[u16],
    ldw: usize,
    k: usize,
    tile: &mut [[f32; 32]; STREAM_R1],
) {
    use std::arch::x86_64::*;
    let quads = k.div_ceil(4);
    assert!(at.len() >= quads * 16 && w.len() >= (R - 1) * ldw + k && R <= STREAM_R1);
    let (ap, wp) = (at.as_ptr(), w.as_ptr());
    let mut acc = [_mm512_setzero_ps(); R];
    let full = k / 4;
    // SAFETY (the loads): quad g < quads of A lies in `at`, values 4g..4g + 4 <= k of row
    // r < R in `w` (asserted above).
    for g in 0..full {
        let a: __m512bh = std::mem::transmute(unsafe { _mm512_loadu_si512(ap.add(g * 16).cast()) });
        if g % 8 == 0 {
            // The next tile's rows, a line ahead of where this one reads: W streams from
            // memory once, and the hardware prefetcher alone keeps up with fewer rows.
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((R + r) * ldw + 4 * g).cast());
            }
        }
        for (r, x) in acc.iter_mut().enumerate() {
            let quad: i64 = unsafe { std::ptr::read_unaligned(wp.add(r * ldw + 4 * g).cast()) };
            let b: __m512bh = std::mem::transmute(_mm512_set1_epi64(quad));
            *x = _mm512_dpbf16_ps(*x, a, b);
        }
    }
    if full < quads {
        // The last 1-3 values of k, zero past k.
        let a: __m512bh =
            std::mem::transmute(unsafe { _mm512_loadu_si512(ap.add(full * 16).cast()) });
        for (r, x) in acc.iter_mut().enumerate() {
            let mut quad = 0u64;
            for (t, p) in (4 * full..k).enumerate() {
                quad |= u64::from(unsafe { *wp.add(r * ldw + p) }) << (16 * t);
            }
            let b: __m512bh = std::mem::transmute(_mm512_set1_epi64(quad as i64));
            *x = _mm512_dpbf16_ps(*x, a, b);
        }
    }
    for (row, x) in tile.iter_mut().zip(&acc) {
        let mut lanes = [0f32; 16];
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *x) };
        for (i, out) in row.iter_mut().take(8).enumerate() {
            *out = lanes[2 * i] + lanes[2 * i + 1];
        }
    }
}

/// Packs `kc` values along k × `nr` columns of an operand whose columns are bf16 runs along
/// k (`col(j)`, at least `kc` long; a row of a bf16 W read as Wᵀ) as pairs of k, `width`
/// wide: the pairs are the runs' own adjacent values, copied as u32s; zero past `nr` and
/// past `kc`.
///
/// # Safety
/// `dst` must hold `kc.div_ceil(2) · width` u32s.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_bf16_rows_as_pairs<'a>(
    dst: *mut u32,
    width: usize,
    kc: usize,
    nr: usize,
    col: impl Fn(usize) -> &'a [u16],
) {
    let kp = kc.div_ceil(2);
    for j in 0..width {
        if j >= nr {
            for q in 0..kp {
                // SAFETY: q < kp rows of `width` u32s.
                unsafe { *dst.add(q * width + j) = 0 };
            }
            continue;
        }
        let x = &col(j)[..kc];
        for (q, p) in x.chunks(2).enumerate() {
            let pair = u32::from(p[0]) | (u32::from(p.get(1).copied().unwrap_or(0)) << 16);
            // SAFETY: as above.
            unsafe { *dst.add(q * width + j) = pair };
        }
    }
}

/// The streaming path over a bf16 W for at most `STREAM_M` rows of A: the threads take runs
/// of W's rows ([`STREAM_UNIT`]); within a run, tiles of `DOT_R` rows of W are widened 16
/// values at a time in registers (zero-extended and shifted into an f32's top half) and
/// multiplied against up to `DOT_M` rows of A at once, one f32 accumulator vector per (row of
/// W, row of A), summed across lanes at the end. W is read from memory once (a tile's rows
/// stay in L1 while each group of A's rows passes), as bf16.
fn stream_bf16(a: MatRef<'_>, w: &[u16], n: usize, k: usize) -> Vec<f32> {
    let m = a.rows;
    // A's rows contiguous along K (a copy of at most 32 rows where they are not, or where
    // bf16 autocast rounds them).
    let own: Vec<f32>;
    let round = autocast_bf16();
    let (ad, lda) = if a.cs == 1 && !round {
        (a.data, a.rs)
    } else {
        own = (0..m * k)
            .map(|q| {
                let x = a.data[(q / k) * a.rs + (q % k) * a.cs];
                if round {
                    round_bf16(x)
                } else {
                    x
                }
            })
            .collect();
        (&own[..], k)
    };
    // SAFETY: AVX-512F was checked by `matmul_wt_bf16`; rows `cols` of W lie in `w`, A's m
    // rows of k floats lie in `ad`, and each unit writes every row of its columns only.
    unsafe { by_stream_units(m, n, |cols, c| dot_unit(ad, lda, m, w, k, cols, c, n)) }
}

/// Rows of W per tile of [`dot_tile`], and most rows of A per group: 16 accumulators. (3 × 8,
/// which widens each weight once for 8 rows of A, measured no faster: BENCHMARKS.md.)
const DOT_R: usize = 4;
const DOT_M: usize = 4;

/// Columns `cols` of C from W's rows `cols` (bf16, `k` apart) and A's `m` rows (`lda` apart).
///
/// # Safety
/// AVX-512F must be available; the rows must lie in `a` and `w`, and columns `cols` of C's
/// `m` rows (row stride `ldc`) must be writable by this thread alone.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_unit(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &[u16],
    k: usize,
    cols: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
) {
    let mut j = cols.start;
    while j < cols.end {
        let r = if cols.end - j >= DOT_R { DOT_R } else { 1 };
        let wj = &w[j * k..(j + r) * k];
        let mut i = 0;
        while i < m {
            let g = DOT_M.min(m - i);
            let ai = &a[i * lda..];
            let mut t = [[0f32; DOT_M]; DOT_R];
            // SAFETY: r rows of W at wj, g rows of A at ai (lda apart), k long each.
            unsafe {
                match (r, g) {
                    (DOT_R, 4) => dot_tile::<DOT_R, 4>(ai, lda, wj, k, &mut t),
                    (DOT_R, 3) => dot_tile::<DOT_R, 3>(ai, lda, wj, k, &mut t),
                    (DOT_R, 2) => dot_tile::<DOT_R, 2>(ai, lda, wj, k, &mut t),
                    (DOT_R, _) => dot_tile::<DOT_R, 1>(ai, lda, wj, k, &mut t),
                    (_, 4) => dot_tile::<1, 4>(ai, lda, wj, k, &mut t),
                    (_, 3) => dot_tile::<1, 3>(ai, lda, wj, k, &mut t),
                    (_, 2) => dot_tile::<1, 2>(ai, lda, wj, k, &mut t),
                    _ => dot_tile::<1, 1>(ai, lda, wj, k, &mut t),
                }
            }
            for (q, row) in t.iter().take(r).enumerate() {
                for (s, &v) in row.iter().take(g).enumerate() {
                    // SAFETY: (i + s, j + q) is in C's rows 0..m and this unit's columns.
                    unsafe { *c.add((i + s) * ldc + j + q) = v };
                }
            }
            i += g;
        }
        j += r;
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_unit(
    _: &[f32],
    _: usize,
    _: usize,
    _: &[u16],
    _: usize,
    _: std::ops::Range<usize>,
    _: *mut f32,
    _: usize,
) {
    unreachable!("the AVX-512 kernel runs on x86_64 only")
}

/// t[q][s] = Σ_p W[q, p] · A[s, p] for R rows of W (bf16) and M rows of A, in f32.
///
/// # Safety
/// AVX-512F must be available; `w` must hold R rows of `k` and `a` M rows of `k` floats,
/// `lda` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_tile<const R: usize, const M: usize>(
    a: &[f32],
    lda: usize,
    w: &[u16],
    k: usize,
    t: &mut [[f32; DOT_M]; DOT_R],
) {
    use std::arch::x86_64::*;
    assert!(w.len() >= R * k && (M == 0 || a.len() >= (M - 1) * lda + k));
    let (ap, wp) = (a.as_ptr(), w.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let full = k / 16 * 16;
    for p in (0..full).step_by(16) {
        let mut wv = [_mm512_setzero_ps(); R];
        for (q, v) in wv.iter_mut().enumerate() {
            // SAFETY: p + 16 <= k, row q < R of W (asserted above).
            *v = unsafe {
                let h = _mm256_loadu_si256(wp.add(q * k + p) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            };
        }
        for s in 0..M {
            // SAFETY: row s < M of A, p + 16 <= k.
            let av = unsafe { _mm512_loadu_ps(ap.add(s * lda + p)) };
            for (q, row) in acc.iter_mut().enumerate() {
                row[s] = _mm512_fmadd_ps(wv[q], av, row[s]);
            }
        }
    }
    for (q, row) in acc.iter().enumerate() {
        for (s, v) in row.iter().enumerate() {
            let mut sum = _mm512_reduce_add_ps(*v);
            for p in full..k {
                sum += f32::from_bits(u32::from(w[q * k + p]) << 16) * a[s * lda + p];
            }
            t[q][s] = sum;
        }
    }
}

/// More than `STREAM_M` rows of A: `BF16_CHUNK` of W's rows at a time widened to f32 and
/// multiplied on the packed kernel ([`matmul`]), each into its columns of C.
fn chunked_bf16(a: MatRef<'_>, w: &[u16], n: usize, k: usize) -> Vec<f32> {
    let m = a.rows;
    let mut c = vec![0f32; m * n];
    let mut wide = vec![0f32; BF16_CHUNK.min(n) * k];
    for j0 in (0..n).step_by(BF16_CHUNK) {
        let r = BF16_CHUNK.min(n - j0);
        let dst = &mut wide[..r * k];
        // SAFETY: AVX-512F was checked by `matmul_wt_bf16`; rows j0..j0 + r lie in W.
        unsafe { widen_bf16(&w[j0 * k..(j0 + r) * k], dst) };
        let part = matmul(a, MatRef::new(dst, r, k, k, 1).t()).expect("AVX-512F checked");
        for i in 0..m {
            c[i * n + j0..i * n + j0 + r].copy_from_slice(&part[i * r..(i + 1) * r]);
        }
    }
    c
}

/// dst[i] = src[i] as f32 (bf16 bits shifted into an f32's top half), 16 at a time.
///
/// # Safety
/// AVX-512F must be available; `dst` at least as long as `src`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(dst.len() >= src.len());
    let full = src.len() / 16 * 16;
    for i in (0..full).step_by(16) {
        // SAFETY: i + 16 <= src.len() <= dst.len().
        unsafe {
            let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            let f = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_castsi512_ps(f));
        }
    }
    for i in full..src.len() {
        dst[i] = f32::from_bits(u32::from(src[i]) << 16);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn widen_bf16(_: &[u16], _: &mut [f32]) {
    unreachable!("the AVX-512 kernel runs on x86_64 only")
}

/// C[i] = A[i]·B[i] for `batch` products of small matrices (attention's q·kᵀ and p·v), as one
/// row-major `(batch, a.rows, b.cols)` buffer; `None` without AVX-512F. `a_step` and `b_step`
/// are the element distances between consecutive matrices. The batch is shared out over the
/// thread pool, one product per unit, each on a single thread.
///
/// # Panics
/// When the inner dimensions differ or a matrix lies outside its buffer.
pub fn batched_matmul(
    a: MatRef<'_>,
    a_step: usize,
    b: MatRef<'_>,
    b_step: usize,
    batch: usize,
) -> Option<Vec<f32>> {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    if !available() {
        return None;
    }
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if batch == 0 || m == 0 || n == 0 || k == 0 {
        return Some(vec![0f32; batch * m * n]);
    }
    fn item<'a>(x: MatRef<'a>, step: usize, i: usize) -> MatRef<'a> {
        MatRef::new(&x.data[i * step..], x.rows, x.cols, x.rs, x.cs)
    }
    // Bounds of the last item checked up front, so the workers cannot panic midway.
    let (_, _) = (item(a, a_step, batch - 1), item(b, b_step, batch - 1));
    let mut c: Vec<f32> = Vec::with_capacity(batch * m * n);
    let out = SyncPtr(c.as_mut_ptr());
    let bf16 = autocast_bf16() && bf16_kernel();
    let on_amx = bf16 && amx::enabled();
    let run = |range: std::ops::Range<usize>| {
        for i in range {
            let (ai, bi) = (item(a, a_step, i), item(b, b_step, i));
            // SAFETY: AVX-512F was detected above; item i writes its own m × n block.
            unsafe {
                let ci = out.get().add(i * m * n);
                if m <= SMALL_M {
                    block::<MR_SMALL>(ai, Src::Mat(bi), 0..m, 0..n, ci, n, false)
                } else if on_amx {
                    amx::block(ai, Src::Mat(bi), 0..m, 0..n, ci, n, false)
                } else if bf16 {
                    block_bf16(ai, Src::Mat(bi), 0..m, 0..n, ci, n, false)
                } else {
                    block::<MR>(ai, Src::Mat(bi), 0..m, 0..n, ci, n, false)
                }
            }
        }
    };
    if batch == 1 {
        run(0..1);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(batch, run);
    }
    // SAFETY: every item wrote its whole block (k > 0).
    unsafe { c.set_len(batch * m * n) };
    Some(c)
}

/// C = A·B, or C += A·B with `acc`, on the calling thread, into `c` with row stride `ldc`:
/// for work the caller has already shared out over the pool (one attention head per unit).
/// Runs the AVX-512 kernel where the CPU has it and a plain loop elsewhere.
///
/// # Safety
/// Element (i, j) of C is `c + i * ldc + j`: the `a.rows × b.cols` elements so addressed must
/// lie inside one allocation, and no other thread may touch them during the call.
///
/// # Panics
/// When the inner dimensions differ.
pub(crate) unsafe fn matmul_into(a: MatRef<'_>, b: MatRef<'_>, c: *mut f32, ldc: usize, acc: bool) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                // SAFETY: row i of C lies inside the caller's allocation.
                unsafe { std::ptr::write_bytes(c.add(i * ldc), 0, n) };
            }
        }
        return;
    }
    if available() {
        // SAFETY: AVX-512F (and for the bf16 kernel AVX512_BF16) was detected; C is the
        // caller's, as the contract says.
        unsafe {
            if m <= SMALL_M {
                block::<MR_SMALL>(a, Src::Mat(b), 0..m, 0..n, c, ldc, acc)
            } else if autocast_bf16() && bf16_kernel() && amx::enabled() {
                amx::block(a, Src::Mat(b), 0..m, 0..n, c, ldc, acc)
            } else if autocast_bf16() && bf16_kernel() {
                block_bf16(a, Src::Mat(b), 0..m, 0..n, c, ldc, acc)
            } else {
                block::<MR>(a, Src::Mat(b), 0..m, 0..n, c, ldc, acc)
            }
        }
        return;
    }
    // SAFETY: as the caller guarantees.
    unsafe { matmul_loop(a, b, c, ldc, acc) }
}

/// [`matmul_into`] without AVX-512: a plain loop the compiler vectorises.
///
/// # Safety
/// As for [`matmul_into`].
unsafe fn matmul_loop(a: MatRef<'_>, b: MatRef<'_>, c: *mut f32, ldc: usize, acc: bool) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let r: fn(f32) -> f32 = if autocast_bf16() { round_bf16 } else { |x| x };
    let mut row = vec![0f32; n];
    for i in 0..m {
        row.fill(0.0);
        for p in 0..k {
            let x = r(a.data[i * a.rs + p * a.cs]);
            for (j, c) in row.iter_mut().enumerate() {
                *c += x * r(b.data[p * b.rs + j * b.cs]);
            }
        }
        // SAFETY: row i of C lies inside the caller's allocation.
        let ci = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
        for (c, r) in ci.iter_mut().zip(&row) {
            *c = if acc { *c + r } else { *r };
        }
    }
}

/// candle's thread count, asked once: without RAYON_NUM_THREADS candle works it out from
/// /proc/cpuinfo on every call.
fn threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// How C is shared out: column slabs (each packs its slice of B once per K slice), cut into
/// row parts too where the slabs alone would leave a thread idle.
struct Units {
    m: usize,
    n: usize,
    slab: usize,
    slabs: usize,
    part: usize,
    parts: usize,
}

impl Units {
    fn new(m: usize, n: usize, mr: usize, threads: usize) -> Self {
        // As many slabs as threads (or a multiple), where each keeps two tiles or more: a
        // thread then packs only its own columns of B, which is read from memory, rather
        // than all of them for a share of the rows.
        let mut slabs = n.div_ceil(NC);
        if slabs < 4 * threads && !slabs.is_multiple_of(threads) {
            let even = slabs.next_multiple_of(threads);
            if n.div_ceil(even) >= 2 * NR {
                slabs = even;
            }
        }
        let slab = n.div_ceil(slabs).next_multiple_of(NR);
        let slabs = n.div_ceil(slab);
        let balanced = slabs.is_multiple_of(threads) || slabs >= 4 * threads;
        let parts = if balanced {
            1
        } else {
            threads.min(m.div_ceil(mr))
        };
        let part = m.div_ceil(parts).next_multiple_of(mr);
        let parts = m.div_ceil(part);
        Units {
            m,
            n,
            slab,
            slabs,
            part,
            parts,
        }
    }

    fn count(&self) -> usize {
        self.slabs * self.parts
    }

    fn unit(&self, u: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let (p, s) = (u / self.slabs, u % self.slabs);
        (
            p * self.part..((p + 1) * self.part).min(self.m),
            s * self.slab..((s + 1) * self.slab).min(self.n),
        )
    }
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);

impl SyncPtr {
    // A method, so that closures capture the whole `SyncPtr` and not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: the threads given a `SyncPtr` write disjoint blocks of the buffer it points to.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

/// A 64-byte aligned line of floats, the unit of the packing buffers.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

thread_local! {
    /// Per-thread packing buffers for A (MC × KC) and B (KC × a slab's columns).
    static PACK: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

fn lines(buf: &mut Vec<Line>, floats: usize) -> *mut f32 {
    let need = floats.div_ceil(16);
    if buf.len() < need {
        buf.resize(need, Line([0.0; 16]));
    }
    buf.as_mut_ptr().cast()
}

/// One `rows × cols` block of C (row stride `ldc`), all of K; with `acc` the product is added
/// to what C holds.
///
/// # Safety
/// AVX-512F must be available, and `c` must point to a buffer holding the whole of C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block<const R: usize>(
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
    let round = autocast_bf16();
    PACK.with_borrow_mut(|(pa, pb)| {
        let pa = lines(pa, MC_TILES * R * KC);
        let pb = lines(pb, n_tiles * NR * KC);
        let mut panels = [std::ptr::null::<f32>(); NC / NR];
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            for (t, panel) in panels.iter_mut().enumerate().take(n_tiles) {
                let c0 = cols.start + t * NR;
                let nr = NR.min(cols.end - c0);
                // SAFETY: the buffer holds n_tiles panels of KC × NR.
                *panel = unsafe { b.slice_rounded(k0, kc, c0, nr, pb.add(t * NR * kc), round) };
            }
            let accumulate = acc || k0 > 0;
            // The calls of this slice's kernels, over which the prefetches are spread.
            let calls = n_tiles * rows.len().div_ceil(R) * kc.div_ceil(PF_EVERY);
            let mut ahead = Ahead::default();
            if let Src::Wt(w) = b {
                if k0 + kc < k {
                    ahead = Ahead::wt_slice(w, k0 + kc, KC.min(k - k0 - kc), cols.clone(), calls);
                }
            }
            let mut m0 = rows.start;
            while m0 < rows.end {
                let mb = (MC_TILES * R).min(rows.end - m0);
                let m_tiles = mb.div_ceil(R);
                for t in 0..m_tiles {
                    let r0 = m0 + t * R;
                    let mr = R.min(m0 + mb - r0);
                    // SAFETY: the buffer holds MC_TILES panels of R × KC.
                    unsafe { pack_a::<R>(a, r0, mr, k0, kc, pa.add(t * R * kc)) };
                }
                if round {
                    // SAFETY: the m_tiles panels just packed.
                    unsafe { round_bf16_in_place(pa, m_tiles * R * kc) };
                }
                for (tj, &bp) in panels.iter().enumerate().take(n_tiles) {
                    let c0 = cols.start + tj * NR;
                    let nr = NR.min(cols.end - c0);
                    if let Src::W(w) = b {
                        // The kernels read W's panels in place: fetch the next one into L2
                        // while this one is multiplied.
                        let next = if tj + 1 < n_tiles {
                            Some((k0, kc, c0 + NR))
                        } else {
                            (k0 + kc < k).then(|| (k0 + kc, KC.min(k - k0 - kc), cols.start))
                        };
                        ahead = next.map_or_else(Ahead::default, |(k0, kc, c0)| {
                            Ahead::w_panel(w, k0, kc, c0, m_tiles * kc.div_ceil(PF_EVERY))
                        });
                    }
                    for ti in 0..m_tiles {
                        let r0 = m0 + ti * R;
                        let mr = R.min(m0 + mb - r0);
                        // SAFETY: panels are packed above; the tile lies inside C.
                        unsafe {
                            let (ap, cp) = (pa.add(ti * R * kc), c.add(r0 * ldc + c0));
                            tile::<R>(kc, ap, bp, (cp, ldc), (mr, nr), accumulate, &mut ahead);
                        }
                    }
                }
                m0 += mb;
            }
            k0 += kc;
        }
    });
}

/// One `mr × nr` tile of C at `c.0` (row stride `c.1`) from packed panels: the kernel
/// straight into C where the tile is whole, through a scratch tile at C's edges.
///
/// # Safety
/// As for [`kernel`], with `mr <= R` and `nr <= NR` rows and columns of C inside it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: (*mut f32, usize),
    (mr, nr): (usize, usize),
    acc: bool,
    ahead: &mut Ahead,
) {
    // SAFETY: as the caller guarantees.
    unsafe {
        if mr == R && nr == NR {
            kernel::<R>(kc, a, b, c.0, c.1, acc, ahead);
        } else {
            let mut tile = [Line([0.0; 16]); MR * NR / 16];
            let tp: *mut f32 = tile.as_mut_ptr().cast();
            kernel::<R>(kc, a, b, tp, NR, false, ahead);
            write_edge(tp, c.0, c.1, mr, nr, acc);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block<const R: usize>(
    _: MatRef<'_>,
    _: Src<'_>,
    _: std::ops::Range<usize>,
    _: std::ops::Range<usize>,
    _: *mut f32,
    _: usize,
    _: bool,
) {
    unreachable!("the AVX-512 kernel runs on x86_64 only")
}

/// Packs rows `r0..r0+mr` × columns `k0..k0+kc` of A as `kc` groups of `R` floats
/// (zero past `mr`).
///
/// # Safety
/// `dst` must hold `R * kc` floats.
unsafe fn pack_a<const R: usize>(
    a: MatRef<'_>,
    r0: usize,
    mr: usize,
    k0: usize,
    kc: usize,
    dst: *mut f32,
) {
    let d = a.data;
    // SAFETY: every index below is inside `dst` (p < kc, i < R) and inside the view, whose
    // bounds `MatRef::new` checked.
    unsafe {
        if a.cs == 1 && R <= 16 && available() {
            // Element-wise, this loop compiled to scatters, ~14% of a LoRA step's products.
            pack_rows_kmajor(a, r0, mr, k0, kc, dst, R, R);
            return;
        }
        if a.cs == 1 {
            for i in 0..mr {
                let row = &d[(r0 + i) * a.rs + k0..][..kc];
                for (p, v) in row.iter().enumerate() {
                    *dst.add(p * R + i) = *v;
                }
            }
        } else {
            for p in 0..kc {
                let base = (k0 + p) * a.cs + r0 * a.rs;
                for i in 0..mr {
                    *dst.add(p * R + i) = d[base + i * a.rs];
                }
            }
        }
        for p in 0..kc {
            for i in mr..R {
                *dst.add(p * R + i) = 0.0;
            }
        }
    }
}

/// Packs rows `k0..k0+kc` × columns `c0..c0+nr` of B as `kc` rows of `NR` floats
/// (zero past `nr`).
///
/// # Safety
/// `dst` must hold `NR * kc` floats.
unsafe fn pack_b(b: MatRef<'_>, k0: usize, kc: usize, c0: usize, nr: usize, dst: *mut f32) {
    let d = b.data;
    // SAFETY: as in `pack_a`.
    unsafe {
        if b.cs == 1 {
            for p in 0..kc {
                let row = &d[(k0 + p) * b.rs + c0..][..nr];
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(p * NR), nr);
                for j in nr..NR {
                    *dst.add(p * NR + j) = 0.0;
                }
            }
        } else if b.rs == 1 && nr == NR && available() {
            // B = Wᵀ of a row-major W: each column of B is a row of W. Transpose 16 × 16
            // blocks in registers, then the K tail one element at a time.
            let full = kc / 16 * 16;
            for jb in (0..NR).step_by(16) {
                let src = d.as_ptr().add((c0 + jb) * b.cs + k0);
                for pb in (0..full).step_by(16) {
                    transpose16(src.add(pb), b.cs, dst.add(pb * NR + jb), NR);
                }
            }
            for p in full..kc {
                for j in 0..NR {
                    *dst.add(p * NR + j) = d[(c0 + j) * b.cs + k0 + p];
                }
            }
        } else {
            for j in 0..nr {
                let base = (c0 + j) * b.cs + k0 * b.rs;
                for p in 0..kc {
                    *dst.add(p * NR + j) = d[base + p * b.rs];
                }
            }
            for p in 0..kc {
                for j in nr..NR {
                    *dst.add(p * NR + j) = 0.0;
                }
            }
        }
    }
}

/// Writes (or adds, with `acc`) an `R × NR` accumulator tile to C (row stride `ldc`).
///
/// # Safety
/// AVX-512F must be available; the tile must lie inside C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile<const R: usize>(
    t: &[[std::arch::x86_64::__m512; 2]; R],
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the tile's rows lie inside C.
    unsafe {
        for (i, row) in t.iter().enumerate() {
            let cp = c.add(i * ldc);
            if acc {
                _mm512_storeu_ps(cp, _mm512_add_ps(_mm512_loadu_ps(cp), row[0]));
                _mm512_storeu_ps(
                    cp.add(16),
                    _mm512_add_ps(_mm512_loadu_ps(cp.add(16)), row[1]),
                );
            } else {
                _mm512_storeu_ps(cp, row[0]);
                _mm512_storeu_ps(cp.add(16), row[1]);
            }
        }
    }
}

/// Copies (or adds, with `acc`) the `mr × nr` corner of a full tile computed into `tile`
/// (row stride NR) to C: the ragged edge tiles.
///
/// # Safety
/// `tile` holds MR × NR floats and the corner lies inside C.
unsafe fn write_edge(tile: *const f32, c: *mut f32, ldc: usize, mr: usize, nr: usize, acc: bool) {
    // SAFETY: as the caller guarantees.
    unsafe {
        for i in 0..mr {
            for j in 0..nr {
                let dst = c.add(i * ldc + j);
                let v = *tile.add(i * NR + j);
                *dst = if acc { *dst + v } else { v };
            }
        }
    }
}

/// Writes the transpose of the 16 × 16 block at `src` (row stride `lds`) to `dst` (row
/// stride `ldd`): dst row c = src column c.
///
/// # Safety
/// AVX-512F must be available; both blocks must lie inside their buffers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the 16 rows read and written.
    unsafe {
        let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * lds)));
        let cols = transpose16_regs(r);
        for (c, v) in cols.iter().enumerate() {
            _mm512_storeu_ps(dst.add(c * ldd), *v);
        }
    }
}

/// Packs rows `r0..r0+rows` (at most 16) × columns `k0..k0+kc` of a row-major A (`cs == 1`)
/// K-major: for each k, `width` floats (the rows, then zeros) at `dst + k * ldd`. 16 × 16
/// blocks are transposed in registers, the K tail one element at a time.
///
/// # Safety
/// AVX-512F must be available; the rows lie in the view, `rows <= width <= 16`, and `kc`
/// groups of `width` floats, `ldd` apart, are writable at `dst`.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_rows_kmajor(
    a: MatRef<'_>,
    r0: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    dst: *mut f32,
    ldd: usize,
    width: usize,
) {
    let full = kc / 16 * 16;
    // SAFETY: as the caller guarantees.
    unsafe {
        let src = a.data.as_ptr().add(r0 * a.rs + k0);
        for pb in (0..full).step_by(16) {
            pack_rows16(src.add(pb), a.rs, rows, dst.add(pb * ldd), ldd, width);
        }
        for p in full..kc {
            for i in 0..width {
                *dst.add(p * ldd + i) = if i < rows {
                    a.data[(r0 + i) * a.rs + k0 + p]
                } else {
                    0.0
                };
            }
        }
    }
}

/// Packs 16 columns of `rows` (at most 16) rows at `src` (row stride `lds`) as 16 groups of
/// `width` floats, `ldd` apart, at `dst`: group c holds column c of the rows, zero past
/// `rows`.
///
/// # Safety
/// AVX-512F must be available; `rows` rows of 16 floats at `src` must be readable and the
/// 16 groups at `dst` writable, with `rows <= 16` and `width <= 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows16(
    src: *const f32,
    lds: usize,
    rows: usize,
    dst: *mut f32,
    ldd: usize,
    width: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the rows read and the groups written; the masked stores
    // write `width` floats each.
    unsafe {
        let r: [__m512; 16] = std::array::from_fn(|i| {
            if i < rows {
                _mm512_loadu_ps(src.add(i * lds))
            } else {
                _mm512_setzero_ps()
            }
        });
        let cols = transpose16_regs(r);
        let mask: __mmask16 = ((1u32 << width) - 1) as __mmask16;
        for (c, v) in cols.iter().enumerate() {
            _mm512_mask_storeu_ps(dst.add(c * ldd), mask, *v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_rows16(_: *const f32, _: usize, _: usize, _: *mut f32, _: usize, _: usize) {
    unreachable!("the AVX-512 kernel runs on x86_64 only")
}

/// The transpose of 16 rows held in registers: element c of the result is column c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16_regs(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved: t[2i] holds columns 4L, 4L+1 of rows 2i, 2i+1 in each
    // 128-bit lane L, t[2i+1] columns 4L+2, 4L+3.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + q] holds, in lane L, column 4L + q of rows 4i..4i+3.
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let a = _mm512_castps_pd(t[4 * i]);
        let b = _mm512_castps_pd(t[4 * i + 1]);
        let c = _mm512_castps_pd(t[4 * i + 2]);
        let d = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    // Column 4L + q gathers lane L of u[q], u[4 + q], u[8 + q], u[12 + q].
    let mut out = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let s0 = _mm512_shuffle_f32x4::<0x88>(u[q], u[4 + q]);
        let s1 = _mm512_shuffle_f32x4::<0xDD>(u[q], u[4 + q]);
        let s2 = _mm512_shuffle_f32x4::<0x88>(u[8 + q], u[12 + q]);
        let s3 = _mm512_shuffle_f32x4::<0xDD>(u[8 + q], u[12 + q]);
        out[q] = _mm512_shuffle_f32x4::<0x88>(s0, s2);
        out[8 + q] = _mm512_shuffle_f32x4::<0xDD>(s0, s2);
        out[4 + q] = _mm512_shuffle_f32x4::<0x88>(s1, s3);
        out[12 + q] = _mm512_shuffle_f32x4::<0xDD>(s1, s3);
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose16(_: *const f32, _: usize, _: *mut f32, _: usize) {
    unreachable!("the AVX-512 kernel runs on x86_64 only")
}

/// C[MR × NR] (+)= A panel · B panel over `kc`, issuing `ahead`'s prefetches as it goes.
///
/// # Safety
/// AVX-512F must be available; `a` holds `kc × R` floats, `b` holds `kc × NR`, and `c` an
/// `R × NR` tile with row stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel<const R: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    acc: bool,
    ahead: &mut Ahead,
) {
    use std::arch::x86_64::*;
    let mut t = [[_mm512_setzero_ps(); 2]; R];
    // SAFETY: the caller guarantees the sizes read and written here.
    unsafe {
        for p in 0..kc {
            if p % PF_EVERY == 0 {
                ahead.step();
            }
            let b0 = _mm512_loadu_ps(b.add(p * NR));
            let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
            let ap = a.add(p * R);
            for (i, row) in t.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(i));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
        store_tile(&t, c, ldc, acc);
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 products (AVX512_BF16): operands rounded to bf16, f32 accumulation
// ---------------------------------------------------------------------------------------------

/// Whether this CPU runs the bf16 kernel (AVX512_BF16's `vdpbf16ps`).
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 autocast runs its products of more than 64 rows on the AVX512_BF16 kernel:
/// where the CPU has it, unless `RLHF_BF16_KERNEL=0` (the f32 kernel on rounded operands, for
/// A/B runs).
pub fn bf16_kernel() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        bf16_available() && !std::env::var("RLHF_BF16_KERNEL").is_ok_and(|v| v == "0")
    })
}

/// Depth of one packed bf16 slice (pairs of k are packed together; B panel 32 KB).
const KC_BF16: usize = 512;

/// C = A·B with A and B rounded to bf16 (nearest even) and the products summed in f32, as
/// torch's CPU autocast computes a bf16 matmul; `None` without AVX512_BF16. `vdpbf16ps` does
/// 32 products a vector where `vfmadd231ps` does 16.
///
/// # Panics
/// When the inner dimensions differ.
pub fn matmul_bf16(a: MatRef<'_>, b: MatRef<'_>) -> Option<Vec<f32>> {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    if !bf16_available() {
        return None;
    }
    // SAFETY: AVX512_BF16 was detected above.
    Some(unsafe { bf16_into_new(a, Src::Mat(b)) })
}

/// x·Wᵀ for a row-major bf16 W `(out, inp)` on the bf16 kernel (x rounded): at most
/// `STREAM_M` rows streamed over W's rows, more packed.
///
/// # Safety
/// AVX512_BF16 must be available; `w` is `out · inp` long and x has `inp` columns.
unsafe fn bf16_wt(a: MatRef<'_>, w: &[u16], out: usize, inp: usize) -> Vec<f32> {
    if a.rows > 0 && a.rows <= STREAM_M && out > 0 && inp > 0 {
        if amx::enabled() {
            // SAFETY: AMX is on; as the caller guarantees for the rest.
            if let Some(c) = unsafe { amx::wt_few(a, w, out, inp) } {
                return c;
            }
        }
        stream_dp(a, DpRows::Bf16(w), out, inp)
    } else {
        // SAFETY: as the caller guarantees.
        unsafe { bf16_into_new(a, Src::Bf16Wt(Bf16W { w, out, inp })) }
    }
}

/// C = A·B as a new buffer on the bf16 kernel, over the pool.
///
/// # Safety
/// AVX512_BF16 must be available.
unsafe fn bf16_into_new(a: MatRef<'_>, b: Src<'_>) -> Vec<f32> {
    let (m, n) = (a.rows, b.cols());
    if m == 0 || n == 0 || a.cols == 0 {
        return vec![0f32; m * n];
    }
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: as the caller guarantees; c holds m · n floats.
    unsafe { bf16_on_pool(a, b, c.as_mut_ptr(), false) };
    // SAFETY: the units cover C, and the first K slice of each writes every element (k > 0).
    unsafe { c.set_len(m * n) };
    c
}

/// C = A·B (or C += A·B with `acc`) on the bf16 kernel, in units over candle's pool.
///
/// # Safety
/// AVX512_BF16 must be available and `c` must point to `a.rows · b.cols` floats.
unsafe fn bf16_on_pool(a: MatRef<'_>, b: Src<'_>, c: *mut f32, acc: bool) {
    let (m, n) = (a.rows, b.cols());
    // Asked on the calling thread (`amx::Off` is per thread), for every unit alike.
    let on_amx = amx::enabled();
    let units = Units::new(m, n, if on_amx { amx::TM } else { MR }, threads());
    let out = SyncPtr(c);
    let run = |range: std::ops::Range<usize>| {
        for u in range {
            let (rows, cols) = units.unit(u);
            // SAFETY: as the caller guarantees (AMX where `on_amx`); units write disjoint
            // blocks of C.
            unsafe {
                if on_amx {
                    amx::block(a, b, rows, cols, out.get(), n, acc)
                } else {
                    block_bf16(a, b, rows, cols, out.get(), n, acc)
                }
            };
        }
    };
    if units.count() == 1 {
        run(0..1);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(units.count(), run);
    }
}

thread_local! {
    /// Per-thread bf16 packing buffers for A and B.
    static PACK_BF16: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A bf16 pair of k: `lo` (even k) in the low half, `hi` in the high half, each rounded to
/// nearest even ([`round_bf16`]), as `vdpbf16ps` reads them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bf16_pair(lo: f32, hi: f32) -> u32 {
    (round_bf16(lo).to_bits() >> 16) | (round_bf16(hi).to_bits() & 0xFFFF_0000)
}

/// `out[q] = bf16_pair(x[2q], x[2q + 1])` for `q < x.len() / 2` (a contiguous run along k),
/// 16 pairs a time with `vcvtne2ps2bf16` (nearest even; it reads a denormal as zero, as
/// `vdpbf16ps` does anyway).
///
/// # Safety
/// AVX512_BF16 must be available; `out` at least `x.len() / 2` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pairs_of_run(x: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    let full = x.len() / 32 * 32;
    for p in (0..full).step_by(32) {
        // SAFETY: p + 32 <= x.len(); out holds (p + 32) / 2 u32s.
        unsafe {
            let v0 = _mm512_loadu_ps(x.as_ptr().add(p));
            let v1 = _mm512_loadu_ps(x.as_ptr().add(p + 16));
            let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(v1, v0));
            _mm512_storeu_si512(out.as_mut_ptr().add(p / 2).cast(), h);
        }
    }
    for q in full / 2..x.len() / 2 {
        out[q] = bf16_pair(x[2 * q], x[2 * q + 1]);
    }
}

/// `out[j] = bf16_pair(r0[j], r1[j])` for `j < r0.len()` (two rows along k), 16 a time.
///
/// # Safety
/// AVX512_BF16 and AVX512BW must be available; `r1` and `out` at least as long as `r0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs_of_rows(r0: &[f32], r1: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    let n = r0.len();
    assert!(r1.len() >= n && out.len() >= n);
    // Interleaves the two halves' u16s: r0's j-th beside r1's j-th.
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let full = n / 16 * 16;
    for j in (0..full).step_by(16) {
        // SAFETY: j + 16 <= n for r0, r1 and out.
        unsafe {
            let a = _mm512_loadu_ps(r0.as_ptr().add(j));
            let b = _mm512_loadu_ps(r1.as_ptr().add(j));
            let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
            let h = _mm512_permutexvar_epi16(idx, h);
            _mm512_storeu_si512(out.as_mut_ptr().add(j).cast(), h);
        }
    }
    for j in full..n {
        out[j] = bf16_pair(r0[j], r1[j]);
    }
}

/// Packs `kc` rows (k) × `nr` columns of an operand whose rows are contiguous slices
/// (`row(p)`, at least `nr` long) as pairs of k: `dst[pp · width + j]` holds rows 2pp and
/// 2pp + 1 of column j; zero past `nr` (to `width`) and past `kc`.
///
/// # Safety
/// `dst` must hold `kc.div_ceil(2) · width` u32s.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_pairs_by_rows<'a>(
    dst: *mut u32,
    width: usize,
    kc: usize,
    nr: usize,
    row: impl Fn(usize) -> &'a [f32],
) {
    for pp in 0..kc.div_ceil(2) {
        // SAFETY: row pp of `width` u32s lies inside `dst`.
        let d = unsafe { std::slice::from_raw_parts_mut(dst.add(pp * width), width) };
        let r0 = &row(2 * pp)[..nr];
        if 2 * pp + 1 < kc {
            let r1 = &row(2 * pp + 1)[..nr];
            // SAFETY: the bf16 kernel's callers checked AVX512_BF16 (and so AVX512BW).
            unsafe { pairs_of_rows(r0, r1, d) };
        } else {
            for (d, &x) in d.iter_mut().zip(r0) {
                *d = bf16_pair(x, 0.0);
            }
        }
        d[nr..].fill(0);
    }
}

/// [`pack_pairs_by_rows`] for an operand whose columns are contiguous runs along k:
/// `col(j, p)` is column j from row p on, at least `min(kc - p, run)` long, where `run`
/// (even) is how far a run reaches (a weight's panel: `NR`; `kc` where the column is whole).
///
/// # Safety
/// As for [`pack_pairs_by_rows`].
#[cfg(target_arch = "x86_64")]
unsafe fn pack_pairs_by_cols<'a>(
    dst: *mut u32,
    width: usize,
    kc: usize,
    nr: usize,
    run: usize,
    col: impl Fn(usize, usize) -> &'a [f32],
) {
    let kp = kc.div_ceil(2);
    debug_assert!(kp <= KC_BF16 / 2);
    let mut pairs = [0u32; KC_BF16 / 2];
    for j in 0..nr {
        let mut p0 = 0;
        while p0 < kc {
            let len = run.min(kc - p0);
            let c = &col(j, p0)[..len];
            // SAFETY: the bf16 kernel's callers checked AVX512_BF16.
            unsafe { pairs_of_run(c, &mut pairs[p0 / 2..]) };
            if len % 2 == 1 {
                pairs[(p0 + len) / 2] = bf16_pair(c[len - 1], 0.0);
            }
            p0 += len;
        }
        for (q, &v) in pairs[..kp].iter().enumerate() {
            // SAFETY: q < kp rows of `width` u32s, j < width.
            unsafe { *dst.add(q * width + j) = v };
        }
    }
    for pp in 0..kp {
        for j in nr..width {
            // SAFETY: as above.
            unsafe { *dst.add(pp * width + j) = 0 };
        }
    }
}

/// [`pack_pairs_by_rows`] for any strides: element (p, j) read through `x`.
///
/// # Safety
/// As for [`pack_pairs_by_rows`].
#[cfg(target_arch = "x86_64")]
unsafe fn pack_pairs_at(
    dst: *mut u32,
    width: usize,
    kc: usize,
    nr: usize,
    x: impl Fn(usize, usize) -> f32,
) {
    for pp in 0..kc.div_ceil(2) {
        for j in 0..width {
            let (lo, hi) = match j < nr {
                true if 2 * pp + 1 < kc => (x(2 * pp, j), x(2 * pp + 1, j)),
                true => (x(2 * pp, j), 0.0),
                false => (0.0, 0.0),
            };
            // SAFETY: pp < kc / 2 rounded up rows of `width` u32s.
            unsafe { *dst.add(pp * width + j) = bf16_pair(lo, hi) };
        }
    }
}

/// Packs rows `k0..k0 + kc` × columns `c0..c0 + nr` of `b` as pairs of k for the bf16 kernel
/// (`NR` wide).
///
/// # Safety
/// `dst` must hold `kc.div_ceil(2) · NR` u32s; the block must lie inside B; for a weight's
/// panels `c0` is a multiple of `NR` (W) or `k0` a multiple of `NR` (Wᵀ).
#[cfg(target_arch = "x86_64")]
unsafe fn pack_b_bf16(b: Src<'_>, k0: usize, kc: usize, c0: usize, nr: usize, dst: *mut u32) {
    // SAFETY: as the caller guarantees.
    unsafe {
        match b {
            Src::Mat(m) if m.cs == 1 => {
                pack_pairs_by_rows(dst, NR, kc, nr, |p| &m.data[(k0 + p) * m.rs + c0..])
            }
            Src::Mat(m) if m.rs == 1 => pack_pairs_by_cols(dst, NR, kc, nr, kc, |j, p| {
                &m.data[(c0 + j) * m.cs + k0 + p..]
            }),
            Src::Mat(m) => pack_pairs_at(dst, NR, kc, nr, |p, j| {
                m.data[(k0 + p) * m.rs + (c0 + j) * m.cs]
            }),
            Src::W(w) => {
                let f = w.floats();
                pack_pairs_by_rows(dst, NR, kc, nr, |p| &f[w.at(k0 + p, c0)..])
            }
            Src::Wt(w) => {
                let f = w.floats();
                pack_pairs_by_cols(dst, NR, kc, nr, NR, |j, p| &f[w.at(c0 + j, k0 + p)..])
            }
            Src::Bf16Wt(w) if w.inp % 2 == 0 && nr == NR => {
                // W's rows are runs of u32 pairs (inp even): 16 × 16 blocks of them transposed
                // in registers (a pair moves as one 32-bit lane), the tail one at a time.
                let (kp, full) = (kc.div_ceil(2), kc / 32 * 16);
                let row = |j: usize| w.w.as_ptr().add((c0 + j) * w.inp + k0).cast::<f32>();
                for jb in (0..NR).step_by(16) {
                    for qb in (0..full).step_by(16) {
                        transpose16(row(jb).add(qb), w.inp / 2, dst.add(qb * NR + jb).cast(), NR);
                    }
                }
                for q in full..kp {
                    for j in 0..NR {
                        let r = &w.w[(c0 + j) * w.inp + k0 + 2 * q..];
                        let hi = if 2 * q + 1 < kc { r[1] } else { 0 };
                        *dst.add(q * NR + j) = u32::from(r[0]) | (u32::from(hi) << 16);
                    }
                }
            }
            Src::Bf16Wt(w) => pack_bf16_rows_as_pairs(dst, NR, kc, nr, |j| {
                &w.w[(c0 + j) * w.inp + k0..(c0 + j + 1) * w.inp]
            }),
            Src::Bf16W(w) => {
                // Rows k0 + 2pp and k0 + 2pp + 1 of W, interleaved value by value.
                for pp in 0..kc.div_ceil(2) {
                    let r0 = &w.w[(k0 + 2 * pp) * w.inp + c0..][..nr];
                    let d = std::slice::from_raw_parts_mut(dst.add(pp * NR), NR);
                    if 2 * pp + 1 < kc {
                        let r1 = &w.w[(k0 + 2 * pp + 1) * w.inp + c0..][..nr];
                        for ((d, &lo), &hi) in d.iter_mut().zip(r0).zip(r1) {
                            *d = u32::from(lo) | (u32::from(hi) << 16);
                        }
                    } else {
                        for (d, &lo) in d.iter_mut().zip(r0) {
                            *d = u32::from(lo);
                        }
                    }
                    d[nr..].fill(0);
                }
            }
        }
    }
}

/// Packs rows `r0..r0 + mr` × columns `k0..k0 + kc` of A as pairs of k for the bf16 kernel
/// (`MR` wide).
///
/// # Safety
/// `dst` must hold `kc.div_ceil(2) · MR` u32s; the block must lie inside A.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_a_bf16(a: MatRef<'_>, r0: usize, mr: usize, k0: usize, kc: usize, dst: *mut u32) {
    // SAFETY: as the caller guarantees.
    unsafe {
        if a.cs == 1 && mr == MR {
            // A whole tile of rows along k: each row's pairs made in a run, then 16 × 16 blocks
            // transposed in registers into the tile's MR-wide rows. A block's row writes 16
            // lanes, two past MR: the next row's write (or the next block's, or the tail's,
            // or the next tile's, packed after this one) covers them, and `block_bf16`'s
            // buffer has room past its last tile.
            const ROW: usize = KC_BF16 / 2;
            let kp = kc.div_ceil(2);
            let mut tmp = [0u32; 16 * ROW];
            for i in 0..MR {
                let x = &a.data[(r0 + i) * a.rs + k0..][..kc];
                let row = &mut tmp[i * ROW..(i + 1) * ROW];
                pairs_of_run(x, row);
                if kc % 2 == 1 {
                    row[kc / 2] = bf16_pair(x[kc - 1], 0.0);
                }
            }
            let full = kp / 16 * 16;
            for qb in (0..full).step_by(16) {
                transpose16(
                    tmp.as_ptr().add(qb).cast(),
                    ROW,
                    dst.add(qb * MR).cast(),
                    MR,
                );
            }
            for q in full..kp {
                for i in 0..MR {
                    *dst.add(q * MR + i) = tmp[i * ROW + q];
                }
            }
        } else if a.cs == 1 {
            pack_pairs_by_cols(dst, MR, kc, mr, kc, |i, p| {
                &a.data[(r0 + i) * a.rs + k0 + p..]
            })
        } else if a.rs == 1 {
            pack_pairs_by_rows(dst, MR, kc, mr, |p| &a.data[(k0 + p) * a.cs + r0..])
        } else {
            pack_pairs_at(dst, MR, kc, mr, |p, i| {
                a.data[(r0 + i) * a.rs + (k0 + p) * a.cs]
            })
        }
    }
}

/// One `rows × cols` block of C (row stride `ldc`), all of K, on the bf16 kernel; with `acc`
/// the product is added to what C holds.
///
/// # Safety
/// AVX512_BF16 must be available, and `c` must point to a buffer holding the whole of C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block_bf16(
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
    PACK_BF16.with_borrow_mut(|(pa, pb)| {
        // Two bf16 per f32 slot of the line buffers.
        // (16 floats of room past the last tile: `pack_a_bf16`'s transposes write two lanes
        // past a tile row.)
        let pa: *mut u16 = lines(pa, MC_TILES * MR * KC_BF16 / 2 + 16).cast();
        let pb: *mut u16 = lines(pb, n_tiles * NR * KC_BF16 / 2).cast();
        let mut k0 = 0;
        while k0 < k {
            let kc = KC_BF16.min(k - k0);
            let kp = kc.div_ceil(2);
            for t in 0..n_tiles {
                let c0 = cols.start + t * NR;
                let nr = NR.min(cols.end - c0);
                pack_b_bf16(b, k0, kc, c0, nr, pb.add(t * NR * 2 * kp).cast());
            }
            let accumulate = acc || k0 > 0;
            let mut m0 = rows.start;
            while m0 < rows.end {
                let mb = (MC_TILES * MR).min(rows.end - m0);
                let m_tiles = mb.div_ceil(MR);
                for t in 0..m_tiles {
                    let r0 = m0 + t * MR;
                    let mr = MR.min(m0 + mb - r0);
                    pack_a_bf16(a, r0, mr, k0, kc, pa.add(t * MR * 2 * kp).cast());
                }
                for tj in 0..n_tiles {
                    let c0 = cols.start + tj * NR;
                    let nr = NR.min(cols.end - c0);
                    for ti in 0..m_tiles {
                        let r0 = m0 + ti * MR;
                        let mr = MR.min(m0 + mb - r0);
                        let ap = pa.add(ti * MR * 2 * kp);
                        let bp = pb.add(tj * NR * 2 * kp);
                        let cp = c.add(r0 * ldc + c0);
                        if mr == MR && nr == NR {
                            kernel_bf16(kp, ap, bp, cp, ldc, accumulate);
                        } else {
                            let mut tile = [Line([0.0; 16]); MR * NR / 16];
                            let tp: *mut f32 = tile.as_mut_ptr().cast();
                            kernel_bf16(kp, ap, bp, tp, NR, false);
                            write_edge(tp, cp, ldc, mr, nr, accumulate);
                        }
                    }
                }
                m0 += mb;
            }
            k0 += kc;
        }
    });
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_bf16(
    _: MatRef<'_>,
    _: Src<'_>,
    _: std::ops::Range<usize>,
    _: std::ops::Range<usize>,
    _: *mut f32,
    _: usize,
    _: bool,
) {
    unreachable!("the bf16 kernel runs on x86_64 only")
}

/// C[MR × NR] (+)= A panel · B panel over `kp` pairs of k, in bf16 with f32 sums.
///
/// # Safety
/// AVX512_BF16 must be available; `a` holds `kp × MR × 2` bf16, `b` `kp × NR × 2`, and `c`
/// an `MR × NR` tile with row stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_bf16(kp: usize, a: *const u16, b: *const u16, c: *mut f32, ldc: usize, acc: bool) {
    use std::arch::x86_64::*;
    let mut t = [[_mm512_setzero_ps(); 2]; MR];
    // SAFETY: the caller guarantees the sizes read and written here.
    unsafe {
        for pp in 0..kp {
            let bp = b.add(pp * NR * 2);
            let b0 = std::ptr::read_unaligned(bp.cast::<__m512bh>());
            let b1 = std::ptr::read_unaligned(bp.add(32).cast::<__m512bh>());
            let ap = a.add(pp * MR * 2).cast::<i32>();
            for (i, row) in t.iter_mut().enumerate() {
                let pair = std::ptr::read_unaligned(ap.add(i));
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        store_tile(&t, c, ldc, acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;

    pub(super) fn naive(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f64> {
        let mut c = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0f64;
                for p in 0..a.cols {
                    s += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                }
                c[i * b.cols + j] = s;
            }
        }
        c
    }

    #[test]
    fn bf16_product_matches_the_f32_product_of_rounded_operands() {
        if !bf16_available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| round_bf16(x)).collect() };
        for &(m, k, n) in &[
            (1, 1, 1),
            (15, 7, 33),
            (113, 513, 70),
            (30, 1030, 257),
            (230, 1030, 40),
        ] {
            let (av, bv) = (values(m * k, 3), values(k * n, 4));
            let (ar, br) = (round(&av), round(&bv));
            for tb in [false, true] {
                let view = |d| {
                    if tb {
                        MatRef::new(d, n, k, k, 1).t()
                    } else {
                        MatRef::new(d, k, n, n, 1)
                    }
                };
                let a = MatRef::new(&av, m, k, k, 1);
                let got = matmul_bf16(a, view(&bv)).expect("avx512bf16 is available");
                let want = naive(MatRef::new(&ar, m, k, k, 1), view(&br));
                for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "({m},{k},{n}) tb={tb} at {idx}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn batched_products_match_one_by_one() {
        if !available() {
            return;
        }
        let (batch, m, k, n) = (5, 19, 40, 23);
        let (av, bv) = (values(batch * m * k, 5), values(batch * n * k, 6));
        // A row-major per item; B = (n × k per item)ᵀ, as q·kᵀ reads k.
        let a = MatRef::new(&av, m, k, k, 1);
        let b = MatRef::new(&bv, n, k, k, 1).t();
        let got = batched_matmul(a, m * k, b, n * k, batch).expect("avx512f");
        for i in 0..batch {
            let ai = MatRef::new(&av[i * m * k..], m, k, k, 1);
            let bi = MatRef::new(&bv[i * n * k..], n, k, k, 1).t();
            let want = naive(ai, bi);
            for (g, w) in got[i * m * n..(i + 1) * m * n].iter().zip(&want) {
                assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "item {i}");
            }
        }
    }

    /// The streaming path for few rows against a transposed row-major W, at every tile edge:
    /// one or two vectors of rows, full tiles and leftover rows of W, several units.
    #[test]
    fn streams_few_rows_against_a_transposed_weight() {
        if !available() {
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 15),
            (16, 64, 70),
            (17, 33, 200),
            (32, 9, 9),
        ] {
            let (av, wv) = (values(m * k, 7), values(n * k, 8));
            let a = MatRef::new(&av, m, k, k, 1);
            let b = MatRef::new(&wv, n, k, k, 1).t();
            let got = stream(a, b);
            let want = naive(a, b);
            for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{m}x{k}x{n}: element {idx}: {g} against {w}"
                );
            }
        }
    }

    #[test]
    fn transposes_a_16_by_16_block() {
        if !available() {
            return;
        }
        let src: Vec<f32> = (0..20 * 16).map(|v| v as f32).collect();
        let mut dst = vec![0f32; 16 * 24];
        // SAFETY: AVX-512F is available; 16 rows of stride 20 and 24 lie inside the buffers.
        unsafe { transpose16(src.as_ptr().add(2), 20, dst.as_mut_ptr(), 24) };
        for r in 0..16 {
            for c in 0..16 {
                assert_eq!(dst[c * 24 + r], src[r * 20 + 2 + c], "row {r} column {c}");
            }
        }
    }

    /// `pack_a` on row-major A (the register transpose) against the element-wise packing:
    /// full and ragged row counts, K with and without a tail, both tile heights.
    #[test]
    fn packs_row_major_a_as_the_elementwise_loop_does() {
        if !available() {
            return;
        }
        fn check<const R: usize>() {
            let (rows, cols) = (40, 70);
            let av = values(rows * cols, 9);
            let a = MatRef::new(&av, rows, cols, cols, 1);
            for &(r0, mr, k0, kc) in &[
                (0, R, 0, 64),
                (3, R - 3, 5, 37),
                (20, 1, 2, 16),
                (26, R, 1, 9),
            ] {
                let mut got = vec![f32::NAN; R * kc];
                // SAFETY: AVX-512F is available; `got` holds R × kc floats.
                unsafe { pack_a::<R>(a, r0, mr, k0, kc, got.as_mut_ptr()) };
                for p in 0..kc {
                    for i in 0..R {
                        let want = if i < mr {
                            av[(r0 + i) * cols + k0 + p]
                        } else {
                            0.0
                        };
                        assert_eq!(
                            got[p * R + i],
                            want,
                            "R {R}: rows {r0}+{mr}, k {k0}+{kc}: ({i}, {p})"
                        );
                    }
                }
            }
        }
        check::<MR>();
        check::<MR_SMALL>();
    }

    #[test]
    fn matches_a_naive_product_for_every_layout_and_ragged_shape() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F, callers use candle's matmul");
            return;
        }
        // Shapes that cross every tile and block edge: MR 14 (8 below 65 rows), NR 32, KC 256,
        // 224-row A blocks, 512-column slabs.
        for &(m, k, n) in &[
            (1, 1, 1),
            (13, 7, 31),
            (14, 256, 32),
            (15, 257, 33),
            (113, 300, 257),
            (230, 520, 70),
            (240, 70, 1100),
            (900, 40, 300),
        ] {
            let av = values(m * k, 1);
            let bv = values(k * n, 2);
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if ta {
                    MatRef::new(&av, k, m, m, 1).t()
                } else {
                    MatRef::new(&av, m, k, k, 1)
                };
                let b = if tb {
                    MatRef::new(&bv, n, k, k, 1).t()
                } else {
                    MatRef::new(&bv, k, n, n, 1)
                };
                let got = matmul(a, b).expect("avx512f is available");
                let want = naive(a, b);
                for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "({m},{k},{n}) ta={ta} tb={tb} at {idx}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn products_with_a_weight_kept_as_panels_match_the_row_major_weight() {
        if !available() {
            return;
        }
        // (rows of x, out, in): ragged panels and K slices, few rows (8-row tiles), the
        // per-panel hand-out (65..=896 rows, 4+ panels) and the slab units past it.
        for &(m, out, inp) in &[
            (1, 1, 1),
            (13, 31, 33),
            (70, 64, 300),
            (188, 576, 96),
            (150, 192, 100),
            (240, 1100, 70),
            (900, 300, 40),
        ] {
            let wv = values(out * inp, 5);
            let p = Panels::new(&wv, out, inp);
            assert_eq!(p.to_row_major(), wv, "({out},{inp}): round trip");
            assert_eq!(p.get(out - 1, inp - 1), wv[out * inp - 1]);
            let w = MatRef::new(&wv, out, inp, inp, 1);
            let (xv, gv) = (values(m * inp, 6), values(m * out, 7));
            let (x, g) = (
                MatRef::new(&xv, m, inp, inp, 1),
                MatRef::new(&gv, m, out, out, 1),
            );
            let check = |what: &str, got: &[f32], want: &[f64]| {
                for (idx, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{what} ({m},{out},{inp}) at {idx}: {g} vs {w}"
                    );
                }
            };
            let fwd = matmul_wt(x, &p).unwrap();
            check("x·Wᵀ", &fwd, &naive(x, w.t()));
            let bwd = matmul_w(g, &p).unwrap();
            check("g·W", &bwd, &naive(g, w));
            if m > STREAM_M {
                // The same packed panels reach the same kernel: the same bits.
                assert_eq!(
                    fwd,
                    matmul(x, w.t()).unwrap(),
                    "x·Wᵀ bits ({m},{out},{inp})"
                );
                assert_eq!(bwd, matmul(g, w).unwrap(), "g·W bits ({m},{out},{inp})");
            }
            let mut acc = values(m * out, 8);
            let want: Vec<f64> = naive(x, w.t())
                .iter()
                .zip(&acc)
                .map(|(p, c)| p + *c as f64)
                .collect();
            assert!(matmul_wt_acc(x, &p, &mut acc));
            check("C + x·Wᵀ", &acc, &want);
            let mut acc = values(m * inp, 9);
            let want: Vec<f64> = naive(g, w)
                .iter()
                .zip(&acc)
                .map(|(p, c)| p + *c as f64)
                .collect();
            assert!(matmul_w_acc(g, &p, &mut acc));
            check("C + g·W", &acc, &want);
        }
    }

    #[test]
    fn serial_product_writes_or_adds_into_a_strided_destination() {
        // Both the kernel (where the CPU has AVX-512F) and the plain loop, over tile edges.
        for &(m, k, n) in &[(1, 1, 1), (13, 64, 31), (40, 64, 40), (70, 300, 33)] {
            let av = values(m * k, 3);
            let bv = values(n * k, 4);
            let a = MatRef::new(&av, m, k, k, 1);
            let b = MatRef::new(&bv, n, k, k, 1).t();
            let want = naive(a, b);
            let ldc = n + 5;
            let base = values(m * ldc, 5);
            for acc in [false, true] {
                let mut via_kernel = base.clone();
                let mut via_loop = base.clone();
                // SAFETY: both buffers hold m rows of stride ldc; one thread.
                unsafe {
                    matmul_into(a, b, via_kernel.as_mut_ptr(), ldc, acc);
                    matmul_loop(a, b, via_loop.as_mut_ptr(), ldc, acc);
                }
                for i in 0..m {
                    for j in 0..ldc {
                        let idx = i * ldc + j;
                        let w = if j >= n {
                            base[idx] as f64
                        } else {
                            want[i * n + j] + if acc { base[idx] as f64 } else { 0.0 }
                        };
                        for (name, got) in [("kernel", &via_kernel), ("loop", &via_loop)] {
                            assert!(
                                (got[idx] as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                "{name} ({m},{k},{n}) acc={acc} at ({i},{j}): {} vs {w}",
                                got[idx]
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod bf16_weight_tests {
    use super::*;
    use crate::test_util::values;

    /// C = A·Wᵀ in f64 with W rounded to bf16: the reference both paths must meet.
    fn reference(a: &[f32], m: usize, w: &[half::bf16], n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * w[j * k + p].to_f64())
                    .sum();
            }
        }
        c
    }

    pub(super) fn assert_close(what: &str, got: &[f32], want: &[f64], k: usize) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
            // Only the summation order differs: a few f32 roundings per term, at most.
            let tol = 1e-5 * (k as f64).sqrt() * r.abs().max(1.0);
            assert!(
                (g as f64 - r).abs() <= tol,
                "{what}: element {i}: {g} vs {r}"
            );
        }
    }

    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 1, 1),
        (1, 576, 1536),
        (8, 576, 200),
        (16, 37, 65),
        (17, 64, 130),
        (32, 1536, 100),
        (40, 577, 300),
    ];

    #[test]
    fn bf16_weight_products_match_the_f32_product_of_the_rounded_weight() {
        for &(m, k, n) in &SHAPES {
            let a = values(m * k, 5);
            let w: Vec<half::bf16> = values(n * k, 6)
                .iter()
                .map(|&x| half::bf16::from_f32(x))
                .collect();
            let want = reference(&a, m, &w, n, k);
            let am = MatRef::new(&a, m, k, k, 1);
            let what = format!("({m}, {k}, {n})");
            // The dispatching entry (AVX-512F here where the CPU has it) and the portable
            // fallback, forced.
            assert_close(&what, &matmul_wt_bf16(am, &w, n, k), &want, k);
            assert_close(&what, &matmul_wt_bf16_portable(am, &w, n, k), &want, k);
            // A strided (transposed) A reaches the same products.
            let at: Vec<f32> = (0..k * m).map(|q| a[(q % m) * k + q / m]).collect();
            let atm = MatRef::new(&at, k, m, m, 1).t();
            assert_close(&what, &matmul_wt_bf16(atm, &w, n, k), &want, k);
            assert_close(&what, &matmul_wt_bf16_portable(atm, &w, n, k), &want, k);
        }
    }
}
