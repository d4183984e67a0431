//! 4-bit NormalFloat (NF4) with double quantisation, QLoRA's storage of a frozen base (arXiv 2305.14314),
//! written as bitsandbytes writes it so that its tensors and ours are the same bytes: blocks of `blocksize`
//! (64) values scaled by their absmax to [-1, 1] and rounded to the nearest of the 16 NF4 code values (a
//! value on a midpoint goes down, `torch.bucketize`'s rule), two codes a byte, the first in the high nibble;
//! the blocks' absmax, less their mean (`offset`), quantised to 8 bits in blocks of 256 on bitsandbytes'
//! signed dynamic map. Dequantising multiplies each code value by its block's absmax (recovered as
//! `dynamic[q]·absmax2 + offset`) in f32. Our code: this is the format itself, and the reference the GPU
//! kernels are tested against; bitsandbytes is Python and CUDA (tests/nf4.rs compares with its output).

/// The 16 NF4 code values (bitsandbytes' `get_4bit_type("nf4")`: quantiles of N(0, 1), scaled to [-1, 1]).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The block of values that share an absmax (QLoRA's 64).
pub const BLOCK: usize = 64;
/// The block of absmax values that share a second-level scale.
pub const BLOCK2: usize = 256;

/// A tensor in NF4 with double quantisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4 {
    /// Number of values.
    pub len: usize,
    /// Two 4-bit codes a byte (`len.div_ceil(2)` bytes), the first value in the high nibble.
    pub packed: Vec<u8>,
    /// Each block's absmax less `offset`, as a code of [`dynamic_map`] (one byte a block).
    pub qabsmax: Vec<u8>,
    /// The absmax of each block of [`BLOCK2`] of those (f32).
    pub absmax2: Vec<f32>,
    /// The mean of the blocks' absmax.
    pub offset: f32,
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): for each exponent `e` in 0..7, the
/// midpoints of `2^e + 1` values evenly spaced over [0.1, 1] (f32), scaled by `10^(e − 6)`, with both
/// signs; then 0 and 1; sorted.
pub fn dynamic_map() -> [f32; 256] {
    let mut out: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let bounds = linspace_f32(0.1, 1.0, (1usize << i) + 1);
        // Python's `10 ** (i - 6)` (C's pow, correctly rounded: `powi` multiplies and is not), times a
        // float32 tensor: torch multiplies in f32.
        let scale = 10f64.powf(f64::from(i - 6)) as f32;
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        out.extend(means.iter().map(|m| scale * m));
        out.extend(means.iter().map(|m| -scale * m));
    }
    out.push(0.0);
    out.push(1.0);
    out.resize(256, 0.0);
    out.sort_by(f32::total_cmp);
    out.try_into().unwrap_or([0.0; 256])
}

/// `torch.linspace(start, end, n, dtype=float32)`: the first half stepped up from `start`, the rest
/// down from `end`, each a fused multiply-add of the f32 step, as its CPU kernel computes it.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) }).collect()
}

/// The index of the code value nearest `x` in the sorted `code`: the number of midpoints below `x`
/// (a value on a midpoint takes the lower code).
fn nearest(code: &[f32], mids: &[f32], x: f32) -> u8 {
    debug_assert_eq!(code.len(), mids.len() + 1);
    mids.partition_point(|&m| m < x) as u8
}

fn midpoints(code: &[f32]) -> Vec<f32> {
    code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// Blockwise absmax quantisation of `x` on `code`: each block's values scaled into [-1, 1] (a full block
/// multiplies by the reciprocal of its absmax, a partial last block divides by it, as bitsandbytes does)
/// and rounded to the nearest code. Returns the codes and each block's absmax.
fn blockwise(x: &[f32], code: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    use rayon::prelude::*;
    let mids = midpoints(code);
    let mut q = vec![0u8; x.len()];
    // Blocks are independent: quantised in parallel (a 70B base is 70 G values).
    let absmax = x
        .par_chunks(block)
        .zip(q.par_chunks_mut(block))
        .map(|(chunk, out)| {
            let am = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let am_safe = am.max(1e-38);
            let full = chunk.len() == block;
            let inv = 1.0 / am_safe;
            for (o, &v) in out.iter_mut().zip(chunk) {
                *o = nearest(code, &mids, (if full { v * inv } else { v / am_safe }).clamp(-1.0, 1.0));
            }
            am
        })
        .collect();
    (q, absmax)
}

/// Quantise `x` to NF4 in blocks of [`BLOCK`] with double quantisation. `offset` is the mean of the
/// blocks' absmax (summed in f64 and rounded: bitsandbytes takes torch's f32 mean, which can differ from
/// it in the last bit).
pub fn quantize(x: &[f32]) -> Nf4 {
    let (codes, absmax) = blockwise(x, &NF4, BLOCK);
    // An odd count is padded with a zero value, whose code is 0.0's (7), as bitsandbytes pads.
    let pad = nearest(&NF4, &midpoints(&NF4), 0.0);
    let packed = {
        use rayon::prelude::*;
        codes.par_chunks(2).map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(pad)).collect()
    };
    let offset = (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let (qabsmax, absmax2) = quantize_absmax(&absmax, offset);
    Nf4 { len: x.len(), packed, qabsmax, absmax2, offset }
}

/// The second level: the blocks' absmax less `offset` on the dynamic map in blocks of [`BLOCK2`], each
/// rounded to the nearest code (bitsandbytes' CUDA kernel and its torch implementation; its CPU kernel's
/// approximate search lands one code off the nearest for a few values near zero, where codes are 2e-5 apart).
pub fn quantize_absmax(absmax: &[f32], offset: f32) -> (Vec<u8>, Vec<f32>) {
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    blockwise(&centred, &dynamic_map(), BLOCK2)
}

/// The blocks' absmax back from the second level.
pub fn dequantize_absmax(q: &Nf4) -> Vec<f32> {
    let map = dynamic_map();
    q.qabsmax.iter().enumerate().map(|(i, &c)| map[c as usize] * q.absmax2[i / BLOCK2] + q.offset).collect()
}

/// Dequantise into `out` (`q.len` values, f32): `NF4[code] · absmax` of its block.
pub fn dequantize(q: &Nf4, out: &mut [f32]) {
    use rayon::prelude::*;
    let absmax = dequantize_absmax(q);
    out[..q.len].par_chunks_mut(BLOCK).enumerate().for_each(|(b, chunk)| {
        for (k, o) in chunk.iter_mut().enumerate() {
            let i = b * BLOCK + k;
            let byte = q.packed[i / 2];
            let code = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
            *o = NF4[code as usize] * absmax[b];
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_to_the_nearest_value_and_a_tie_goes_down() {
        let mids = midpoints(&NF4);
        for (k, &c) in NF4.iter().enumerate() {
            assert_eq!(nearest(&NF4, &mids, c) as usize, k);
        }
        assert_eq!(nearest(&NF4, &mids, mids[7]), 7, "on the midpoint between codes 7 and 8");
        assert_eq!(nearest(&NF4, &mids, f32::from_bits(mids[7].to_bits() + 1)), 8);
        let x: Vec<f32> = (0..200).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let q = quantize(&x);
        let mut y = vec![0f32; x.len()];
        dequantize(&q, &mut y);
        for (b, (xs, ys)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
            let am = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, r) in xs.iter().zip(ys) {
                assert!((a - r).abs() <= 0.2 * am + 0.02, "block {b}: {a} → {r}");
            }
        }
    }
}
