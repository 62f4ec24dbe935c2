//! The arithmetic of the CPU kernels on plain `f32` slices, row-major and contiguous.
//!
//! Hot loops are written so that LLVM vectorises them (no calls, no branches that depend on the
//! data except as selects) and are compiled twice: for AVX2 + FMA, chosen at run time when the
//! CPU has both, and for the target's baseline. Work is split over rayon's threads in blocks
//! whose boundaries do not depend on the thread count, and every sum over blocks is taken in block
//! order, so results are the same bit for bit from run to run.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Runs `$body` (a call of `#[inline(always)]` functions generic over `const FMA: bool`) compiled
/// with AVX2 + FMA when the CPU has them, and for the baseline target otherwise.
macro_rules! with_fma {
    (|$fma:ident| $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast<R>(f: impl FnOnce() -> R) -> R {
                    f()
                }
                const $fma: bool = true;
                // SAFETY: the features were detected just above.
                unsafe { fast(|| $body) }
            } else {
                const $fma: bool = false;
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            const $fma: bool = false;
            $body
        }
    }};
}

/// `a * b + c`, fused where the CPU has FMA (unfused, `mul_add` would be a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Elements per parallel task for element-wise work: large enough that a task costs more than
/// handing it to a thread.
const ELEMENTS_PER_TASK: usize = 1 << 15;

/// A fresh output of `len` elements, written by `write(task, chunk, item)` on rayon tasks of
/// `chunk` elements, each paired with the next item of `with` (a parallel iterator with as many
/// items as there are chunks). Each task zeroes its own chunk before writing it: `vec![0.0; len]`
/// would zero the whole buffer on the calling thread while the other cores wait.
fn par_new_with<T: Send>(
    len: usize,
    chunk: usize,
    with: impl IndexedParallelIterator<Item = T>,
    write: impl Fn(usize, &mut [f32], T) + Sync + Send,
) -> Vec<f32> {
    // A shorter `with` would leave chunks unwritten (`zip` stops at the shorter side).
    assert!(with.len() >= len.div_ceil(chunk), "par_new_with: fewer items than chunks");
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(chunk).zip(with).enumerate().for_each(|(i, (c, t))| write(i, zeroed(c), t));
    // SAFETY: each of the chunks covering the first `len` elements was zeroed by its task.
    unsafe { out.set_len(len) };
    out
}

/// [`par_new_with`] without a paired iterator.
fn par_new(len: usize, chunk: usize, write: impl Fn(usize, &mut [f32]) + Sync + Send) -> Vec<f32> {
    par_new_with(len, chunk, rayon::iter::repeat_n((), len.div_ceil(chunk)), |i, out, ()| write(i, out))
}

/// [`par_new`] for two outputs of the same length, chunked alike.
fn par_new2(len: usize, chunk: usize, write: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send) -> (Vec<f32>, Vec<f32>) {
    let mut second = Vec::with_capacity(len);
    let first = par_new_with(len, chunk, second.spare_capacity_mut()[..len].par_chunks_mut(chunk), |i, a, b| write(i, a, zeroed(b)));
    // SAFETY: as in `par_new_with`: its tasks zeroed every chunk of `second` too.
    unsafe { second.set_len(len) };
    (first, second)
}

