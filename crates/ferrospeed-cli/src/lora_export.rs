//! A LoRA run's adapters outside ferrospeed: what `train` records of them in the checkpoint
//! (`run.lora`), and `checkpoint export --adapter`, a PEFT directory (`adapter_config.json`,
//! `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` `[r, in]` and
//! `lora_B.weight` `[out, r]`) that `PeftModel.from_pretrained` loads over the base.

use crate::usage::usage_error;
use anyhow::Result;
use ferrospeed::checkpoint::{self, DirExport, ExportStats, Meta, WeightDtype};
use ferrospeed_models::ops::lora::MODULES;
use ferrospeed_models::Family;
use std::path::Path;

/// The key of the checkpoint's run record that holds the adapters' settings.
pub(crate) const LORA_KEY: &str = "lora";

/// What `train` records of a LoRA run: PEFT's settings and where the base came from.
pub(crate) fn record(family: &Family, cfg: &ferrospeed::config::Config) -> Option<serde_json::Value> {
    let (lora, l) = (family.lora()?, cfg.lora.as_ref()?);
    let base = cfg.model.init_from.as_ref().map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()).display().to_string());
    Some(serde_json::json!({
        "r": l.r,
        "lora_alpha": l.alpha,
        "lora_dropout": l.dropout,
        "use_rslora": l.rslora,
        "target_modules": target_modules(&lora.targets),
        "base_model_name_or_path": base,
    }))
}

/// PEFT's `target_modules` for the adapted modules of each layer: the modules' own names
/// (`"q_proj"`, matched by suffix) when every layer adapts the same ones, else each adapted module's
/// full name (matched exactly).
fn target_modules(targets: &[[bool; 7]]) -> Vec<String> {
    let short = |m: &str| m.rsplit('.').next().unwrap_or(m).to_string();
    if targets.windows(2).all(|w| w[0] == w[1]) {
        let first = targets.first().copied().unwrap_or([false; 7]);
        return MODULES.iter().zip(first).filter(|(_, on)| *on).map(|(m, _)| short(m)).collect();
    }
    let mut out = Vec::new();
    for (l, t) in targets.iter().enumerate() {
        out.extend(MODULES.iter().zip(t).filter(|(_, on)| **on).map(|(m, _)| format!("model.layers.{l}.{m}")));
    }
    out
}

/// The checkpoint's adapters, if it is a LoRA run's.
pub(crate) fn recorded(meta: &Meta) -> Option<&serde_json::Value> {
    meta.run.get(LORA_KEY).filter(|v| v.is_object())
}

