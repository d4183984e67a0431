//! Pipeline parallelism under `launch`: 1f1b, gpipe and zb (the backward split into input and weight
//! halves) at pp ∈ {2, 3, 4} and interleaved with 2–4 virtual stages a rank, × dp ∈ {1, 2}, train the
//! same per-step losses and gradient norms as pp = 1 at the same dp — bit for bit for an untied
//! Llama, within 1e-6 where the head is tied to the embedding (GPT; a tied Llama at ZeRO-1 with
//! activation checkpointing); bad pipelines are refused in one line.

mod support;

use std::path::Path;
use std::time::Duration;
use support::{run, train_command, write_config};

const GPT: &str = "n_layer = 3\nn_head = 2\nd_model = 32\nseq_len = 32";
const LLAMA: &str = "kind = \"llama\"\nn_layer = 3\nn_head = 4\nn_kv_head = 2\nd_model = 32\nseq_len = 32";
const LLAMA_TIED: &str = "kind = \"llama\"\nn_layer = 3\nn_head = 4\nn_kv_head = 2\nd_model = 32\nseq_len = 32\ntie_embeddings = true";
const STEPS: &str = "steps = 4\nglobal_batch = 16\nmicro_batch = 2\nwarmup = 1\nlr = 3e-3\ngrad_clip = 1.0";

/// (step, loss bits, grad-norm bits) of each row of a run.
fn rows(track: &Path) -> Vec<(u64, u64, u64)> {
    std::fs::read_to_string(track.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap().to_bits(), v["grad_norm"].as_f64().unwrap().to_bits())
        })
        .collect()
}

fn train(dir: &Path, config: &Path, name: &str, nproc: usize, sets: &[&str]) -> Vec<(u64, u64, u64)> {
    let track = dir.join(name);
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let f = run(&mut train_command(nproc, config, &track, &sets), Duration::from_secs(300));
    assert!(f.status.success(), "{name} {sets:?} failed:\n{}\n{}", f.stdout, f.stderr);
    rows(&track)
}

/// `got` against pp = 1's `reference`: bit for bit, or within `tolerance` (relative) on the loss and
/// the gradient norm of every step.
fn compare(got: &[(u64, u64, u64)], reference: &[(u64, u64, u64)], tolerance: Option<f64>, what: &str) {
    match tolerance {
        None => assert_eq!(got, reference, "{what}: (step, loss bits, grad-norm bits) differ from pp = 1"),
        Some(tol) => {
            assert_eq!(got.len(), reference.len(), "{what}");
            for (g, r) in got.iter().zip(reference) {
                for (a, b) in [(g.1, r.1), (g.2, r.2)] {
                    let (a, b) = (f64::from_bits(a), f64::from_bits(b));
                    assert!((a - b).abs() <= tol * b.abs(), "{what}: step {}: {a} vs {b} at pp = 1", g.0);
                }
            }
        }
    }
}

/// Tied parameters are the exception to bitwise (see `engine/step/pipeline.rs`): their two ends'
/// gradients are summed once per step, not interleaved per micro-batch as at pp = 1. Such runs are
/// held to the losses and gradient norms within `tied_tolerance` (relative) instead.
fn every_pipeline_matches_pp1(model: &str, extra: &[&str], tied_tolerance: Option<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), model, STEPS);
    for dp in [1, 2] {
        let reference = train(dir.path(), &config, &format!("dp{dp}"), dp, extra);
        assert_eq!(reference.len(), 4);
        for pp in [2, 3, 4] {
            for schedule in ["1f1b", "gpipe", "zb"] {
                let mut sets = vec![format!("parallel.pp={pp}"), format!("parallel.pp_schedule={schedule}")];
                sets.extend(extra.iter().map(|s| s.to_string()));
                let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
                let got = train(dir.path(), &config, &format!("pp{pp}dp{dp}{schedule}"), pp * dp, &sets);
                compare(&got, &reference, tied_tolerance, &format!("pp = {pp}, dp = {dp}, {schedule} {extra:?}"));
            }
        }
    }
}

#[test]
fn gpt_pipelines_with_the_tied_head_match_pp1_within_1e_6() {
    every_pipeline_matches_pp1(GPT, &[], Some(1e-6));
}

#[test]
fn llama_pipelines_train_the_losses_of_pp1_bit_for_bit() {
    every_pipeline_matches_pp1(LLAMA, &[], None);
}

#[test]
fn a_tied_llama_pipeline_with_zero_1_and_checkpointing_matches_pp1() {
    every_pipeline_matches_pp1(LLAMA_TIED, &["zero.stage=1", "train.activation_checkpointing=true"], Some(1e-6));
}