fn zeroed(chunk: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    chunk.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just initialised, and `MaybeUninit<f32>` has the layout of `f32`.
    unsafe { &mut *(chunk as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// The `i`-th chunk of `chunk` elements of an input, `len` long (the matching output chunk's length).
fn part(x: &[f32], i: usize, chunk: usize, len: usize) -> &[f32] {
    &x[i * chunk..i * chunk + len]
}

/// `e^v` for `v` in [−87, 0] (results stay normal floats): `2^n · p(r)` with `v = n ln 2 + r`,
/// `|r| ≤ ln 2 / 2`, `p` the degree-7 Taylor polynomial (relative error below 1e-7).
#[inline(always)]
fn exp_nonpositive<const FMA: bool>(v: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let v = v.max(-87.0);
    // `n + 1.5·2^23`: its bits are 0x4B40_0000 + n, which gives 2^n below without a float-to-int
    // conversion (Rust's saturating `as` keeps such loops from vectorising).
    let shifted = v * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, v));
    let mut p = 1.0 / 5040.0;
    p = madd::<FMA>(p, r, 1.0 / 720.0);
    p = madd::<FMA>(p, r, 1.0 / 120.0);
    p = madd::<FMA>(p, r, 1.0 / 24.0);
    p = madd::<FMA>(p, r, 1.0 / 6.0);
    p = madd::<FMA>(p, r, 0.5);
    p = madd::<FMA>(p, r, 1.0);
    p = madd::<FMA>(p, r, 1.0);
    let scale = f32::from_bits(shifted.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    p * scale
}

/// `(Φ(x), φ(x))`: the standard normal CDF and density. Φ comes from erfc in the form of
/// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, the approximation PyTorch's
/// vectorised CPU erf also uses), taken on |x| so the lower tail has no cancellation.
#[inline(always)]
fn normal_cdf_pdf<const FMA: bool>(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152, 1.061_405_4];
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / madd::<FMA>(P, z, 1.0);
    let mut poly = A[4];
    poly = madd::<FMA>(poly, t, A[3]);
    poly = madd::<FMA>(poly, t, A[2]);
    poly = madd::<FMA>(poly, t, A[1]);
    poly = madd::<FMA>(poly, t, A[0]);
    poly *= t;
    let gauss = exp_nonpositive::<FMA>(-z * z); // e^{-x²/2}
    let upper = 0.5 * poly * gauss; // 1 − Φ(|x|)
    let cdf = if x >= 0.0 { 1.0 - upper } else { upper };
    (cdf, FRAC_1_SQRT_2PI * gauss)
}

#[inline(always)]
fn gelu_slice<const FMA: bool>(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * normal_cdf_pdf::<FMA>(x).0;
    }
}

#[inline(always)]
fn gelu_grad_slice<const FMA: bool>(x: &[f32], g: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let (cdf, pdf) = normal_cdf_pdf::<FMA>(x);
        *dx = g * madd::<FMA>(x, pdf, cdf);
    }
}

/// `(silu(g), sigmoid(g))`, the exponential taken of `−|g|` so it never overflows.
#[inline(always)]
fn silu_sigmoid<const FMA: bool>(g: f32) -> (f32, f32) {
    let e = exp_nonpositive::<FMA>(-g.abs());
    let inv = 1.0 / (1.0 + e);
    let sig = if g >= 0.0 { inv } else { e * inv };
    (g * sig, sig)
}

#[inline(always)]
fn swiglu_slice<const FMA: bool>(g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = silu_sigmoid::<FMA>(g).0 * u;
    }
}

#[inline(always)]
fn swiglu_grad_slice<const FMA: bool>(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
        let (silu, sig) = silu_sigmoid::<FMA>(g);
        // silu'(g) = σ(g) (1 + g (1 − σ(g))) = σ(g) + silu(g) (1 − σ(g))
        *dg = dy * u * madd::<FMA>(silu, 1.0 - sig, sig);
        *du = dy * silu;
    }
}

/// The SwiGLU product `silu(g) · u`, element-wise.
pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    par_new(g.len(), ELEMENTS_PER_TASK, |i, y| {
        let (g, u) = (part(g, i, ELEMENTS_PER_TASK, y.len()), part(u, i, ELEMENTS_PER_TASK, y.len()));
        with_fma!(|FMA| swiglu_slice::<FMA>(g, u, y))
    })
}

/// Gradients of [`swiglu`] from the output gradient `dy`: `(dy · u · silu'(g), dy · silu(g))`.
pub fn swiglu_grad(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    par_new2(g.len(), ELEMENTS_PER_TASK, |i, dg, du| {
        let [g, u, dy] = [g, u, dy].map(|t| part(t, i, ELEMENTS_PER_TASK, dg.len()));
        with_fma!(|FMA| swiglu_grad_slice::<FMA>(g, u, dy, dg, du))
    })
}

/// The scale of CLIP's quick GELU, `x · σ(1.702 x)`.
pub const QUICK_GELU_SCALE: f32 = 1.702;

#[inline(always)]
fn quick_gelu_slice<const FMA: bool>(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * silu_sigmoid::<FMA>(QUICK_GELU_SCALE * x).1;
    }
}

