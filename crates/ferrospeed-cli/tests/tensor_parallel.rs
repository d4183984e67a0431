//! `parallel.tp` through `launch train`, from a transformers directory (GQA: 4 query heads, 2
//! key/value heads): tp 2 trains the losses of one rank within 1e-5, dp 2 × tp 2 at ZeRO-3 (and with
//! `parallel.sp`, at ZeRO-2) those of dp 2, a checkpoint saved at tp 2 resumes at tp 1 on one rank (within 1e-5 of the uninterrupted
//! run) and exports a transformers directory with the source's tensors; tp 4 (which does not divide
//! the key/value heads) and sp with context parallelism are refused in one line. 3D: dp 2 × tp 2 × pp 2
//! on 8 ranks (with sp and the zero-bubble schedule too) trains dp 2's losses within 1e-5, its checkpoint
//! resumes on one rank, and a tp 2 checkpoint resumes at tp 2 × pp 2.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

fn fixture() -> PathBuf {
    fixture_of("gqa_untied")
}

fn fixture_of(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ferrospeed-models/tests/fixtures/hf").join(variant)
}

fn config(dir: &Path) -> PathBuf {
    config_of(dir, "gqa_untied")
}

fn config_of(dir: &Path, variant: &str) -> PathBuf {
    let model = format!("seq_len = 8\ninit_from = \"{}\"\ntokenizer = \"{}\"", fixture_of(variant).display(), word_tokenizer(dir).display());
    write_config(dir, &model, "steps = 4\nglobal_batch = 4\nmicro_batch = 1\nwarmup = 1\nlr = 1e-2")
}

fn close(a: &[(u64, f64)], b: &[(u64, f64)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && (x.1 - y.1).abs() <= 1e-5 * y.1.abs())
}

#[test]
fn tensor_parallel_training_matches_one_rank_resumes_at_tp_1_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let one = train(1, &cfg, &dir.path().join("w1"), &[]);
    assert!(one.len() == 4 && one.iter().all(|(_, l)| l.is_finite()), "{one:?}");
    let ckpt = dir.path().join("ckpt");
    let tp2 = train(2, &cfg, &dir.path().join("tp2"), &["parallel.tp=2".into(), format!("checkpoint.dir={}", ckpt.display()), "checkpoint.every=2".into()]);
    assert!(close(&tp2, &one), "tp 2 {tp2:?} vs one rank {one:?}");
    let dp2 = train(2, &cfg, &dir.path().join("dp2"), &["zero.stage=3".into()]);
    let dp2tp2 = train(4, &cfg, &dir.path().join("dp2tp2"), &["zero.stage=3".into(), "parallel.tp=2".into()]);
    assert!(close(&dp2tp2, &dp2), "dp 2 × tp 2 {dp2tp2:?} vs dp 2 {dp2:?}");
    let sp = train(4, &cfg, &dir.path().join("dp2tp2sp"), &["zero.stage=2".into(), "parallel.tp=2".into(), "parallel.sp=true".into()]);
    assert!(close(&sp, &dp2), "dp 2 × tp 2 with sequence parallelism {sp:?} vs dp 2 {dp2:?}");
    // 3D: two pipelines of two stages, each stage split over two ranks (8 ranks).
    let ckpt3 = dir.path().join("ckpt3d");
    let three = train(8, &cfg, &dir.path().join("3d"), &["parallel.tp=2".into(), "parallel.pp=2".into(), "zero.stage=1".into(), format!("checkpoint.dir={}", ckpt3.display()), "checkpoint.every=2".into()]);
    assert!(close(&three, &dp2), "dp 2 × tp 2 × pp 2 {three:?} vs dp 2 {dp2:?}");
    let three_sp = train(8, &cfg, &dir.path().join("3dsp"), &["parallel.tp=2".into(), "parallel.pp=2".into(), "parallel.sp=true".into(), "parallel.pp_schedule=zb".into()]);
    assert!(close(&three_sp, &dp2), "dp 2 × tp 2 × pp 2 with sp and zb {three_sp:?} vs dp 2 {dp2:?}");
    // Its checkpoint resumes on one rank; the tp 2 one on two pipeline stages of tp 2.
    let root3 = root_with(&ckpt3.join("step-00000002"), &dir.path().join("resume-3d"));
    let resumed3 = train(1, &cfg, &dir.path().join("resumed-3d"), &[format!("checkpoint.dir={}", root3.display())]);
    assert!(close(&resumed3, &one[2..]), "3D resumed at one rank {resumed3:?} vs {:?}", &one[2..]);
    let root2 = root_with(&ckpt.join("step-00000002"), &dir.path().join("resume-tp2"));
    let resumed_pp = train(4, &cfg, &dir.path().join("resumed-pp"), &[format!("checkpoint.dir={}", root2.display()), "parallel.tp=2".into(), "parallel.pp=2".into()]);
    assert!(close(&resumed_pp, &one[2..]), "tp 2 resumed at tp 2 × pp 2 {resumed_pp:?} vs {:?}", &one[2..]);
    // The tp 2 checkpoint of step 2 resumes on one rank.
    let root = root_with(&ckpt.join("step-00000002"), &dir.path().join("resume-from"));
    let resumed = train(1, &cfg, &dir.path().join("resumed"), &[format!("checkpoint.dir={}", root.display())]);
    assert!(close(&resumed, &one[2..]), "tp 2 resumed at tp 1 {resumed:?} vs one rank {:?}", &one[2..]);
    // And exports a transformers directory with the source's tensors and shapes.
    let out = dir.path().join("export");
    let f = run(ferrospeed().args(["checkpoint", "export"]).arg(ckpt.join("step-00000004")).arg(&out), Duration::from_secs(60));
    assert!(f.status.success(), "{}\n{}", f.stdout, f.stderr);
    let shapes = |p: &Path| -> Vec<(String, Vec<usize>)> {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<_> = st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&out.join("model.safetensors")), shapes(&fixture().join("model.safetensors")));
}

/// A head tied to the embedding: in 3D the last stage holds a ghost of the embedding's slices, the
/// tied gradients summed over the stages of each tensor-parallel rank.
#[test]
fn a_tied_head_trains_in_3d_like_data_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_of(dir.path(), "mha_tied");
    let dp2 = train(2, &cfg, &dir.path().join("dp2"), &[]);
    let three = train(8, &cfg, &dir.path().join("3d"), &["parallel.tp=2".into(), "parallel.pp=2".into(), "zero.stage=3".into()]);
    assert!(close(&three, &dp2), "tied, dp 2 × tp 2 × pp 2 {three:?} vs dp 2 {dp2:?}");
}

#[test]
fn tensor_parallel_sizes_that_do_not_fit_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    for (nproc, sets, want) in [
        (4, vec!["parallel.tp=4"], "2 key/value heads (num_key_value_heads), which parallel.tp = 4 does not divide: choose parallel.tp among [1, 2]"),
        (4, vec!["parallel.tp=2", "parallel.cp=2", "parallel.sp=true"], "parallel.sp with parallel.cp = 2: sequence and context parallelism together"),
    ] {
        let sets: Vec<String> = sets.into_iter().map(String::from).collect();
        let f = run(&mut train_command(nproc, &cfg, &dir.path().join("refused"), &sets), Duration::from_secs(120));
        assert!(!f.status.success() && f.stderr.contains(want), "{sets:?}:\n{}\n{}", f.stdout, f.stderr);
    }
}