#[test]
fn interleaved_pipelines_with_virtual_stages_match_pp1() {
    // Six layers (eight blocks): pp 2 and 4 with 2 stages a rank, pp 2 with 4; GPT's tied head on
    // another rank than its embedding within 1e-6, the untied Llama bit for bit.
    let dir = tempfile::tempdir().unwrap();
    for (f, (model, tol)) in [(LLAMA.replace("n_layer = 3", "n_layer = 6"), None), (GPT.replace("n_layer = 3", "n_layer = 6"), Some(1e-6))].into_iter().enumerate() {
        let config = write_config(dir.path(), &model, STEPS);
        for dp in [1, 2] {
            let reference = train(dir.path(), &config, &format!("i{f}-dp{dp}"), dp, &[]);
            for (pp, v) in [(2, 2), (4, 2), (2, 4)] {
                let sets = [format!("parallel.pp={pp}"), format!("parallel.pp_virtual={v}"), "parallel.pp_schedule=interleaved".to_string()];
                let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
                let got = train(dir.path(), &config, &format!("i{f}-pp{pp}v{v}dp{dp}"), pp * dp, &sets);
                compare(&got, &reference, tol, &format!("interleaved pp = {pp} × {v} virtual, dp = {dp}, {}", model.lines().next().unwrap_or("")));
            }
        }
    }
}

#[test]
fn zero_2_and_3_offload_and_fp16_inside_each_stage_match_pp1_bit_for_bit() {
    // DeepSpeed refuses ZeRO-2/3 with a pipeline; here each stage's data-parallel group shards its
    // own blocks, and the arithmetic is that of pp = 1 at stage 0.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), LLAMA, STEPS);
    let reference = train(dir.path(), &config, "dp2", 2, &[]);
    for (pp, zero) in [
        (2, &["zero.stage=2"][..]),
        (4, &["zero.stage=3"]),
        (2, &["zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_params=cpu"]),
        // The weight halves of a zero-bubble schedule accumulate and reduce the stage's gradients.
        (3, &["zero.stage=3", "parallel.pp_schedule=zb"]),
        (2, &["zero.stage=2", "zero.offload_optimizer=cpu", "parallel.pp_schedule=zb"]),
    ] {
        let mut sets = vec![format!("parallel.pp={pp}")];
        sets.extend(zero.iter().map(|s| s.to_string()));
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let got = train(dir.path(), &config, &format!("pp{pp}{}", zero.join("-")), pp * 2, &sets);
        assert_eq!(got, reference, "pp = {pp}, dp = 2, {zero:?}: (step, loss bits, grad-norm bits) differ from pp = 1 at stage 0");
    }
    // fp16 with dynamic loss scaling: the overflow check is agreed over the world, the scale the same.
    let fp16 = train(dir.path(), &config, "fp16", 1, &["train.precision=fp16"]);
    assert_eq!(train(dir.path(), &config, "fp16-pp2", 2, &["train.precision=fp16", "parallel.pp=2"]), fp16, "fp16 at pp = 2");
}

/// A copy of checkpoint folder `from` whose `latest` is its step `step`.
fn checkpoint_at(from: &Path, to: &Path, step: u64) -> String {
    let status = std::process::Command::new("cp").arg("-r").arg(from).arg(to).status().unwrap();
    assert!(status.success());
    let name = std::fs::read_dir(to)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .find(|n| n.starts_with("step-") && n.trim_start_matches("step-").parse::<u64>() == Ok(step))
        .unwrap_or_else(|| panic!("no step {step} in {}", from.display()));
    std::fs::write(to.join("latest"), format!("{name}\n")).unwrap();
    format!("checkpoint.dir={}", to.display())
}

#[test]
fn a_pipeline_checkpoint_resumes_at_other_pipeline_and_data_parallel_shapes() {
    // pp2×dp2 and pp1×dp2 train the same bits (untied Llama): their step-2 checkpoints must hold
    // the same state, so resuming either at pp1×dp4, pp4×dp1 or pp2×dp2 trains the same steps 3–4.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), LLAMA, STEPS);
    let d = dir.path();
    let every = "checkpoint.every=2";
    let pipe = train(d, &config, "a", 4, &["parallel.pp=2", &format!("checkpoint.dir={}", d.join("ck-a").display()), every]);
    let flat = train(d, &config, "r", 2, &[&format!("checkpoint.dir={}", d.join("ck-r").display()), every]);
    assert_eq!(pipe, flat);
    let later = |rows: Vec<(u64, u64, u64)>| rows.into_iter().filter(|r| r.0 > 2).collect::<Vec<_>>();
    for (name, nproc, pp) in [("pp1dp4", 4, 1), ("pp4dp1", 4, 4), ("pp2dp2", 4, 2), ("pp2dp1", 2, 2)] {
        let from_pipe = checkpoint_at(&d.join("ck-a"), &d.join(format!("ck-a-{name}")), 2);
        let from_flat = checkpoint_at(&d.join("ck-r"), &d.join(format!("ck-r-{name}")), 2);
        let pp = format!("parallel.pp={pp}");
        let got = later(train(d, &config, &format!("a-{name}"), nproc, &[&pp, &from_pipe]));
        let want = later(train(d, &config, &format!("r-{name}"), nproc, &[&pp, &from_flat]));
        assert_eq!(got.len(), 2, "{name}");
        assert_eq!(got, want, "{name}: resumed from the pipeline's checkpoint vs from pp = 1's");
    }
    assert_eq!(later(train(d, &config, "a-again", 4, &["parallel.pp=2", &checkpoint_at(&d.join("ck-a"), &d.join("ck-a-again"), 2)])), later(pipe));
    // The two step-4 checkpoints export to the same weights, byte for byte.
    for ck in ["ck-a", "ck-r"] {
        let f = run(support::ferrospeed().args(["checkpoint", "export"]).arg(d.join(ck)).arg(d.join(format!("{ck}.safetensors"))), Duration::from_secs(60));
        assert!(f.status.success(), "{}", f.stderr);
    }
    assert!(std::fs::read(d.join("ck-a.safetensors")).unwrap() == std::fs::read(d.join("ck-r.safetensors")).unwrap(), "exports differ");
}

