//! LoRA on the Llama family: with B = 0 an adapted model computes its base's logits bit for bit; the
//! hand-written backward's gradients of every A and B element match central finite differences in
//! f64 (and autograd of the composed forward), with no gradient computed for a frozen base
//! parameter; the split backward (zero-bubble pipelines) gives the whole one's bits.

mod support;

use candle_core::{DType, Device, Tensor};
use ferrospeed::engine::{blockwise, Batch, Model};
use ferrospeed_models::llama::{Head, LlamaLora};
use ferrospeed_models::ops::lora::{resolve_targets, LoraShape};
use ferrospeed_models::{Llama, LlamaConfig};
use support::fd::{analytic, at, autograd, loss, random_params, slots, specs, Owned};

fn base() -> LlamaConfig {
    LlamaConfig::tiny(2, 8, 4, 2, 11, 5)
}

fn lora(cfg: &LlamaConfig, targets: &[&str], rslora: bool) -> Llama {
    let targets = resolve_targets(cfg.n_layer, &targets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    Llama::with_lora(*cfg, LlamaLora { shape: LoraShape { r: 2, alpha: 3.0, rslora }, targets }).unwrap()
}

/// The adapted models under test: every projection, some of them, with biases, tied and rsLoRA.
fn models() -> Vec<(&'static str, Model)> {
    let c = base();
    vec![
        ("all-linear", lora(&c, &["all-linear"], false).model().unwrap()),
        ("q,v of layer 1 + mlp", lora(&c, &["model.layers.1.self_attn.q_proj", "model.layers.*.self_attn.v_proj", "*.mlp.*"], false).model().unwrap()),
        ("k,o, biases, tied", lora(&LlamaConfig { attention_bias: true, o_proj_bias: true, mlp_bias: true, tie_word_embeddings: true, ..c }, &["k_proj", "o_proj", "down_proj"], true).model().unwrap()),
    ]
}

fn batch() -> Batch {
    let tokens = Tensor::new(&[[1u32, 4, 9, 2, 7], [3, 3, 10, 0, 5]], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[[4u32, 9, 2, 7, 1], [3, 10, 0, 5, 6]], &Device::Cpu).unwrap();
    Batch::tokens(tokens, targets)
}

/// Logits `[b·t, vocab]` of a model from slot tensors, through the blocks' own (fused) forwards.
fn logits(model: &Model, cfg: LlamaConfig, params: &[Vec<Tensor>], batch: &Batch) -> Vec<u32> {
    let mut x: Vec<Tensor> = Vec::new();
    for (i, p) in params.iter().enumerate().take(model.num_blocks() - 1) {
        x = model.block(i).forward(p, &x, batch).unwrap();
    }
    let last = params.last().unwrap();
    let l = Head::new(cfg).logits(last, &x[0]).unwrap();
    l.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// f32 slot tensors of a model whose every parameter has the value its name has in `values`.
fn named_slots(model: &Model, values: &std::collections::HashMap<String, Vec<f32>>) -> Vec<Vec<Tensor>> {
    (0..model.num_blocks())
        .map(|i| {
            model
                .slots(i)
                .iter()
                .map(|&src| {
                    let spec = model.spec(src);
                    let v = &values[&format!("{}.{}", model.block_names()[src.block], spec.name)];
                    Tensor::from_slice(v, spec.shape.as_slice(), &Device::Cpu).unwrap()
                })
                .collect()
        })
        .collect()
}

#[test]
fn with_b_zero_the_logits_are_the_base_models_bit_for_bit() {
    for (cfg, targets) in [(base(), vec!["all-linear"]), (LlamaConfig { attention_bias: true, mlp_bias: true, tie_word_embeddings: true, ..base() }, vec!["q_proj", "up_proj"])] {
        let plain = Llama::new(cfg).model().unwrap();
        let adapted = lora(&cfg, &targets, false).model().unwrap();
        // The base's values (f32) by name; A random, B zero (PEFT's start).
        let mut rng = ferrospeed::rng::Rng::new(5);
        let mut values = std::collections::HashMap::new();
        for i in 0..adapted.num_blocks() {
            for spec in specs(&adapted, i) {
                let zero = spec.name.contains("lora_B");
                let v: Vec<f32> = (0..spec.numel()).map(|_| if zero { 0.0 } else { (0.3 * rng.normal()) as f32 }).collect();
                values.insert(format!("{}.{}", adapted.block_names()[i], spec.name), v);
            }
        }
        assert!(adapted.num_params() > 0 && adapted.has_frozen() && adapted.num_frozen_params() == plain.num_params());
        let batch = batch();
        let want = logits(&plain, cfg, &named_slots(&plain, &values), &batch);
        let got = logits(&adapted, cfg, &named_slots(&adapted, &values), &batch);
        assert_eq!(got, want, "{targets:?}: B = 0 changes the logits");
        let l = |m: &Model| blockwise::forward(m, &mut &named_slots(m, &values)[..], &batch, true).unwrap().loss.to_scalar::<f32>().unwrap().to_bits();
        assert_eq!(l(&adapted), l(&plain), "{targets:?}: B = 0 changes the loss");
    }
}

#[test]
fn every_adapter_element_matches_finite_differences_and_the_base_gets_no_gradient() {
    for (name, model) in models() {
        let owned = random_params(&model);
        let batch = batch();
        // `analytic` asserts that no gradient is handed over for a frozen slot.
        let an = analytic(&model, &owned, &batch, true);
        assert_eq!(an, analytic(&model, &owned, &batch, false), "{name}: checkpointing changes the gradients");
        let auto = autograd(&model, &owned, &batch);
        let eps = 1e-5;
        let mut checked = 0;
        for b in 0..model.num_blocks() {
            for (p, spec) in model.own_params(b).iter().enumerate() {
                assert!(spec.name.contains(".lora_"), "{name}: {} is trainable", spec.name);
                for e in 0..spec.numel() {
                    let shifted = |d: f64| {
                        let mut o: Owned = owned.clone();
                        o[b][p][e] += d;
                        loss(&model, &o, &batch)
                    };
                    let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
                    let g = an[b][p][e];
                    assert!((fd - g).abs() <= 1e-7 + 1e-5 * fd.abs(), "{name} {}.{}[{e}]: analytic {g:e} vs finite difference {fd:e}", model.block(b).name(), spec.name);
                    assert!((auto[b][p][e] - g).abs() <= 1e-9 + 1e-9 * g.abs(), "{name} {}.{}[{e}]: autograd {:e} vs hand-written {g:e}", model.block(b).name(), spec.name, auto[b][p][e]);
                    checked += 1;
                }
            }
        }
        assert!(checked >= 100, "{name}: {checked} elements");
    }
}

#[test]
fn the_split_backward_of_an_adapted_layer_equals_the_whole_one_bit_for_bit() {
    use ferrospeed::engine::Upstream;
    for (name, model) in models() {
        let owned = random_params(&model);
        let params = slots(&model, &owned, None);
        let batch = batch();
        let x = model.block(0).forward(&params[0], &[], &batch).unwrap();
        let g = (x[0].ones_like().unwrap() * 0.5).unwrap();
        let block = model.block(1);
        let run = |split: bool| -> Vec<Vec<f64>> {
            let (_, saved) = block.forward_saving(&params[1], &x, &batch).unwrap().unwrap();
            let grads = if split {
                let (work, _) = block.backward_split(&params[1], saved, Upstream::Grads(&[Some(g.clone())])).unwrap();
                assert!(work.is_deferred(), "{name}: the adapters' weight work is deferred");
                work.compute().unwrap()
            } else {
                block.backward(&params[1], saved, Upstream::Grads(&[Some(g.clone())])).unwrap().0
            };
            for (s, gr) in model.slots(1).iter().zip(&grads) {
                assert_eq!(gr.is_some(), !s.frozen, "{name}: slot {} of {}", at(&model, *s), block.name());
            }
            grads.into_iter().flatten().map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap()).collect()
        };
        let (whole, split) = (run(false), run(true));
        let b = |v: &Vec<Vec<f64>>| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(b(&whole), b(&split), "{name}");
    }
}

#[test]
fn bad_targets_and_ranks_are_refused() {
    let e = resolve_targets(2, &["q_porj".to_string()]).unwrap_err();
    assert!(e.contains("\"q_porj\" matches no module") && e.contains("self_attn.q_proj"), "{e}");
    let c = base();
    let targets = resolve_targets(2, &["all-linear".into()]).unwrap();
    assert!(Llama::with_lora(c, LlamaLora { shape: LoraShape { r: 0, alpha: 1.0, rslora: false }, targets: targets.clone() }).is_err());
    assert!(Llama::with_lora(c, LlamaLora { shape: LoraShape { r: 2, alpha: 1.0, rslora: false }, targets: targets[..1].to_vec() }).is_err());
}
