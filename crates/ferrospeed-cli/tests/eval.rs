//! Evaluation during `train`: the held-out loss is the loss of the held-out data as training computes
//! it, the same at world 1, world 2 (ZeRO-3) and a two-stage pipeline; `data.eval_split` holds data
//! out the same way at any world size; held-out data too small for one global batch is one line;
//! early stopping stops where its rule says and `checkpoint.keep_best` keeps the best checkpoint,
//! across a resume.

mod support;

use std::path::Path;
use std::time::Duration;
use support::*;

const GPT: &str = "kind = \"gpt\"\nn_layer = 2\nn_head = 2\nd_model = 32\nseq_len = 32";

/// `data prepare` of `docs` short documents (JSONL) into `dir/data`.
fn prepared_docs(dir: &Path, docs: usize) -> std::path::PathBuf {
    let text: String = (0..docs).map(|i| serde_json::json!({"text": format!("doc {i}: {}", "xyz".repeat(i % 7 + 1))}).to_string() + "\n").collect();
    std::fs::write(dir.join("docs.jsonl"), text).unwrap();
    let out = dir.join("data");
    let f = run(ferrospeed().args(["data", "prepare"]).arg(dir.join("docs.jsonl")).args(["--tokenizer", "bytes", "--out"]).arg(&out), Duration::from_secs(120));
    assert!(f.status.success(), "{}", f.stderr);
    out
}

/// (step, loss, eval_loss) of each row.
fn rows(track: &Path) -> Vec<(u64, f64, Option<f64>)> {
    std::fs::read_to_string(track.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v.get("eval_loss").and_then(|e| e.as_f64()))
        })
        .collect()
}

fn run_train(dir: &Path, config: &Path, name: &str, nproc: usize, sets: &[String]) -> Vec<(u64, f64, Option<f64>)> {
    let track = dir.join(name);
    let f = run(&mut train_command(nproc, config, &track, sets), Duration::from_secs(300));
    assert!(f.status.success(), "{name}: {}\n{}", f.stdout, f.stderr);
    rows(&track)
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-6 * b.abs(), "{what}: {a} vs {b}");
}

