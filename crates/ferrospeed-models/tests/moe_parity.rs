//! Mixture-of-experts and query/key-norm Llama-family models against HuggingFace transformers 5 on CPU,
//! from fixtures made by `fixtures/make_moe_fixtures.py`: tiny random Mixtral, Qwen2-MoE (a dense first
//! layer, a shared expert with its gate), Qwen3-MoE (`norm_topk_prob`, per-head q/k norms), OLMoE (q/k
//! norms over the projection) and Qwen3 (dense). With the weights in transformers 5's layout (experts
//! fused: `mlp.experts.gate_up_proj` `[E, 2f, d]`, `mlp.experts.down_proj` `[E, d, f]`), our blocks give
//! transformers' logits within 1e-5, its loss without and with the load-balancing loss
//! (`router_aux_loss_coef · aux_loss`) within 1e-5, and every parameter's gradient of each within 1e-4
//! of its largest element; `generate`'s forward with its key/value cache gives the same logits.

use candle_core::{Device, Tensor, Var};
use ferrospeed::checkpoint::WeightFiles;
use ferrospeed::engine::{Batch, Model};
use ferrospeed_models::hf::{read_config, HfModel};
use ferrospeed_models::llama::infer::LlamaInfer;
use ferrospeed_models::llama::{self, LlamaConfig};
use std::path::PathBuf;

mod support;

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moe").join(variant)
}

fn read_all(files: &mut WeightFiles, name: &str) -> Vec<f32> {
    let shape = files.info(name).unwrap_or_else(|| panic!("fixture has no {name}")).shape.clone();
    let mut v = vec![0f32; shape.iter().product()];
    files.read_f32(name, 0..v.len(), &mut v).unwrap();
    v
}

