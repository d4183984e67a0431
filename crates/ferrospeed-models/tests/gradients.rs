//! The block-wise backward of each model family against central finite differences, in f64, on tiny
//! models: every parameter of every block (through the whole chain of blocks, tied embedding included),
//! and the input gradient of every block, both through autograd of the composed forward and from the
//! blocks' hand-written backward. Llama runs with and without grouped K/V heads, tied and untied,
//! with q/k/v biases and with Llama 3's rope scaling. The split backward (zero-bubble pipelines)
//! defers every block's parameter work and gives the whole backward's gradients bit for bit.

mod support;

use candle_core::{Device, Tensor, Var};
use ferrospeed::engine::{Batch, Model, Upstream};
use ferrospeed::rng::Rng;
use support::fd::{analytic, loss, random_params, randn_f64, slots, weighted_sum};
use ferrospeed_models::ops::rope::Llama3Scaling;
use ferrospeed_models::{Gpt, GptConfig, Llama, LlamaConfig};

const CFG: GptConfig = GptConfig { n_layer: 2, n_head: 2, d_model: 8, seq_len: 5, vocab_size: 11 };

/// The models under test with their width: GPT, and Llama in the variants whose code paths differ.
fn models() -> Vec<(String, Model, usize)> {
    let base = LlamaConfig::tiny(2, 8, 4, 2, 11, 5);
    let scaling = Llama3Scaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 4 };
    let llamas = [
        ("llama gqa untied", base),
        ("llama mha tied", LlamaConfig { n_kv_head: 4, tie_word_embeddings: true, ..base }),
        ("llama gqa 4:1 bias", LlamaConfig { n_kv_head: 1, attention_bias: true, ..base }),
        ("llama all biases", LlamaConfig { attention_bias: true, o_proj_bias: true, mlp_bias: true, ..base }),
        ("llama rope scaling", LlamaConfig { rope_scaling: Some(scaling), rope_theta: 100.0, ..base }),
    ];
    let mut out = vec![("gpt".to_string(), Gpt::new(CFG).model().unwrap(), CFG.d_model)];
    out.extend(llamas.into_iter().map(|(name, cfg)| (name.to_string(), Llama::new(cfg).model().unwrap(), cfg.d_model)));
    out
}

fn batch() -> Batch {
    let tokens = Tensor::new(&[[1u32, 4, 9, 2, 7], [3, 3, 10, 0, 5]], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[[4u32, 9, 2, 7, 1], [3, 10, 0, 5, 6]], &Device::Cpu).unwrap();
    Batch::tokens(tokens, targets)
}

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    for (name, model, _) in models() {
        every_parameter_gradient(&name, &model);
    }
}