#[inline(always)]
fn quick_gelu_grad_slice<const FMA: bool>(x: &[f32], g: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        // d/dx x σ(a x) = σ + a x σ (1 − σ)
        let sig = silu_sigmoid::<FMA>(QUICK_GELU_SCALE * x).1;
        *dx = g * madd::<FMA>(QUICK_GELU_SCALE * x * sig, 1.0 - sig, sig);
    }
}

/// An element-wise activation whose backward step needs only its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact (erf) GELU, `x Φ(x)`; gradient `g (Φ(x) + x φ(x))`.
    Gelu,
    /// CLIP's quick GELU, `x σ(1.702 x)`; gradient `g (σ + 1.702 x σ (1 − σ))`.
    QuickGelu,
}

impl Activation {
    pub fn forward(self, x: &[f32]) -> Vec<f32> {
        par_new(x.len(), ELEMENTS_PER_TASK, |i, y| {
            let x = part(x, i, ELEMENTS_PER_TASK, y.len());
            with_fma!(|FMA| match self {
                Self::Gelu => gelu_slice::<FMA>(x, y),
                Self::QuickGelu => quick_gelu_slice::<FMA>(x, y),
            })
        })
    }

    /// The input gradient from the output gradient `g`.
    pub fn backward(self, x: &[f32], g: &[f32]) -> Vec<f32> {
        par_new(x.len(), ELEMENTS_PER_TASK, |i, dx| {
            let (x, g) = (part(x, i, ELEMENTS_PER_TASK, dx.len()), part(g, i, ELEMENTS_PER_TASK, dx.len()));
            with_fma!(|FMA| match self {
                Self::Gelu => gelu_grad_slice::<FMA>(x, g, dx),
                Self::QuickGelu => quick_gelu_grad_slice::<FMA>(x, g, dx),
            })
        })
    }
}

/// Sum with eight running partial sums (so it vectorises), added in a fixed order.
#[inline(always)]
fn sum8(values: impl Iterator<Item = f32>) -> f32 {
    let mut acc = [0.0f32; 8];
    for (i, v) in values.enumerate() {
        acc[i % 8] += v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[inline(always)]
fn sum_slice(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    sum8(acc.into_iter()) + sum8(rest.iter().copied())
}

#[inline(always)]
fn sum_products(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = sum8(ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y));
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    sum8(acc.into_iter()) + rest
}

/// Rows per parallel task for row-wise work on rows of `len` elements.
fn rows_per_task(len: usize) -> usize {
    (ELEMENTS_PER_TASK / len.max(1)).max(1)
}

/// LayerNorm over rows of `c` elements: `y = (x − mean) · rstd · weight + bias` with
/// `rstd = 1 / sqrt(var + eps)` (biased variance). Returns `y` and each row's mean and rstd.
pub fn layer_norm(x: &[f32], c: usize, weight: &[f32], bias: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let mut stats = vec![(0.0f32, 0.0f32); rows];
    let block = rows_per_task(c);
    let y = par_new_with(x.len(), block * c, stats.par_chunks_mut(block), |n, y, stats| {
        let x = part(x, n, block * c, y.len());
        with_fma!(|FMA| {
            for ((y, x), stat) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(stats.iter_mut()) {
                let mean = sum_slice(x) / c as f32;
                let var = sum8(x.iter().map(|&v| (v - mean) * (v - mean))) / c as f32;
                let rstd = 1.0 / (var + eps).sqrt();
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(weight).zip(bias) {
                    *y = madd::<FMA>((x - mean) * rstd, w, b);
                }
                *stat = (mean, rstd);
            }
        })
    });
    let (mean, rstd) = stats.into_iter().unzip();
    (y, mean, rstd)
}

/// Gradients of [`layer_norm`]: `(dx, dweight, dbias)` from the output gradient `g`.
pub fn layer_norm_grad(x: &[f32], g: &[f32], c: usize, weight: &[f32], mean: &[f32], rstd: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let block = rows_per_task(c);
    let blocks = rows.div_ceil(block);
    // Per block: Σ g·x̂ (dweight) then Σ g (dbias), summed over blocks in order below.
    let mut partial = vec![0.0f32; blocks * 2 * c];
    let dx = par_new_with(x.len(), block * c, partial.par_chunks_mut(2 * c), |b, dx, partial| {
        let r0 = b * block;
        let (dw, db) = partial.split_at_mut(c);
        let mut gy = vec![0.0f32; c];
        let mut xhat = vec![0.0f32; c];
        with_fma!(|FMA| {
            for (i, dx) in dx.chunks_exact_mut(c).enumerate() {
                let r = r0 + i;
                let (x, g) = (&x[r * c..(r + 1) * c], &g[r * c..(r + 1) * c]);
                let (m, s) = (mean[r], rstd[r]);
                for k in 0..c {
                    xhat[k] = (x[k] - m) * s;
                    gy[k] = g[k] * weight[k];
                    dw[k] = madd::<FMA>(g[k], xhat[k], dw[k]);
                    db[k] += g[k];
                }
                let mean_gy = sum_slice(&gy) / c as f32;
                let mean_gy_xhat = sum_products(&gy, &xhat) / c as f32;
                for k in 0..c {
                    dx[k] = s * (gy[k] - mean_gy - xhat[k] * mean_gy_xhat);
                }
            }
        })
    });
    let (mut dweight, mut dbias) = (vec![0.0f32; c], vec![0.0f32; c]);
    for p in partial.chunks_exact(2 * c) {
        for k in 0..c {
            dweight[k] += p[k];
            dbias[k] += p[c + k];
        }
    }
    (dx, dweight, dbias)
}

/// Geometry of a stride-1 depthwise convolution on a channels-last map `[n, h, w, c]` with a
/// square `k×k` kernel and `pad` zeros on each side (ConvNeXt: k = 7, pad = 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depthwise {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    pub pad: usize,
}

