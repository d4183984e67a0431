//! GPU tests (feature `cuda`, run on a machine with a GPU: `bench/gpu_run.sh`): every fused kernel
//! and every GPT block's fused forward and hand-written backward on CUDA against the CPU reference,
//! in f32 (tight) and bf16 (loose). Without a GPU at run time each test says so and passes.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use ferrospeed::engine::{Batch, Upstream};
use ferrospeed::rng::Rng;
use ferrospeed_models::gpt::fused::*;
use ferrospeed_models::{Gpt, GptConfig};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no CUDA device ({e}): GPU test skipped");
            None
        }
    }
}

fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| (rng.normal() * std) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest |a − b| relative to the largest |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap().max(1e-30);
    diff / scale
}

/// `f` on CPU f32 inputs and on the same inputs on the GPU in `dtype`: each output's relative error.
fn compare(dtype: DType, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Vec<Tensor>) -> Vec<f64> {
    let dev = gpu().expect("checked by the caller");
    let on_gpu: Vec<Tensor> = inputs.iter().map(|t| if t.dtype() == DType::U32 { t.to_device(&dev).unwrap() } else { t.to_dtype(dtype).unwrap().to_device(&dev).unwrap() }).collect();
    let want = f(inputs);
    let got = f(&on_gpu);
    got.iter().zip(&want).map(|(g, w)| rel(g, w)).collect()
}

fn assert_close(what: &str, errs: &[f64], tol: f64) {
    eprintln!("{what}: relative errors {errs:?}");
    assert!(errs.iter().all(|&e| e <= tol), "{what}: relative errors {errs:?} exceed {tol}");
}

#[test]
fn fused_kernels_match_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let (n, d) = (300, 768);
    let (x, w, b, g, res) = (randn(&[n, d], 1, 1.0), randn(&[d], 2, 1.0), randn(&[d], 3, 1.0), randn(&[n, d], 4, 1.0), randn(&[n, d], 5, 1.0));
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let ln = |t: &[Tensor]| {
            let o = ln_forward(&t[0], &t[1], &t[2]).unwrap();
            let (dx, dw, db) = ln_backward(&t[3], &t[0], &t[1], &o.mean, &o.rstd, Some(&t[4])).unwrap();
            vec![o.y, o.mean, o.rstd, dx, dw, db]
        };
        assert_close(&format!("layer norm {dtype:?}"), &compare(dtype, &[x.clone(), w.clone(), b.clone(), g.clone(), res.clone()], ln), tol);
        let gelu = |t: &[Tensor]| {
            vec![
                bias_gelu(&t[0], &t[1]).unwrap(),
                bias_gelu_backward(&t[2], &t[0], &t[1]).unwrap(),
                col_sum(&t[2]).unwrap(),
                bias_add(&t[0], &t[1]).unwrap(),
                bias_residual(&t[2], &t[0], &t[1]).unwrap(),
            ]
        };
        assert_close(&format!("bias gelu, column sums, bias adds {dtype:?}"), &compare(dtype, &[x.clone(), b.clone(), g.clone()], gelu), tol);
        // Rows of 13 elements: not whole 16-byte vectors, the scalar kernel.
        let (x13, b13, g13) = (randn(&[7, 13], 11, 1.0), randn(&[13], 12, 1.0), randn(&[7, 13], 13, 1.0));
        assert_close(&format!("bias ops, odd rows {dtype:?}"), &compare(dtype, &[x13, b13, g13], gelu), tol);
        let (s, gs) = (randn(&[2, 3, 130, 130], 6, 2.0), randn(&[2, 3, 130, 130], 7, 1.0));
        let softmax = |t: &[Tensor]| {
            let y = causal_softmax_forward(&t[0], 0.3).unwrap();
            let dx = causal_softmax_backward(&y, &t[1], 0.3).unwrap();
            vec![y, dx]
        };
        assert_close(&format!("causal softmax {dtype:?}"), &compare(dtype, &[s, gs], softmax), tol);
        let logits = randn(&[64, 1000], 8, 3.0);
        let targets = Tensor::from_vec((0..64u32).map(|i| (i * 37) % 1000).collect::<Vec<_>>(), 64, &Device::Cpu).unwrap();
        let ce = |t: &[Tensor]| {
            let rows = cross_entropy_rows(&t[0], &t[1]).unwrap();
            let dx = cross_entropy_rows_backward(&t[0], &t[1], &rows.ones_like().unwrap().affine(0.5, 0.0).unwrap()).unwrap();
            vec![rows, dx]
        };
        assert_close(&format!("cross entropy {dtype:?}"), &compare(dtype, &[logits, targets], ce), tol);
    }
}