fn every_parameter_gradient(family: &str, model: &Model) {
    let owned = random_params(&model);
    let batch = batch();
    let with_ckpt = analytic(&model, &owned, &batch, true);
    let without = analytic(&model, &owned, &batch, false);
    assert_eq!(with_ckpt, without, "checkpointing must not change gradients at all");
    let eps = 1e-5;
    let mut checked = 0;
    for b in 0..model.num_blocks() {
        for (p, spec) in model.own_params(b).iter().enumerate() {
            // A spread of elements of every parameter (all of the small ones).
            let n = spec.numel();
            let picks: Vec<usize> = if n <= 12 { (0..n).collect() } else { (0..12).map(|k| (k * 7919 + 3) % n).collect() };
            for e in picks {
                let mut plus = owned.clone();
                plus[b][p][e] += eps;
                let mut minus = owned.clone();
                minus[b][p][e] -= eps;
                let fd = (loss(&model, &plus, &batch) - loss(&model, &minus, &batch)) / (2.0 * eps);
                let an = with_ckpt[b][p][e];
                assert!(
                    (fd - an).abs() <= 1e-7 + 1e-5 * fd.abs(),
                    "{family} block {} {}[{e}]: analytic {an:e} vs finite difference {fd:e}",
                    model.block(b).name(),
                    spec.name
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "{family}: checked {checked} elements");
}

#[test]
fn every_block_input_gradient_matches_finite_differences() {
    // For each transformer layer and the head, d(sum(y · r))/dx against finite differences of x,
    // with autograd on the composed forward (what a block without its own backward relies on).
    for (name, model, d) in models() {
        every_block_input_gradient(&name, &model, d);
    }
}

fn every_block_input_gradient(family: &str, model: &Model, d: usize) {
    let owned = random_params(model);
    let batch = batch();
    let params = slots(model, &owned, None);
    let mut rng = Rng::new(7);
    let x0: Vec<f64> = (0..2 * 5 * d).map(|_| rng.normal()).collect();
    for b in 1..model.num_blocks() {
        let block = model.block(b);
        let out_numel = if b + 1 == model.num_blocks() { 1 } else { x0.len() };
        let r: Vec<f64> = (0..out_numel).map(|_| rng.normal()).collect();
        let objective = |x: &[f64]| -> f64 {
            let xt = Tensor::from_slice(x, (2, 5, d), &Device::Cpu).unwrap();
            let y: Vec<f64> = block.forward(&params[b], &[xt], &batch).unwrap()[0].flatten_all().unwrap().to_vec1().unwrap();
            y.iter().zip(&r).map(|(a, b)| a * b).sum()
        };
        let xv = Var::from_slice(&x0, (2, 5, d), &Device::Cpu).unwrap();
        let y = block.forward(&params[b], &[xv.as_tensor().clone()], &batch).unwrap().remove(0);
        let rt = Tensor::from_slice(&r, y.shape(), &Device::Cpu).unwrap();
        let grads = (y * rt).unwrap().sum_all().unwrap().backward().unwrap();
        let an: Vec<f64> = grads.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for e in (0..x0.len()).step_by(5) {
            let (mut plus, mut minus) = (x0.clone(), x0.clone());
            plus[e] += 1e-5;
            minus[e] -= 1e-5;
            let fd = (objective(&plus) - objective(&minus)) / 2e-5;
            assert!((fd - an[e]).abs() <= 1e-7 + 1e-5 * fd.abs(), "{family} block {} x[{e}]: {} vs {fd}", block.name(), an[e]);
        }
    }
}

#[test]
fn every_hand_written_input_gradient_matches_finite_differences() {
    // The blocks' own backward, which the engine runs: for each layer d(sum(y · r))/dx, for the head
    // d(loss)/dx, at every element of x, against finite differences of the same (fused) forward.
    for (name, model, d) in models() {
        every_hand_written_input_gradient(&name, &model, d);
    }
}

fn every_hand_written_input_gradient(family: &str, model: &Model, d: usize) {
    let owned = random_params(model);
    let batch = batch();
    let params = slots(model, &owned, None);
    let shape = (2, 5, d);
    let mut rng = Rng::new(8);
    let x0: Vec<f64> = (0..2 * 5 * d).map(|_| rng.normal()).collect();
    let mut checked = 0;
    for b in 1..model.num_blocks() {
        let block = model.block(b);
        let head = b + 1 == model.num_blocks();
        let r = randn_f64(&mut rng, shape);
        // The head's output is the loss itself; a layer's is weighted by r.
        let objective = |y: &Tensor| weighted_sum(y, (!head).then_some(&r));
        let forward = |x: &[f64]| block.forward(&params[b], &[Tensor::from_slice(x, shape, &Device::Cpu).unwrap()], &batch).unwrap().remove(0);
        let x = Tensor::from_slice(&x0, shape, &Device::Cpu).unwrap();
        let (mut y, saved) = block.forward_saving(&params[b], &[x.clone()], &batch).unwrap().unwrap_or_else(|| panic!("block {} has no hand-written backward", block.name()));
        let y = y.remove(0);
        // The composed forward (chosen when the input is a variable) computes the same output.
        let composed = block.forward(&params[b], &[Var::from_tensor(&x).unwrap().as_tensor().clone()], &batch).unwrap().remove(0);
        let (yv, cv): (Vec<f64>, Vec<f64>) = (y.flatten_all().unwrap().to_vec1().unwrap(), composed.flatten_all().unwrap().to_vec1().unwrap());
        assert_eq!(yv.len(), cv.len(), "block {}", block.name());
        for (i, (a, c)) in yv.iter().zip(&cv).enumerate() {
            assert!((a - c).abs() <= 1e-12 * (1.0 + c.abs()), "{family} block {} y[{i}]: hand-written {a} vs composed {c}", block.name());
        }
        let r_grads = [Some(r.clone())];
        let upstream = if head { Upstream::Loss(1.0) } else { Upstream::Grads(&r_grads) };
        let (_, dx) = block.backward(&params[b], saved, upstream).unwrap();
        let an: Vec<f64> = dx.into_iter().next().flatten().unwrap_or_else(|| panic!("block {} returned no input gradient", block.name())).flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(an.len(), x0.len(), "block {}", block.name());
        for e in 0..x0.len() {
            let (mut plus, mut minus) = (x0.clone(), x0.clone());
            plus[e] += 1e-5;
            minus[e] -= 1e-5;
            let fd = (objective(&forward(&plus)) - objective(&forward(&minus))) / 2e-5;
            assert!((fd - an[e]).abs() <= 1e-7 + 1e-5 * fd.abs(), "{family} block {} x[{e}]: hand-written {} vs finite difference {fd}", block.name(), an[e]);
            checked += 1;
        }
    }
    assert_eq!(checked, (model.num_blocks() - 1) * x0.len(), "{family}: every layer and the head, every element");
}

#[test]
fn every_split_backward_defers_the_weights_and_equals_the_whole_one_bit_for_bit() {
    let bits = |v: &[Option<Tensor>]| -> Vec<Option<Vec<u64>>> {
        v.iter().map(|t| t.as_ref().map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap().iter().map(|x| x.to_bits()).collect())).collect()
    };
    for (family, model, d) in models() {
        let owned = random_params(&model);
        let batch = batch();
        let params = slots(&model, &owned, None);
        let mut rng = Rng::new(9);
        let shape = (2, 5, d);
        for b in 0..model.num_blocks() {
            let block = model.block(b);
            let x: Vec<Tensor> = if b == 0 { Vec::new() } else { vec![randn_f64(&mut rng, shape)] };
            let r = [Some(randn_f64(&mut rng, shape))];
            let upstream = if b + 1 == model.num_blocks() { Upstream::Loss(0.5) } else { Upstream::Grads(&r) };
            let saved = || block.forward_saving(&params[b], &x, &batch).unwrap().unwrap().1;
            let (slots_whole, in_whole) = block.backward(&params[b], saved(), upstream).unwrap();
            let (work, in_split) = block.backward_split(&params[b], saved(), upstream).unwrap();
            assert!(work.is_deferred(), "{family} block {}: its parameter gradients were computed with its input gradient", block.name());
            assert_eq!(bits(&in_split), bits(&in_whole), "{family} block {}: input gradients", block.name());
            let slots_split = work.compute().unwrap();
            assert_eq!(bits(&slots_split), bits(&slots_whole), "{family} block {}: parameter gradients", block.name());
            assert!(slots_split.iter().all(Option::is_some), "{family} block {}", block.name());
        }
    }
}