fn ids(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<u32>> = v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The variant's config, and its weights in transformers 5's layout (the fused file where the
/// fixture has one), as each block's slot tensors.
fn load(variant: &str, aux: bool) -> (LlamaConfig, Model, Vec<Vec<Tensor>>) {
    let dir = fixture(variant);
    let HfModel::Llama(mut cfg) = read_config(&dir, 8).unwrap() else { panic!("{variant} is not of the Llama family") };
    if let Some(m) = cfg.moe.as_mut() {
        m.aux_loss = aux;
    }
    let model = llama::Llama::new(cfg).model().unwrap();
    let fused = dir.join("model_fused.safetensors");
    let mut weights = llama::open_weights(if fused.exists() { &fused } else { &dir }).unwrap();
    let vars: Vec<Vec<Var>> = (0..model.num_blocks())
        .map(|b| {
            model.own_params(b).iter().map(|s| {
                let name = llama::hf_name(&model.block_names()[b], &s.name);
                assert_eq!(weights.info(&name).unwrap_or_else(|| panic!("{variant}: no {name}")).shape, s.shape, "{variant}: {name}");
                Var::from_slice(&read_all(&mut weights, &name), s.shape.as_slice(), &Device::Cpu).unwrap()
            }).collect()
        })
        .collect();
    let slots = (0..model.num_blocks()).map(|b| model.slots(b).iter().map(|src| vars[src.block][src.index].as_tensor().clone()).collect()).collect();
    (cfg, model, slots)
}

/// The loss and every parameter's gradient (by transformers name) through the block-wise backward.
fn loss_and_grads(model: &Model, slots: &[Vec<Tensor>], batch: &Batch) -> (f64, Vec<(String, Vec<f32>)>) {
    let (loss, mut grads) = support::loss_and_grads(model, slots, batch, false);
    let named = (0..model.num_blocks())
        .flat_map(|b| model.own_params(b).iter().map(move |s| llama::hf_name(&model.block_names()[b], &s.name)).zip(std::mem::take(&mut grads[b])).collect::<Vec<_>>())
        .collect();
    (loss, named)
}

fn check(variant: &str) {
    let dir = fixture(variant);
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let batch = Batch::tokens(ids(&expected["tokens"]), ids(&expected["targets"]));
    // transformers' gradients of the fused experts, read as each expert's.
    let mut want = llama::open_weights(&dir.join("expected.safetensors")).unwrap();
    let (cfg, model, slots) = load(variant, false);

    // Logits: the blocks up to the head, then its logits.
    let mut x = Vec::new();
    for b in 0..model.num_blocks() - 1 {
        let detached: Vec<Tensor> = slots[b].iter().map(Tensor::detach).collect();
        x = model.block(b).forward(&detached, &x, &batch).unwrap();
    }
    let logits: Vec<f32> = llama::Head::new(cfg).logits(&slots[model.num_blocks() - 1], &x[0]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let hf_logits = read_all(&mut want, "logits");
    let diff = max_abs(&logits, &hf_logits);
    assert!(diff <= 1e-5, "{variant}: logits differ from transformers' by {diff:e}");

    // `generate`'s forward (a key/value cache, the prompt then one token at a time) on each row, from
    // the per-expert files: transformers' logits too.
    let tokens = ids(&expected["tokens"]);
    let (rows, t) = tokens.dims2().unwrap();
    let gen = LlamaInfer::load(cfg, &mut llama::open_weights(&dir).unwrap(), &Device::Cpu, t).unwrap();
    let vocab = hf_logits.len() / (rows * t);
    for r in 0..rows {
        let row: Vec<u32> = tokens.get(r).unwrap().to_vec1().unwrap();
        let got = support::cached_logits(&gen, &row);
        let d = max_abs(&got, &hf_logits[r * t * vocab..(r + 1) * t * vocab]);
        assert!(d <= 1e-5, "{variant}: generate's logits of row {r} differ from transformers' by {d:e}");
    }

    // The loss and gradients without the load-balancing loss, then (MoE) with it.
    let runs: &[(bool, &str, &str)] = if cfg.moe.is_some() { &[(false, "loss", "grad."), (true, "loss_with_aux", "grad_aux.")] } else { &[(false, "loss", "grad.")] };
    for &(aux, loss_key, prefix) in runs {
        let (_, model, slots) = load(variant, aux);
        let (loss, grads) = loss_and_grads(&model, &slots, &batch);
        let hf_loss = expected[loss_key].as_f64().unwrap();
        assert!((loss - hf_loss).abs() <= 1e-5, "{variant}: {loss_key} {loss} vs transformers' {hf_loss}");
        for (name, g) in &grads {
            let hf = read_all(&mut want, &format!("{prefix}{name}"));
            let scale = hf.iter().map(|v| v.abs()).fold(0.0, f32::max).max(1e-12);
            let rel = max_abs(g, &hf) / scale;
            assert!(rel <= 1e-4, "{variant}: {prefix}{name} differs from transformers' by {rel:e} of its largest element");
        }
        assert_eq!(grads.len(), want.names().filter(|n| n.starts_with(prefix)).count(), "{variant}: every parameter compared");
    }
}

#[test]
fn mixtral_matches_transformers() {
    check("mixtral");
}

#[test]
fn qwen2_moe_with_a_dense_layer_and_a_shared_expert_matches_transformers() {
    check("qwen2_moe");
}

#[test]
fn qwen3_moe_with_normalised_top_k_and_per_head_qk_norms_matches_transformers() {
    check("qwen3_moe");
}

#[test]
fn olmoe_with_qk_norms_over_the_projection_matches_transformers() {
    check("olmoe");
}

#[test]
fn qwen3_dense_with_qk_norms_matches_transformers() {
    check("qwen3");
}

/// A Hub checkpoint's per-expert tensors (`model.safetensors` as `save_pretrained` writes it) read
/// as the fused ones: every parameter equal, bit for bit, to transformers 5's fused file; no tensor of
/// the file left over; and an engine importing the directory holds those values.
#[test]
fn per_expert_checkpoints_import_as_the_fused_experts() {
    use ferrospeed::checkpoint::{load_consolidated_from, ImportScope};
    use ferrospeed::engine::{Engine, EngineConfig};
    use ferrospeed::optim::Sgd;
    for variant in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"] {
        let dir = fixture(variant);
        let (_, model, slots) = load(variant, false);
        let mut per_expert = llama::open_weights(&dir).unwrap();
        let fused = llama::open_weights(&dir.join("model_fused.safetensors")).unwrap();
        let names: Vec<&str> = per_expert.names().collect::<Vec<_>>();
        assert_eq!(names, fused.names().collect::<Vec<_>>(), "{variant}: the per-expert and fused files present the same tensors, and nothing else");
        for b in 0..model.num_blocks() {
            for (j, src) in model.slots(b).iter().enumerate() {
                let name = llama::hf_name(&model.block_names()[src.block], &model.spec(*src).name);
                let want: Vec<f32> = slots[b][j].flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(read_all(&mut per_expert, &name), want, "{variant}: {name}");
            }
        }
        // Through the engine (as model.init_from reads it), two ranks at ZeRO stage 3: each reads its
        // window of each fused tensor.
        let got = ferrospeed::comm::run_local_world(2, &ferrospeed::CommConfig::default(), |comm| {
            let mut cfg = EngineConfig::fp32(false, 0.0, Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false }, 1);
            cfg.strategy = ferrospeed::shard::Strategy::new(ferrospeed::config::ZeroStage::Three);
            let (_, model, _) = load(variant, false);
            let mut engine = Engine::new(model, std::sync::Arc::new(comm), cfg).unwrap();
            load_consolidated_from(&mut engine, llama::open_weights(&dir).unwrap(), &dir, &llama::hf_name, ImportScope::All).unwrap();
            engine.slot_tensors().unwrap()
        })
        .unwrap()
        .remove(0);
        for (b, block) in got.iter().enumerate() {
            for (j, t) in block.iter().enumerate() {
                assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), slots[b][j].flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{variant}: block {b} slot {j} after import");
            }
        }
    }
}

