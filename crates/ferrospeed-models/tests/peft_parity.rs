//! LoRA against PEFT without Python (fixtures/make_peft_fixtures.py made fixtures/peft/ once with PEFT and
//! transformers over fixtures/hf/gqa_untied): the fixture's adapter imported over its base, through the
//! engine as a training run loads them (`init_from` → the frozen base, `adapter_from` → the adapters),
//! reproduces the logits PEFT recorded within 1e-5, all-linear and rsLoRA on q/v alike.

mod support;

use candle_core::{Device, Tensor};
use ferrospeed::checkpoint::{load_consolidated, ImportScope, WeightFiles};
use ferrospeed::comm::run_local_world;
use ferrospeed::engine::{Batch, Engine};
use ferrospeed::CommConfig;
use ferrospeed_models::hf::{read_config, HfModel};
use ferrospeed_models::llama::{self, LlamaLora};
use ferrospeed_models::ops::lora::{resolve_targets, LoraShape};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ids(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<u32>> = v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

/// The adapters an `adapter_config.json` describes, on the Llama of `cfg`.
fn lora_of(conf: &serde_json::Value, n_layer: usize) -> LlamaLora {
    let targets: Vec<String> = match &conf["target_modules"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a.iter().map(|t| t.as_str().unwrap().to_string()).collect(),
        other => panic!("target_modules {other}"),
    };
    let shape = LoraShape { r: conf["r"].as_u64().unwrap() as usize, alpha: conf["lora_alpha"].as_f64().unwrap(), rslora: conf["use_rslora"].as_bool().unwrap() };
    LlamaLora { shape, targets: resolve_targets(n_layer, &targets).unwrap() }
}

#[test]
fn a_peft_adapter_over_its_base_reproduces_pefts_logits() {
    let base = fixtures().join("hf/gqa_untied");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(base.join("expected.json")).unwrap()).unwrap();
    let batch = Batch::tokens(ids(&expected["tokens"]), ids(&expected["targets"]));
    for variant in ["all_linear", "qv_rslora"] {
        let dir = fixtures().join("peft").join(variant);
        let conf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        let HfModel::Llama(cfg) = read_config(&base, 8).unwrap() else { panic!("a Llama fixture") };
        let lora = lora_of(&conf, cfg.n_layer);
        let adapted = lora.targets.iter().flatten().filter(|t| **t).count();
        let file = dir.join("adapter_model.safetensors");
        assert_eq!(WeightFiles::open(&file).unwrap().names().count(), 2 * adapted, "{variant}: one A and one B per adapted module");
        let logits = run_local_world(1, &CommConfig::default(), |comm| {
            let model = llama::Llama::with_lora(cfg, lora.clone()).unwrap().model().unwrap();
            let mut engine = Engine::new(model, Arc::new(comm), support::engine_config(0, ferrospeed::precision::Precision::Fp32, false, 1)).unwrap();
            load_consolidated(&mut engine, &base, &llama::hf_name, ImportScope::Frozen).unwrap();
            let peft = |b: &str, p: &str| format!("base_model.model.{}", llama::hf_name(b, p));
            load_consolidated(&mut engine, &file, &peft, ImportScope::Trainable).unwrap();
            let slots = engine.slot_tensors().unwrap();
            let model = engine.model();
            let mut x = Vec::new();
            for (b, p) in slots.iter().enumerate().take(model.num_blocks() - 1) {
                x = model.block(b).forward(p, &x, &batch).unwrap();
            }
            llama::Head::new(cfg).logits(slots.last().unwrap(), &x[0]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .unwrap()
        .remove(0);
        let mut want = WeightFiles::open(&dir.join("expected.safetensors")).unwrap();
        let n = want.info("logits").unwrap().shape.iter().product();
        let mut peft_logits = vec![0f32; n];
        want.read_f32("logits", 0..n, &mut peft_logits).unwrap();
        let diff = logits.iter().zip(&peft_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert_eq!(logits.len(), n);
        assert!(diff <= 1e-5, "{variant}: logits differ from PEFT's by {diff:e}");
        // The adapters matter: without them (B = A = 0 is the base) the logits are far off.
        let mut base_logits = vec![0f32; n];
        WeightFiles::open(&base.join("expected.safetensors")).unwrap().read_f32("logits", 0..n, &mut base_logits).unwrap();
        let moved = logits.iter().zip(&base_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-2, "{variant}: the adapter changes the logits ({moved:e})");
    }
}
