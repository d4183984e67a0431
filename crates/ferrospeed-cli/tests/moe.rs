//! Mixture-of-experts models through `launch train`: a Hub checkpoint in the per-expert layout
//! (`model.init_from`, the fixtures of ferrospeed-models' `make_moe_fixtures.py`) trains at world 1
//! and 2 with the same losses (1e-6; stages 0 and 3, and with `parallel.ep = 2`) and the router's
//! load in every metrics row,
//! `[moe] aux_loss = true` adds the load-balancing
//! loss (a higher loss than without it), a z-loss and a capacity that drops tokens train alike at world
//! 1 and 2 with the drops in the metrics, and bad `[moe]` values, or `[moe]` or `parallel.ep` on a
//! model without experts, are refused in one line with nothing written.

mod support;

use std::path::{Path, PathBuf};
use support::{run, train, train_command, word_tokenizer, write_config};

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ferrospeed-models/tests/fixtures/moe").join(variant)
}

/// `[model]` lines for `variant` (per-expert weights) with the word tokenizer, and `[moe]` lines after the train section.
fn config(dir: &Path, variant: &str, moe: &str) -> PathBuf {
    let model = format!("seq_len = 8\ninit_from = \"{}\"\ntokenizer = \"{}\"", fixture(variant).display(), word_tokenizer(dir).display());
    let path = write_config(dir, &model, "steps = 3\nglobal_batch = 4\nmicro_batch = 1\nwarmup = 0\nlr = 1e-2");
    if !moe.is_empty() {
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}\n[moe]\n{moe}\n")).unwrap();
    }
    path
}

fn close(a: &[(u64, f64)], b: &[(u64, f64)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && (x.1 - y.1).abs() <= 1e-6 * y.1.abs())
}