impl Depthwise {
    pub fn out_h(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.k
    }

    pub fn out_w(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.k
    }

    /// Output columns `j` for which input column `j + dx − pad` exists.
    fn columns(&self, dx: usize, out_w: usize, in_w: usize) -> std::ops::Range<usize> {
        let lo = self.pad.saturating_sub(dx).min(out_w);
        let hi = (in_w + self.pad).saturating_sub(dx).min(out_w);
        lo..hi.max(lo)
    }
}

/// PyTorch's depthwise weight `[c, 1, k, k]` → taps `[k, k, c]`, channel innermost; `flip`
/// turns the kernel by 180° (the input gradient is the correlation with the turned kernel).
pub fn depthwise_taps(weight: &[f32], c: usize, k: usize, flip: bool) -> Vec<f32> {
    let mut taps = vec![0.0; k * k * c];
    for ch in 0..c {
        for y in 0..k {
            for x in 0..k {
                let (ty, tx) = if flip { (k - 1 - y, k - 1 - x) } else { (y, x) };
                taps[(ty * k + tx) * c + ch] = weight[ch * k * k + y * k + x];
            }
        }
    }
    taps
}

/// A channels-last map `[n, h, w, c]` read by [`depthwise_row`].
struct Map<'a> {
    data: &'a [f32],
    h: usize,
    w: usize,
}

/// Output row `i` of image `n` of a channels-last depthwise correlation: `out[j, c] +=
/// Σ in[i+dy−pad, j+dx−pad, c] · taps[dy, dx, c]` over the taps whose input row exists.
#[inline(always)]
fn depthwise_row<const FMA: bool>(geo: &Depthwise, input: &Map, taps: &[f32], (n, i): (usize, usize), out: &mut [f32]) {
    let (c, k, pad) = (geo.c, geo.k, geo.pad);
    let (in_h, in_w, input) = (input.h, input.w, input.data);
    let out_w = out.len() / c;
    for dy in 0..k {
        let Some(r) = (i + dy).checked_sub(pad).filter(|&r| r < in_h) else { continue };
        let row = &input[(n * in_h + r) * in_w * c..(n * in_h + r + 1) * in_w * c];
        for dx in 0..k {
            let tap = &taps[(dy * k + dx) * c..(dy * k + dx + 1) * c];
            let cols = geo.columns(dx, out_w, in_w);
            if cols.is_empty() {
                continue;
            }
            let src = &row[(cols.start + dx - pad) * c..(cols.end + dx - pad) * c];
            for (o, s) in out[cols.start * c..cols.end * c].chunks_exact_mut(c).zip(src.chunks_exact(c)) {
                for ch in 0..c {
                    o[ch] = madd::<FMA>(s[ch], tap[ch], o[ch]);
                }
            }
        }
    }
}