#[test]
fn a_stage_killed_mid_schedule_is_restarted_from_the_last_checkpoint() {
    // Rank 1 (the last stage) aborts halfway through step 3's actions in the first attempt, while
    // rank 0 waits for its gradients: the launcher stops it, restarts both, and they resume at step 2.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), LLAMA, STEPS);
    let d = dir.path();
    let sets = |name: &str| vec!["parallel.pp=2".to_string(), format!("checkpoint.dir={}", d.join(name).display()), "checkpoint.every=2".into()];
    let whole = train(d, &config, "whole", 2, &sets("ck-whole").iter().map(String::as_str).collect::<Vec<_>>());
    let track = d.join("restarted");
    let mut cmd = support::ferrospeed();
    cmd.args(["launch", "--nproc-per-node", "2", "--max-restarts", "1", "train", "--config"]).arg(&config);
    cmd.arg("--set").arg(format!("track.dir={}", track.display()));
    for s in sets("ck-restarted") {
        cmd.args(["--set", &s]);
    }
    let f = run(cmd.env("FERROSPEED_FAULT", "mid-schedule@3@1@0"), Duration::from_secs(180));
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stderr.contains("aborts at mid-schedule of step 3") && f.stderr.contains("restart 1 of 1: rank 1"), "{}", f.stderr);
    assert_eq!(rows(&track), whole, "the restarted pipeline trains the uninterrupted run's steps, each once");
}

#[test]
fn a_tied_transformers_llama_imports_into_both_ends_of_a_pipeline() {
    // transformers' tied Llama (fixtures/hf/mha_tied): stage 0 loads `embed_tokens` into its
    // embedding, the last stage the same tensor into its ghost, so the first loss is pp = 1's bit for
    // bit and the training follows within 1e-6.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vocab: serde_json::Map<String, serde_json::Value> =
        "the a of to and in is it that for on with as be by this are or not [UNK]".split(' ').enumerate().map(|(i, w)| (w.to_string(), i.into())).collect();
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}});
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferrospeed-models/tests/fixtures/hf/mha_tied");
    let model = format!("seq_len = 8\ninit_from = \"{}\"\ntokenizer = \"{}\"", fixture.display(), d.join("tokenizer.json").display());
    let config = write_config(d, &model, "steps = 3\nglobal_batch = 4\nmicro_batch = 1\nwarmup = 0\nlr = 1e-2");
    let flat = train(d, &config, "flat", 1, &[]);
    let piped = train(d, &config, "piped", 2, &["parallel.pp=2"]);
    assert_eq!(piped[0].1, flat[0].1, "the imported weights give pp = 1's first loss");
    compare(&piped, &flat, Some(1e-6), "imported tied Llama at pp = 2");
}

#[test]
fn bad_pipelines_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), GPT, STEPS);
    let cases: [(usize, &[&str], &str); 5] = [
        // 16 / (8 × 1) = 2 micro-batches for 4 stages.
        (4, &["parallel.pp=4", "train.micro_batch=8"], "at least one micro-batch per stage"),
        (2, &["parallel.pp=2", "parallel.pp_schedule=zb", "parallel.pp_virtual=2"], "(it is \"zb\")"),
        (2, &["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2", "train.micro_batch=1", "train.global_batch=3"], "multiple of parallel.pp = 2"),
        (2, &["parallel.pp=2", "parallel.pp_split=[2, 2]"], "add up to 5"),
        (3, &["parallel.pp=2"], "does not split into"),
    ];
    for (nproc, sets, want) in cases {
        let track = dir.path().join("refused");
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let f = run(&mut train_command(nproc, &config, &track, &sets), Duration::from_secs(120));
        assert_eq!(f.status.code(), Some(2), "{sets:?}:\n{}\n{}", f.stdout, f.stderr);
        let line = f.stderr.lines().find(|l| l.contains("error")).unwrap_or_default().to_string();
        assert!(line.contains(want), "{sets:?}: {line}\n{}", f.stderr);
        assert!(!track.join("metrics.jsonl").exists());
    }
}