#[test]
fn gpt_blocks_forward_and_backward_match_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let cfg = GptConfig { n_layer: 1, n_head: 4, d_model: 128, seq_len: 96, vocab_size: 300 };
    let model = Gpt::new(cfg).model().unwrap();
    let tokens = Tensor::from_vec((0..2 * 96u32).map(|i| (i * 7) % 300).collect::<Vec<_>>(), (2, 96), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec((0..2 * 96u32).map(|i| (i * 11 + 3) % 300).collect::<Vec<_>>(), (2, 96), &Device::Cpu).unwrap();
    for (dtype, tol) in [(DType::F32, 2e-5), (DType::BF16, 5e-2)] {
        for i in 0..model.num_blocks() {
            let block = model.block(i);
            let params: Vec<Tensor> = model
                .slots(i)
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    let spec = &model.own_params(s.block)[s.index];
                    let base = randn(&spec.shape, (i * 100 + j) as u64, 0.2);
                    if spec.name.contains("ln") && spec.name.ends_with("weight") { base.affine(1.0, 1.0).unwrap() } else { base }
                })
                .collect();
            let x = (i > 0).then(|| randn(&[2, 96, 128], 77 + i as u64, 1.0));
            let g = randn(&[2, 96, 128], 99, 1.0);
            let last = i + 1 == model.num_blocks();
            let mut inputs = params.clone();
            inputs.extend([tokens.clone(), targets.clone(), g]);
            inputs.extend(x);
            let np = params.len();
            let run = |t: &[Tensor]| {
                let batch = Batch { tokens: t[np].clone(), targets: t[np + 1].clone() };
                let x = t.get(np + 3);
                let (y, saved) = block.forward_saving(&t[..np], x, &batch).unwrap().unwrap();
                let up = if last { Upstream::Loss(1.0) } else { Upstream::Grad(&t[np + 2]) };
                let (grads, dx) = block.backward(&t[..np], saved, up).unwrap();
                let mut out = vec![y];
                out.extend(grads.into_iter().flatten());
                out.extend(dx);
                out
            };
            assert_close(&format!("block {} {dtype:?}", block.name()), &compare(dtype, &inputs, run), tol);
        }
    }
}

#[test]
fn fused_attention_matches_the_cpu_reference_and_repeats_bitwise() {
    use ferrospeed_models::gpt::attention::{attention_backward, attention_forward, fused_attention_available};
    let Some(dev) = gpu() else { return };
    // Sequence lengths on and off the 64-row tile, every head dimension the kernels have.
    for (b, t, nh, hd) in [(2, 200, 3, 64), (1, 64, 2, 32), (1, 130, 2, 128), (2, 1024, 2, 64)] {
        for dtype in [DType::BF16, DType::F16] {
            let round = |x: Tensor| x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let qkv = round(randn(&[b * t, 3 * nh * hd], 1, 1.0));
            let dy = round(randn(&[b * t, nh * hd], 2, 1.0));
            let (gq, gdy) = (qkv.to_dtype(dtype).unwrap().to_device(&dev).unwrap(), dy.to_dtype(dtype).unwrap().to_device(&dev).unwrap());
            assert!(fused_attention_available(&gq, hd), "the kernels must run for {dtype:?}, hd {hd}");
            let got = attention_forward(&gq, b, t, nh).unwrap();
            let dq = attention_backward(&gq, &got.y, &got.lse, &gdy, b, t, nh).unwrap();
            // The reference on the GPU's (rounded) output, so that both backwards see the same y.
            let want = attention_forward(&qkv, b, t, nh).unwrap();
            let y_gpu = got.y.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            let want_dq = attention_backward(&qkv, &y_gpu, &want.lse, &dy, b, t, nh).unwrap();
            let errs = [rel(&got.y, &want.y), rel(&got.lse, &want.lse), rel(&dq, &want_dq)];
            assert_close(&format!("fused attention b{b} t{t} nh{nh} hd{hd} {dtype:?}"), &errs, 2e-2);
            let again = attention_backward(&gq, &got.y, &got.lse, &gdy, b, t, nh).unwrap();
            assert_eq!(rel(&again, &dq), 0.0, "the backward is not repeatable");
        }
    }
}