/// Forward: `[n, h, w, c]` → `[n, out_h, out_w, c]`, plus `bias[c]`.
pub fn depthwise_forward(geo: &Depthwise, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let taps = depthwise_taps(weight, geo.c, geo.k, false);
    let (oh, ow, c) = (geo.out_h(), geo.out_w(), geo.c);
    par_new(geo.n * oh * ow * c, ow * c, |row, out| {
        if let Some(bias) = bias {
            for o in out.chunks_exact_mut(c) {
                o.copy_from_slice(bias);
            }
        }
        let input = Map { data: x, h: geo.h, w: geo.w };
        with_fma!(|FMA| depthwise_row::<FMA>(geo, &input, &taps, (row / oh, row % oh), out));
    })
}

/// Input gradient: the output gradient correlated with the turned kernel (padding `k − 1 − pad`).
pub fn depthwise_input_grad(geo: &Depthwise, g: &[f32], weight: &[f32]) -> Vec<f32> {
    let taps = depthwise_taps(weight, geo.c, geo.k, true);
    let (oh, ow, c) = (geo.out_h(), geo.out_w(), geo.c);
    let back = Depthwise { n: geo.n, h: oh, w: ow, c, k: geo.k, pad: geo.k - 1 - geo.pad };
    par_new(geo.n * geo.h * geo.w * c, geo.w * c, |row, dx| {
        let input = Map { data: g, h: oh, w: ow };
        with_fma!(|FMA| depthwise_row::<FMA>(&back, &input, &taps, (row / geo.h, row % geo.h), dx));
    })
}

/// Weight and bias gradients: `dweight[c, 1, k, k]`, `dbias[c]`.
pub fn depthwise_weight_grad(geo: &Depthwise, x: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (oh, ow, c, k, pad) = (geo.out_h(), geo.out_w(), geo.c, geo.k, geo.pad);
    let rows = geo.n * oh;
    // A fixed number of output rows per block keeps the sums independent of the thread count.
    let block = 4;
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            // Taps [k, k, c] then the bias [c].
            let mut acc = vec![0.0f32; (k * k + 1) * c];
            with_fma!(|FMA| {
                for row in b * block..((b + 1) * block).min(rows) {
                    let (n, i) = (row / oh, row % oh);
                    let grow = &g[row * ow * c..(row + 1) * ow * c];
                    let (taps, db) = acc.split_at_mut(k * k * c);
                    for p in grow.chunks_exact(c) {
                        for ch in 0..c {
                            db[ch] += p[ch];
                        }
                    }
                    for dy in 0..k {
                        let Some(r) = (i + dy).checked_sub(pad).filter(|&r| r < geo.h) else { continue };
                        let xrow = &x[(n * geo.h + r) * geo.w * c..(n * geo.h + r + 1) * geo.w * c];
                        for dx in 0..k {
                            let tap = &mut taps[(dy * k + dx) * c..(dy * k + dx + 1) * c];
                            let cols = geo.columns(dx, ow, geo.w);
                            if cols.is_empty() {
                                continue;
                            }
                            let src = &xrow[(cols.start + dx - pad) * c..(cols.end + dx - pad) * c];
                            for (gp, s) in grow[cols.start * c..cols.end * c].chunks_exact(c).zip(src.chunks_exact(c)) {
                                for ch in 0..c {
                                    tap[ch] = madd::<FMA>(gp[ch], s[ch], tap[ch]);
                                }
                            }
                        }
                    }
                }
            });
            acc
        })
        .collect();
    let mut total = vec![0.0f32; (k * k + 1) * c];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    let mut dweight = vec![0.0; c * k * k];
    for ch in 0..c {
        for t in 0..k * k {
            dweight[ch * k * k + t] = total[t * c + ch];
        }
    }
    (dweight, total[k * k * c..].to_vec())
}