#[test]
fn the_eval_loss_is_the_held_out_datas_loss_at_any_world_size_and_pipeline() {
    // Twelve padded documents (loss masks: the mean over every counted target), evaluated whole
    // (eval_path = the training data) after a step that trains on all twelve at a learning rate too
    // small to move the loss: the eval loss must be that step's own loss, computed by the training path.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = prepared_docs(d, 12);
    let config = write_config(d, GPT, "steps = 2\nglobal_batch = 12\nmicro_batch = 2\nwarmup = 0\nlr = 1e-20");
    let sets = |extra: &[&str]| -> Vec<String> {
        [format!("data.path={}", data.display()), "data.packing=false".into(), format!("data.eval_path={}", data.display()), "train.eval_every=1".into()]
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let one = run_train(d, &config, "w1", 1, &sets(&[]));
    assert_eq!(one.len(), 2);
    for (step, loss, eval) in &one {
        let eval = eval.unwrap_or_else(|| panic!("step {step} has no eval_loss"));
        close(eval, *loss, &format!("step {step}: eval loss vs the step's training loss"));
    }
    // Every shape evaluates the same samples to the same loss.
    for (name, nproc, extra) in [("w2-zero3", 2, &["zero.stage=3"][..]), ("pp2", 2, &["parallel.pp=2"]), ("pp2-zb", 2, &["parallel.pp=2", "parallel.pp_schedule=zb"]), ("pp2-interleaved", 2, &["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2"])] {
        let got = run_train(d, &config, name, nproc, &sets(extra));
        for ((step, _, e), (_, _, want)) in got.iter().zip(&one) {
            close(e.unwrap(), want.unwrap(), &format!("{name} step {step}"));
        }
    }
}

#[test]
fn eval_split_holds_out_the_same_samples_at_any_world_size_and_too_few_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = prepared_docs(d, 16);
    let config = write_config(d, GPT, "steps = 3\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 0\nlr = 3e-3");
    let sets = |split: &str| vec![format!("data.path={}", data.display()), "data.packing=false".into(), format!("data.eval_split={split}"), "train.eval_every=1".into()];
    // A quarter of 16 documents: one global batch held out, 12 to train on (3 steps: one epoch).
    let one = run_train(d, &config, "w1", 1, &sets("0.25"));
    let two = run_train(d, &config, "w2", 2, &sets("0.25"));
    for ((step, l1, e1), (_, l2, e2)) in one.iter().zip(&two) {
        close(*l2, *l1, &format!("step {step} training loss, world 2 vs 1"));
        close(e2.unwrap(), e1.unwrap(), &format!("step {step} eval loss, world 2 vs 1"));
    }
    // Packed: a quarter of 64 documents held out whole, packed apart from the other 48.
    let many_dir = d.join("many");
    std::fs::create_dir(&many_dir).unwrap();
    let many = prepared_docs(&many_dir, 64);
    let packed = |nproc: usize| run_train(d, &config, &format!("packed{nproc}"), nproc, &[format!("data.path={}", many.display()), "data.eval_split=0.25".into(), "train.eval_every=1".into()]);
    let (p1, p2) = (packed(1), packed(2));
    for ((step, _, e1), (_, _, e2)) in p1.iter().zip(&p2) {
        close(e2.unwrap(), e1.unwrap(), &format!("packed step {step} eval loss, world 2 vs 1"));
    }
    // Raw text: the corpus's last tokens.
    let text = run_train(d, &config, "text", 1, &["data.eval_split=0.2".to_string(), "train.eval_every=3".into()]);
    assert!(text[2].2.is_some() && text[0].2.is_none(), "evaluated at step 3 only: {text:?}");
    // `runs` shows the last held-out loss.
    let f = run(ferrospeed().arg("runs").arg(d.join("text")), Duration::from_secs(30));
    assert!(f.stdout.contains("eval loss") && f.stdout.contains(&format!("{:.4}", text[2].2.unwrap())), "{}", f.stdout);
    // 10% of 16 documents is 2, fewer than one global batch of 4.
    let track = d.join("refused");
    let f = run(&mut train_command(1, &config, &track, &sets("0.1")), Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    let errors: Vec<&str> = f.stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "{}", f.stderr);
    assert!(errors[0].contains("data.eval_split = 0.1 of data.path holds 2 samples, fewer than one global batch of 4"), "{}", errors[0]);
    assert!(!track.exists(), "nothing is written");
}

/// `data prepare` of JSONL `lines` into `dir/NAME`.
fn prepared_jsonl(dir: &Path, name: &str, lines: impl Iterator<Item = String>) -> std::path::PathBuf {
    let input = dir.join(format!("{name}.jsonl"));
    std::fs::write(&input, lines.map(|t| serde_json::json!({ "text": t }).to_string() + "\n").collect::<String>()).unwrap();
    let out = dir.join(name);
    let f = run(ferrospeed().args(["data", "prepare"]).arg(&input).args(["--tokenizer", "bytes", "--out"]).arg(&out), Duration::from_secs(120));
    assert!(f.status.success(), "{}", f.stderr);
    out
}