#[test]
fn a_per_expert_hub_checkpoint_trains_at_any_world_size_with_and_without_the_aux_loss() {
    for variant in ["mixtral", "qwen2_moe"] {
        let dir = tempfile::tempdir().unwrap();
        let plain = config(dir.path(), variant, "");
        let one = train(1, &plain, &dir.path().join("t1"), &[]);
        assert!(one.len() == 3 && one.iter().all(|(_, l)| l.is_finite()), "{variant}: {one:?}");
        // Every row carries the router's load statistic (busiest expert over the mean, ≥ 1).
        let rows = std::fs::read_to_string(dir.path().join("t1/metrics.jsonl")).unwrap();
        for row in rows.lines() {
            let v: serde_json::Value = serde_json::from_str(row).unwrap();
            assert!(v["moe_max_load"].as_f64().is_some_and(|l| l >= 1.0), "{variant}: {row}");
        }
        let two = train(2, &plain, &dir.path().join("t2"), &["zero.stage=3".into()]);
        assert!(close(&two, &one), "{variant}: world 2 stage 3 {two:?} vs world 1 {one:?}");
        // A pipeline of 2 stages (the router's sums and selections cross the stage boundary).
        let pp = train(2, &plain, &dir.path().join("t2pp"), &["parallel.pp=2".into()]);
        assert!(close(&pp, &one), "{variant}: pp 2 {pp:?} vs world 1 {one:?}");
        // The router's statistics come from the last stage: every row has them, the first step's as at world 1.
        let load = |run: &str| -> Vec<Option<f64>> {
            let rows = std::fs::read_to_string(dir.path().join(run).join("metrics.jsonl")).unwrap();
            rows.lines().map(|r| serde_json::from_str::<serde_json::Value>(r).unwrap()["moe_max_load"].as_f64()).collect()
        };
        let (l1, lpp) = (load("t1"), load("t2pp"));
        assert!(lpp.len() == 3 && lpp.iter().all(|l| l.is_some_and(|l| l >= 1.0)), "{variant}: pp 2 loads {lpp:?}");
        assert!((lpp[0].unwrap() - l1[0].unwrap()).abs() <= 1e-6, "{variant}: pp 2 first load {lpp:?} vs world 1 {l1:?}");
        // Expert parallelism: each of 2 ranks holds half the experts.
        let ep = train(2, &plain, &dir.path().join("t2ep"), &["zero.stage=2".into(), "parallel.ep=2".into()]);
        assert!(close(&ep, &one), "{variant}: world 2 ep 2 {ep:?} vs world 1 {one:?}");
        let aux = config(dir.path(), variant, "aux_loss = true\naux_loss_coef = 0.5");
        let with = train(1, &aux, &dir.path().join("t3"), &[]);
        assert!(with[0].1 > one[0].1 + 1e-3, "{variant}: the first step's loss with the aux loss {} vs without {}", with[0].1, one[0].1);
        let with2 = train(2, &aux, &dir.path().join("t4"), &[]);
        assert!(close(&with2, &with), "{variant}: with the aux loss, world 2 {with2:?} vs world 1 {with:?}");
        // A z-loss and a capacity that drops tokens: the same at world 1 and 2, the drops in the metrics.
        let capped = config(dir.path(), variant, "z_loss_coef = 0.01\ncapacity_factor = 0.75");
        let c1 = train(1, &capped, &dir.path().join("t5"), &[]);
        let c2 = train(2, &capped, &dir.path().join("t6"), &["zero.stage=2".into()]);
        assert!(close(&c2, &c1) && c1[0].1 != one[0].1, "{variant}: capped world 2 {c2:?} vs world 1 {c1:?} (dropless {one:?})");
        let rows = std::fs::read_to_string(dir.path().join("t5/metrics.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
        assert!(first["moe_dropped"].as_f64().is_some_and(|d| d > 0.0), "{variant}: {first}");
    }
}

#[test]
fn bad_or_misplaced_moe_settings_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (variant, moe, needle) in [
        ("mixtral", "capacity_factor = 0", "moe.capacity_factor"),
        ("mixtral", "z_loss_coef = -0.001", "moe.z_loss_coef"),
        ("qwen3", "aux_loss = true", "has no experts"),
        ("qwen3", "", "parallel.ep = 2"),
    ] {
        let cfg = config(dir.path(), variant, moe);
        let track = dir.path().join("refused");
        // Expert parallelism for a dense model (world 2); the others at world 1.
        let (world, extra) = if moe.is_empty() { (2, vec!["parallel.ep=2".to_string()]) } else { (1, vec![]) };
        let f = run(&mut train_command(world, &cfg, &track, &extra), std::time::Duration::from_secs(120));
        assert_eq!(f.status.code(), Some(2), "{variant} {moe}: {}\n{}", f.stdout, f.stderr);
        // One line (each rank's the same at world 2).
        let mut errors: Vec<&str> = f.stderr.lines().filter(|l| l.contains("error:")).map(|l| l.split_once("error:").map_or(l, |x| x.1)).collect();
        errors.dedup();
        assert!(errors.len() == 1 && errors[0].contains(needle), "{variant} {moe}: one line naming {needle}, got:\n{}", f.stderr);
        assert!(!track.exists(), "nothing written");
    }
}

/// Every tensor of a safetensors file, as (name, dtype, shape, raw bytes), sorted by name.
fn tensors(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st.tensors().into_iter().map(|(name, view)| (name, format!("{:?}", view.dtype()), view.shape().to_vec(), view.data().to_vec())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Import `src` (2 ranks, stage 3, 0 steps: the imported weights saved; `extra` settings) and export it to `out`.
fn import_export(dir: &Path, src: &Path, out: &Path, extra: &[&str]) {
    let model = format!("seq_len = 8\ninit_from = \"{}\"\ntokenizer = \"{}\"", src.display(), word_tokenizer(dir).display());
    let config = write_config(dir, &model, "steps = 0\nglobal_batch = 2\nmicro_batch = 1\nwarmup = 0");
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let ckpt = dir.join(format!("ckpt-{name}"));
    let mut args = vec![format!("checkpoint.dir={}", ckpt.display()), "zero.stage=3".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    train(2, &config, &dir.join(format!("track-{name}")), &args);
    let f = run(support::ferrospeed().args(["checkpoint", "export"]).arg(&ckpt).arg(out).args(["--dtype", "f32"]), std::time::Duration::from_secs(60));
    assert!(f.status.success(), "export failed:\n{}\n{}", f.stdout, f.stderr);
}

#[test]
fn import_then_export_is_bit_identical_in_both_expert_layouts() {
    let dir = tempfile::tempdir().unwrap();
    for variant in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "qwen3"] {
        let src = fixture(variant);
        // The Hub's per-expert layout in, the same out: every tensor bit for bit, config.json key by key.
        let out = dir.path().join(variant);
        // Expert parallelism in the saving run (each rank's file holds half the experts) changes nothing.
        let ep: &[&str] = if variant == "qwen3" { &[] } else { &["parallel.ep=2"] };
        import_export(dir.path(), &src, &out, ep);
        assert_eq!(tensors(&out.join("model.safetensors")), tensors(&src.join("model.safetensors")), "{variant}: per-expert layout");
        let json = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
        let (got, want) = (json(&out.join("config.json")), json(&src.join("config.json")));
        for (k, v) in want.as_object().unwrap() {
            assert_eq!(got.get(k), Some(v), "{variant}: config.json key {k}");
        }
        // transformers 5's fused layout in (the fused file alone in a directory), the same out.
        let fused_file = src.join("model_fused.safetensors");
        if fused_file.exists() {
            let fused = dir.path().join(format!("{variant}-fused-src"));
            std::fs::create_dir_all(&fused).unwrap();
            std::fs::copy(src.join("config.json"), fused.join("config.json")).unwrap();
            std::fs::copy(&fused_file, fused.join("model.safetensors")).unwrap();
            let out = dir.path().join(format!("{variant}-fused"));
            import_export(dir.path(), &fused, &out, &[]);
            assert_eq!(tensors(&out.join("model.safetensors")), tensors(&fused_file), "{variant}: fused layout");
        }
    }
}