/// `[n, h, w, c]` → `[n, h/r, w/r, c·r·r]` where output channel `(ch·r + dy)·r + dx` holds input
/// `(i·r + dy, j·r + dx, ch)`: the patch order of PyTorch's conv weight `[out, in, r, r]`, so an
/// `r×r` stride-`r` convolution is this followed by a product with the weight as `[out, in·r·r]`.
pub fn space_to_depth(x: &[f32], n: usize, h: usize, w: usize, c: usize, r: usize) -> Vec<f32> {
    let (oh, ow, oc) = (h / r, w / r, c * r * r);
    par_new(n * oh * ow * oc, ow * oc, |row, out| {
        let (b, i) = (row / oh, row % oh);
        for dy in 0..r {
            let src = &x[((b * h) + i * r + dy) * w * c..((b * h) + i * r + dy + 1) * w * c];
            for (j, patch) in out.chunks_exact_mut(oc).enumerate() {
                for dx in 0..r {
                    let pixel = &src[(j * r + dx) * c..(j * r + dx + 1) * c];
                    for (ch, &v) in pixel.iter().enumerate() {
                        patch[(ch * r + dy) * r + dx] = v;
                    }
                }
            }
        }
    })
}

/// The inverse of [`space_to_depth`] (its gradient): `[n, h/r, w/r, c·r·r]` → `[n, h, w, c]`.
pub fn depth_to_space(y: &[f32], n: usize, h: usize, w: usize, c: usize, r: usize) -> Vec<f32> {
    let (oh, ow, oc) = (h / r, w / r, c * r * r);
    par_new(n * h * w * c, w * c, |row, dst| {
        let (b, yy) = (row / h, row % h);
        let (i, dy) = (yy / r, yy % r);
        let src = &y[(b * oh + i) * ow * oc..(b * oh + i + 1) * ow * oc];
        for (xx, pixel) in dst.chunks_exact_mut(c).enumerate() {
            let (j, dx) = (xx / r, xx % r);
            let patch = &src[j * oc..(j + 1) * oc];
            for (ch, v) in pixel.iter_mut().enumerate() {
                *v = patch[(ch * r + dy) * r + dx];
            }
        }
    })
}

/// Batched transpose: `n` matrices `[rows, cols]` → `[cols, rows]` (NCHW ↔ NHWC with
/// `rows, cols` = `c, h·w` or `h·w, c`), in cache-sized tiles.
pub fn transpose(x: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    debug_assert_eq!(x.len(), n * rows * cols);
    let mut out = vec![0.0; x.len()];
    // Each task writes the output rows `c0..c0 + TILE` of one matrix.
    let chunk = TILE * rows;
    out.par_chunks_mut(rows * cols).zip(x.par_chunks(rows * cols)).for_each(|(dst, src)| {
        dst.par_chunks_mut(chunk).enumerate().for_each(|(t, dst)| {
            let c0 = t * TILE;
            let width = TILE.min(cols - c0);
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let line = &src[r * cols + c0..r * cols + c0 + width];
                    for (k, &v) in line.iter().enumerate() {
                        dst[k * rows + r] = v;
                    }
                }
            }
        });
    });
    out
}

/// Shape of a RoPE call: the projection output `[b, t, heads·hd]`, and `table_rows` rows of the
/// `[table_rows, t, hd]` cos/sin tables (1, or one per batch row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rope {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub hd: usize,
    pub table_rows: usize,
}

impl Rope {
    /// Offset of the cos/sin row for batch row `bi`, position `ti`.
    fn table(&self, bi: usize, ti: usize) -> usize {
        let row = if self.table_rows == 1 { 0 } else { bi };
        (row * self.t + ti) * self.hd
    }
}

/// RoPE in `rotate_half` form with the head split: `x` `[b, t, heads·hd]` → `[b, heads, t, hd]`,
/// `y = x·cos + rotate_half(x)·sin` with `rotate_half([u, v]) = [−v, u]` (the same products and
/// sum as the unfused ops, so the same values).
pub fn rope_heads(geo: &Rope, x: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let Rope { b, t, heads, hd, .. } = *geo;
    let half = hd / 2;
    // One task per (batch row, head): its `[t, hd]` output block.
    par_new(b * heads * t * hd, t * hd, |bh, out| {
        let (bi, h) = (bh / heads, bh % heads);
        for (ti, y) in out.chunks_exact_mut(hd).enumerate() {
            let src = &x[((bi * t + ti) * heads + h) * hd..][..hd];
            let at = geo.table(bi, ti);
            let (c, s) = (&cos[at..at + hd], &sin[at..at + hd]);
            let (y0, y1) = y.split_at_mut(half);
            let (u, v) = src.split_at(half);
            for i in 0..half {
                y0[i] = u[i] * c[i] + (-v[i]) * s[i];
                y1[i] = v[i] * c[half + i] + u[i] * s[half + i];
            }
        }
    })
}