/// `adapter_config.json` for a recorded LoRA run.
fn adapter_config(lora: &serde_json::Value) -> serde_json::Value {
    let get = |k: &str| lora.get(k).cloned().unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": get("r"),
        "lora_alpha": get("lora_alpha"),
        "lora_dropout": get("lora_dropout"),
        "use_rslora": get("use_rslora"),
        "target_modules": get("target_modules"),
        "base_model_name_or_path": get("base_model_name_or_path"),
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// Write checkpoint `dir`'s adapters as a PEFT directory at `out` (atomically, as every export).
pub(crate) fn export_adapter(dir: &Path, out: &Path, meta: &Meta, dtype: WeightDtype) -> Result<ExportStats> {
    let lora = recorded(meta).ok_or_else(|| usage_error(format!("{} is not a LoRA run's checkpoint (it trained every weight): export it without --adapter", dir.display())))?;
    let names = crate::checkpoint_cmd::export_names(meta);
    let peft = move |block: &str, param: &str| format!("base_model.model.{}", names(block, param));
    let files = vec![("adapter_config.json".to_string(), serde_json::to_vec_pretty(&adapter_config(lora))?)];
    let opts = DirExport { name_of: &peft, dtype, max_shard_bytes: u64::MAX, files, single_file: Some("adapter_model.safetensors"), regroup: None };
    checkpoint::export_dir(dir, out, &opts).map_err(|e| match e {
        checkpoint::CheckpointError::Exists { .. } => usage_error(e.to_string()),
        e => e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_modules_are_short_names_when_every_layer_agrees() {
        let qv = [true, false, true, false, false, false, false];
        assert_eq!(target_modules(&[qv, qv]), ["q_proj", "v_proj"]);
        assert_eq!(target_modules(&[qv, [false; 7]]), ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]);
    }
}

/// Check a PEFT adapter directory (`model.adapter_from`) against the run's `[lora]` before anything
/// runs: the same rank, alpha and rsLoRA, and exactly the adapted modules (each tensor of the file one
/// of the model's adapters, each adapter in the file). One line naming the difference otherwise.
pub(crate) fn check_adapter(dir: &Path, family: &Family, lora: &ferrospeed::config::LoraConfig) -> Result<(), String> {
    let at = |why: String| format!("model.adapter_from = {}: {why}", dir.display());
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).map_err(|e| at(format!("adapter_config.json: {e}")))?;
    let conf: serde_json::Value = serde_json::from_str(&text).map_err(|e| at(format!("adapter_config.json: {e}")))?;
    if conf.get("peft_type").and_then(|v| v.as_str()).is_some_and(|t| t != "LORA") {
        return Err(at(format!("it is a {} adapter, not LoRA", conf["peft_type"])));
    }
    let num = |k: &str| conf.get(k).and_then(serde_json::Value::as_f64);
    for (key, theirs, ours) in [("r", num("r"), lora.r as f64), ("lora_alpha", num("lora_alpha"), lora.alpha)] {
        if theirs.is_some_and(|t| t != ours) {
            return Err(at(format!("its {key} is {} but [lora] has {ours}: set lora.{} = {}", theirs.unwrap_or_default(), if key == "r" { "r" } else { "alpha" }, theirs.unwrap_or_default())));
        }
    }
    let rs = conf.get("use_rslora").and_then(serde_json::Value::as_bool).unwrap_or(false);
    if rs != lora.rslora {
        return Err(at(format!("its use_rslora is {rs} but lora.rslora is {}: set lora.rslora = {rs}", lora.rslora)));
    }
    let file = dir.join("adapter_model.safetensors");
    let files = ferrospeed::checkpoint::WeightFiles::open(&file).map_err(|e| at(e.to_string()))?;
    let model = family.model().map_err(|e| at(e.to_string()))?;
    let names = family.names().map;
    let ours: std::collections::BTreeSet<String> =
        (0..model.num_blocks()).flat_map(|b| model.own_params(b).iter().map(move |s| (b, s))).map(|(b, s)| format!("base_model.model.{}", names(&model.block_names()[b], &s.name))).collect();
    let theirs: std::collections::BTreeSet<String> = files.names().map(str::to_string).collect();
    if let Some(extra) = theirs.difference(&ours).next() {
        return Err(at(format!("it has {extra}, which lora.targets does not adapt: widen lora.targets to the adapter's target_modules {}", conf["target_modules"])));
    }
    if let Some(missing) = ours.difference(&theirs).next() {
        return Err(at(format!("it has no {missing}: narrow lora.targets to the adapter's target_modules {}", conf["target_modules"])));
    }
    Ok(())
}

/// Write checkpoint `dir`'s adapters merged into their base (`W + s·B·A`, PEFT's `merge_and_unload`)
/// as a transformers directory at `out`, in the base's element type: every tensor of the base in its
/// order, an adapted projection's weight with its update added in f32. `files`: config.json and the
/// tokenizer files.
pub(crate) fn export_merged(dir: &Path, out: &Path, meta: &Meta, max_shard_bytes: u64, files: Vec<(String, Vec<u8>)>) -> Result<ExportStats> {
    let lora = recorded(meta).ok_or_else(|| usage_error(format!("{} is not a LoRA run's checkpoint: export it without --merge", dir.display())))?;
    let base = lora.get("base_model_name_or_path").and_then(|b| b.as_str()).map(std::path::PathBuf::from).ok_or_else(|| {
        usage_error("this LoRA run started from random weights (no model.init_from), so there is no base to merge into: export the adapters with --adapter")
    })?;
    let (r, alpha) = (lora["r"].as_f64().unwrap_or(1.0), lora["lora_alpha"].as_f64().unwrap_or(1.0));
    let scale = if lora["use_rslora"].as_bool().unwrap_or(false) { alpha / r.sqrt() } else { alpha / r };
    // The adapters under ferrospeed's block names, from one file of the checkpoint's trainable state.
    let tmp = tempfile::tempdir()?;
    let adapters_path = tmp.path().join("adapters.safetensors");
    checkpoint::export(dir, &adapters_path, &ferrospeed::accelerator::block_dot_param)?;
    let mut adapters = ferrospeed::checkpoint::WeightFiles::open(&adapters_path)?;
    let mut weights = ferrospeed::checkpoint::WeightFiles::open(&base).map_err(|e| usage_error(format!("the base {} the adapters were trained on: {e}", base.display())))?;
    let tensors: Vec<(String, Vec<usize>)> = weights.names().map(str::to_string).collect::<Vec<_>>().into_iter().filter_map(|n| weights.info(&n).map(|i| (n, i.shape.clone()))).collect();
    let dtype = tensors.first().and_then(|(n, _)| weights.info(n)).map_or(WeightDtype::F32, |i| i.dtype);
    let read = |files: &mut ferrospeed::checkpoint::WeightFiles, name: &str| -> Result<Option<(Vec<f32>, Vec<usize>)>, checkpoint::CheckpointError> {
        let Some(shape) = files.info(name).map(|i| i.shape.clone()) else { return Ok(None) };
        let mut v = vec![0f32; shape.iter().product()];
        files.read_f32(name, 0..v.len(), &mut v)?;
        Ok(Some((v, shape)))
    };
    let opts = DirExport { name_of: &ferrospeed::accelerator::block_dot_param, dtype, max_shard_bytes, files, single_file: None, regroup: None };
    let names: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
    let stats = checkpoint::write_dir(out, &tensors, &opts, |t, values| {
        let (w, _) = read(&mut weights, &names[t])?.ok_or_else(|| checkpoint::CheckpointError::Format(format!("the base lost {}", names[t])))?;
        values.copy_from_slice(&w);
        // `model.layers.N.<module>.weight` ↔ the adapters' `layers.N.<module>.lora_A.weight`.
        let Some(module) = names[t].strip_prefix("model.").and_then(|n| n.strip_suffix(".weight")) else { return Ok(()) };
        let (Some((a, a_shape)), Some((b, b_shape))) = (read(&mut adapters, &format!("{module}.lora_A.weight"))?, read(&mut adapters, &format!("{module}.lora_B.weight"))?) else { return Ok(()) };
        let (rank, inp) = (a_shape[0], a_shape[1]);
        debug_assert_eq!(b_shape[1], rank);
        // ΔW = s·B·A, each element a dot product over the rank in f32, then added; rows in parallel.
        use rayon::prelude::*;
        values.par_chunks_mut(inp).enumerate().for_each(|(o, row)| {
            for (i, v) in row.iter_mut().enumerate() {
                let d: f32 = (0..rank).map(|k| b[o * rank + k] * a[k * inp + i]).sum();
                *v += d * scale as f32;
            }
        });
        Ok(())
    })?;
    Ok(stats)
}