/// The head's outputs for `variant` with `settings` applied to its MoE config: the loss, then the
/// router's load statistic and dropped share.
fn head_outputs(variant: &str, settings: impl Fn(&mut llama::MoeConfig)) -> Vec<f64> {
    let dir = fixture(variant);
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let batch = Batch::tokens(ids(&expected["tokens"]), ids(&expected["targets"]));
    let (mut cfg, _, slots) = load(variant, false);
    settings(cfg.moe.as_mut().unwrap());
    let model = llama::Llama::new(cfg).model().unwrap();
    let mut x = Vec::new();
    for b in 0..model.num_blocks() {
        let detached: Vec<Tensor> = slots[b].iter().map(Tensor::detach).collect();
        x = model.block(b).forward(&detached, &x, &batch).unwrap();
    }
    x.iter().map(|t| t.to_dtype(candle_core::DType::F64).unwrap().to_scalar::<f64>().unwrap()).collect()
}

/// The router z-loss, the capacity's drops and the load statistic against what transformers' routing
/// in the fixture says: the z-loss is the mean of `logsumexp(router logits)²` over every sparse layer's
/// tokens (from the recorded logits); a capacity of `⌈f·n·k/E⌉` drops, per expert, the tokens past it
/// (from the recorded expert counts, exactly where one layer is sparse); `moe_max_load` is each layer's
/// busiest expert over the mean.
#[test]
fn router_z_loss_capacity_and_load_follow_the_fixtures_routing() {
    for variant in ["mixtral", "qwen2_moe", "olmoe"] {
        let dir = fixture(variant);
        let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let mut want = WeightFiles::open(&dir.join("expected.safetensors")).unwrap();
        let layers: Vec<u64> = expected["moe_layers"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap()).collect();
        let HfModel::Llama(cfg) = read_config(&dir, 8).unwrap() else { unreachable!() };
        let m = cfg.moe.unwrap();
        let (e, k) = (m.num_experts, m.top_k);
        // z: from transformers' router logits of each sparse layer.
        let mut z_sum = 0f64;
        let mut n = 0;
        for l in &layers {
            let logits = read_all(&mut want, &format!("router_logits.{l}"));
            for row in logits.chunks(e) {
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                z_sum += lse * lse;
            }
            n = logits.len() / e;
        }
        let z = z_sum / (layers.len() * n) as f64;
        let plain = head_outputs(variant, |_| {});
        let with_z = head_outputs(variant, |m| m.z_loss_coef = 0.5);
        assert!((with_z[0] - plain[0] - 0.5 * z).abs() <= 1e-5 * z.max(1.0), "{variant}: z-loss {} vs {}", with_z[0] - plain[0], 0.5 * z);
        // Load and drops: from transformers' expert counts.
        let counts: Vec<Vec<f64>> = layers.iter().map(|l| expected["expert_counts"][l.to_string()].as_array().unwrap().iter().map(|c| c.as_f64().unwrap()).collect()).collect();
        let load = counts.iter().map(|c| c.iter().cloned().fold(0.0, f64::max) / (c.iter().sum::<f64>() / e as f64)).sum::<f64>() / layers.len() as f64;
        assert!((plain[1] - load).abs() <= 1e-6 * load, "{variant}: moe_max_load {} vs {load}", plain[1]);
        assert_eq!(plain[2], 0.0, "{variant}: dropless drops nothing");
        let factor = 0.75;
        let capacity = (factor * (n * k) as f64 / e as f64).ceil();
        let dropped: f64 = counts.iter().flatten().map(|c| (c - capacity).max(0.0)).sum::<f64>() / (layers.len() * n * k) as f64;
        let capped = head_outputs(variant, |m| m.capacity_factor = Some(factor));
        // Exact where one layer is sparse; with more, the drops of one change the next one's routing.
        let exact = layers.len() == 1;
        assert!(dropped > 0.0 && capped[2] > 0.0 && (!exact || (capped[2] - dropped).abs() <= 1e-6), "{variant}: dropped share {} vs {dropped}", capped[2]);
        assert!(capped[0] != plain[0], "{variant}: dropping tokens changes the loss");
        // Capacity enough for every token: the dropless model, bit for bit.
        let roomy = head_outputs(variant, |m| m.capacity_factor = Some(e as f64 / k as f64));
        assert_eq!(roomy[0].to_bits(), plain[0].to_bits(), "{variant}");
    }
}