/// The gradient of [`rope_heads`] with respect to `x`: `g` `[b, heads, t, hd]` → `[b, t, heads·hd]`,
/// `dx = g·cos + rotate_halfᵀ(g·sin)` with `rotate_halfᵀ([p, q]) = [q, −p]`.
pub fn rope_heads_grad(geo: &Rope, g: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let Rope { b, t, heads, hd, .. } = *geo;
    let half = hd / 2;
    // One task per (batch row, position): its `[heads·hd]` gradient row.
    par_new(b * t * heads * hd, heads * hd, |bt, dx| {
        let (bi, ti) = (bt / t, bt % t);
        let at = geo.table(bi, ti);
        let (c, s) = (&cos[at..at + hd], &sin[at..at + hd]);
        for (h, d) in dx.chunks_exact_mut(hd).enumerate() {
            let src = &g[((bi * heads + h) * t + ti) * hd..][..hd];
            let (p, q) = src.split_at(half);
            let (d0, d1) = d.split_at_mut(half);
            for i in 0..half {
                d0[i] = p[i] * c[i] + q[i] * s[half + i];
                d1[i] = q[i] * c[half + i] + -(p[i] * s[i]);
            }
        }
    })
}

/// One query chunk of the attention forward or backward pass: a `[rows, keys]` score tile whose rows are
/// `rows_per_batch` per batch row, query `row % queries` of the chunk in each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreTile {
    pub rows_per_batch: usize,
    pub queries: usize,
    pub keys: usize,
    /// Causal masking: query `i` of the chunk sees keys `0..=first + i`.
    pub causal_first: Option<usize>,
}

impl ScoreTile {
    /// Row `row`'s scores over the keys it may see by the causal limit, and their padding flags.
    fn row<'a>(&self, row: usize, scores: &'a [f32], padding: Option<(&'a [u8], usize)>) -> (&'a [f32], Option<&'a [u8]>) {
        let (b, i) = (row / self.rows_per_batch, row % self.queries);
        let limit = self.causal_first.map_or(self.keys, |first| (first + i + 1).min(self.keys));
        let pad = padding.map(|(flags, stride)| &flags[b * stride..b * stride + limit]);
        (&scores[row * self.keys..row * self.keys + limit], pad)
    }

    /// Rows per parallel task.
    fn rows_per_task(&self) -> usize {
        rows_per_task(self.keys)
    }
}

/// Writes `p = softmax(s)` over the keys whose padding flag is 0 (all when `pad` is `None`) into
/// the first `s.len()` elements of `p`, masked keys 0. Returns false, with those elements 0, when
/// the row sees no key. Each step is a plain loop over the row, so that it vectorises.
#[inline(always)]
fn softmax_row<const FMA: bool>(s: &[f32], pad: Option<&[u8]>, p: &mut [f32]) -> bool {
    let p = &mut p[..s.len()];
    let max = match pad {
        None => max_slice(s),
        Some(pad) => {
            // Masked scores count as −∞.
            for ((o, &v), &m) in p.iter_mut().zip(s).zip(pad) {
                *o = if m == 0 { v } else { f32::NEG_INFINITY };
            }
            max_slice(p)
        }
    };
    if max == f32::NEG_INFINITY {
        p.fill(0.0);
        return false;
    }
    // Taken of every score and then dropped where masked (a select); a masked score may exceed
    // the maximum, hence the clamp at 0.
    match pad {
        None => {
            for (o, &v) in p.iter_mut().zip(s) {
                *o = exp_nonpositive::<FMA>((v - max).min(0.0));
            }
        }
        Some(pad) => {
            for ((o, &v), &m) in p.iter_mut().zip(s).zip(pad) {
                let e = exp_nonpositive::<FMA>((v - max).min(0.0));
                *o = if m == 0 { e } else { 0.0 };
            }
        }
    }
    let sum = sum_slice(p);
    for v in p.iter_mut() {
        *v /= sum;
    }
    true
}