#[test]
fn early_stopping_and_keep_best_follow_the_held_out_loss_across_a_resume() {
    // Sixteen short documents overfit at lr 1e-2 while the loss on other text rises after a few
    // steps: with patience 3 the run stops at the third evaluation after the best one, keeping the
    // best checkpoint beside the latest.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train_data = prepared_jsonl(d, "train", (0..16).map(|i| format!("doc {i}: {}", "xyz".repeat(i % 7 + 1))));
    let eval_data = prepared_jsonl(d, "eval", (0..16).map(|i| format!("The quick brown fox {i} jumps over the lazy dog.")));
    let model = GPT.replace("seq_len = 32", "seq_len = 64");
    let config = write_config(d, &model, "steps = 40\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 0\nlr = 1e-2\nmin_lr = 1e-2");
    let ck = d.join("ck");
    let sets = |steps: usize| -> Vec<String> {
        vec![
            format!("data.path={}", train_data.display()),
            "data.packing=false".into(),
            format!("data.eval_path={}", eval_data.display()),
            "train.eval_every=2".into(),
            "train.early_stopping_patience=3".into(),
            format!("train.steps={steps}"),
            format!("checkpoint.dir={}", ck.display()),
            "checkpoint.every=2".into(),
            "checkpoint.keep=1".into(),
            "checkpoint.keep_best=true".into(),
        ]
    };
    let whole = run_train(d, &config, "whole", 1, &sets(40));
    // The rule, replayed on the logged held-out losses.
    let (mut best, mut bad, mut best_step, mut stop) = (f64::INFINITY, 0, 0, None);
    for (step, _, e) in &whole {
        let Some(e) = e else { continue };
        if *e < best {
            (best, bad, best_step) = (*e, 0, *step);
        } else {
            bad += 1;
        }
        if bad == 3 {
            stop = Some(*step);
            break;
        }
    }
    let stop = stop.expect("the held-out loss never stopped improving: the test cannot see early stopping");
    assert_eq!(whole.last().unwrap().0, stop, "the run stops at the step the rule names: {whole:?}");
    let kept: Vec<String> = std::fs::read_dir(&ck).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("step-")).collect();
    let name = |s: u64| ferrospeed::checkpoint::step_dir_name(s);
    let mut want = vec![name(best_step), name(stop)];
    want.sort();
    let mut kept = kept;
    kept.sort();
    assert_eq!(kept, want, "keep = 1 keeps the latest and the best");
    assert_eq!(std::fs::read_to_string(ck.join("best")).unwrap().trim(), name(best_step));
    // The same command again: nothing to train.
    let f = run(&mut train_command(1, &config, &d.join("whole"), &sets(40)), Duration::from_secs(60));
    assert!(f.status.success() && f.stdout.contains(&format!("stopped early at step {stop}")), "{}\n{}", f.stdout, f.stderr);
    // Other held-out data cannot continue this checkpoint (early stopping's state is about this data).
    let mut other = sets(40);
    other[2] = format!("data.eval_path={}", train_data.display());
    let f = run(&mut train_command(1, &config, &d.join("other"), &other), Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
    assert!(f.stderr.contains("was saved with other held-out data"), "{}", f.stderr);
    // Trained in two parts (the first ends before the stop), it stops at the same step with the
    // same losses: the best loss and the count since survive in the checkpoint.
    std::fs::remove_dir_all(&ck).unwrap();
    let first = run_train(d, &config, "parts", 1, &sets(stop as usize - 2));
    let rest = run_train(d, &config, "parts", 1, &sets(40));
    assert_eq!((first.last().unwrap().0, rest.len()), (stop - 2, whole.len()), "the first part ends two steps before the stop; the run dir holds every step");
    for (a, b) in rest.iter().zip(&whole) {
        assert_eq!((a.0, a.1.to_bits(), a.2.map(f64::to_bits)), (b.0, b.1.to_bits(), b.2.map(f64::to_bits)), "resumed run vs whole");
    }
}

#[test]
fn keep_best_ranks_the_checkpoint_saved_at_the_end_of_the_run() {
    // Evaluated on its own training data the held-out loss falls at every evaluation, so the best is
    // the last: the checkpoint the run saves when it ends at step 5 (between checkpoint.every).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = prepared_docs(d, 8);
    let config = write_config(d, GPT, "steps = 5\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 0\nlr = 3e-3");
    let ck = d.join("ck");
    let sets = vec![
        format!("data.path={}", data.display()),
        "data.packing=false".into(),
        format!("data.eval_path={}", data.display()),
        "train.eval_every=2".into(),
        format!("checkpoint.dir={}", ck.display()),
        "checkpoint.every=2".into(),
        "checkpoint.keep=1".into(),
        "checkpoint.keep_best=true".into(),
    ];
    let rows = run_train(d, &config, "run", 1, &sets);
    let evals: Vec<(u64, f64)> = rows.iter().filter_map(|r| r.2.map(|e| (r.0, e))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4, 5]);
    assert!(evals[2].1 < evals[1].1 && evals[1].1 < evals[0].1, "the held-out loss falls: {evals:?}");
    assert_eq!(std::fs::read_to_string(ck.join("best")).unwrap().trim(), ferrospeed::checkpoint::step_dir_name(5));
}