/// The largest element (−∞ for none), with eight running maxima so that it vectorises.
#[inline(always)]
fn max_slice(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    acc.into_iter().chain(rest.iter().copied()).fold(f32::NEG_INFINITY, |a, v| if v > a { v } else { a })
}

/// Probabilities `p = softmax(s)` over each row's visible keys: masked keys 0, and a row that sees
/// no key all 0 (as the unfused path's clamped softmax). `padding`: `[batch, stride]` flags,
/// nonzero where a key is padding.
pub fn attention_softmax(tile: &ScoreTile, scores: &[f32], padding: Option<(&[u8], usize)>) -> Vec<f32> {
    let (keys, block) = (tile.keys, tile.rows_per_task());
    par_new(scores.len(), block * keys, |n, p| {
        with_fma!(|FMA| {
            for (r, p) in p.chunks_exact_mut(keys).enumerate() {
                let (s, pad) = tile.row(n * block + r, scores, padding);
                softmax_row::<FMA>(s, pad, p);
            }
        })
    })
}

/// [`attention_softmax`] and the score gradient `ds = p · (dp − delta)` in one pass per row
/// (`delta`: one value per row).
pub fn attention_softmax_grad(tile: &ScoreTile, scores: &[f32], dprobs: &[f32], delta: &[f32], padding: Option<(&[u8], usize)>) -> (Vec<f32>, Vec<f32>) {
    let (keys, block) = (tile.keys, tile.rows_per_task());
    par_new2(scores.len(), block * keys, |n, p, ds| {
        with_fma!(|FMA| {
            for (r, (p, ds)) in p.chunks_exact_mut(keys).zip(ds.chunks_exact_mut(keys)).enumerate() {
                let row = n * block + r;
                let (s, pad) = tile.row(row, scores, padding);
                if softmax_row::<FMA>(s, pad, p) {
                    let (dp, d) = (&dprobs[row * keys..row * keys + s.len()], delta[row]);
                    for ((ds, &p), &dp) in ds.iter_mut().zip(p.iter()).zip(dp) {
                        *ds = p * (dp - d);
                    }
                }
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_outputs_cover_every_chunk_with_its_own_index() {
        // 10 elements in chunks of 3: the last chunk is short.
        let out = par_new(10, 3, |i, c| c.iter_mut().for_each(|v| *v += i as f32 + 1.0));
        assert_eq!(out, [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0]);
        let (a, b) = par_new2(5, 2, |i, a, b| {
            a.fill(i as f32);
            b.iter_mut().for_each(|v| *v -= i as f32);
        });
        assert_eq!((a, b), (vec![0.0, 0.0, 1.0, 1.0, 2.0], vec![0.0, 0.0, -1.0, -1.0, -2.0]));
        assert!(par_new(0, 4, |_, _| unreachable!("no chunk")).is_empty());
    }

    #[test]
    fn the_exponential_is_within_float_rounding_over_its_range() {
        for i in 0..=87_000 {
            let v = -(i as f32) / 1000.0;
            let want = (v as f64).exp();
            for got in [exp_nonpositive::<false>(v), with_fma!(|FMA| exp_nonpositive::<FMA>(v))] {
                let err = (got as f64 - want).abs() / want;
                assert!(err < 3e-7, "e^{v}: {got} against {want} (relative error {err:e})");
            }
        }
    }

    #[test]
    fn element_wise_kernels_split_over_many_tasks_equal_one_pass() {
        // Longer than three tasks, not a multiple of the task size.
        let n = 3 * ELEMENTS_PER_TASK + 123;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2001) as f32 / 200.0 - 5.0).collect();
        let g: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 997) as f32 / 500.0 - 1.0).collect();
        // One pass over everything, with the same instruction set as the tasks.
        let mut one = vec![f32::NAN; n];
        with_fma!(|FMA| quick_gelu_slice::<FMA>(&x, &mut one));
        assert_eq!(Activation::QuickGelu.forward(&x), one);
        with_fma!(|FMA| quick_gelu_grad_slice::<FMA>(&x, &g, &mut one));
        assert_eq!(Activation::QuickGelu.backward(&x, &g), one);
        let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        with_fma!(|FMA| swiglu_grad_slice::<FMA>(&x, &g, &x, &mut dg, &mut du));
        assert_eq!(swiglu_grad(&x, &g, &x), (dg, du));
    }
}
