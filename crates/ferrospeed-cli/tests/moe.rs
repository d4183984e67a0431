//! Mixture-of-experts models through `launch train`: a Hub checkpoint in the per-expert layout
//! (`model.init_from`, the fixtures of ferrospeed-models' `make_moe_fixtures.py`) trains at world 1
//! and 2 with the same losses (1e-6; stages 0 and 3), `[moe] aux_loss = true` adds the load-balancing
//! loss (a higher loss than without it), and `[moe]` keys not built yet, or `[moe]` on a model without
//! experts, are refused in one line with nothing written.

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
        let two = train(2, &plain, &dir.path().join("t2"), &["zero.stage=3".into()]);
        assert!(close(&two, &one), "{variant}: world 2 stage 3 {two:?} vs world 1 {one:?}");
        let aux = config(dir.path(), variant, "aux_loss = true\naux_loss_coef = 0.5");
        let with = train(1, &aux, &dir.path().join("t3"), &[]);
        assert!(with[0].1 > one[0].1 + 1e-3, "{variant}: the first step's loss with the aux loss {} vs without {}", with[0].1, one[0].1);
        let with2 = train(2, &aux, &dir.path().join("t4"), &[]);
        assert!(close(&with2, &with), "{variant}: with the aux loss, world 2 {with2:?} vs world 1 {with:?}");
    }
}

#[test]
fn moe_settings_not_built_or_misplaced_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (variant, moe, needle) in [
        ("mixtral", "capacity_factor = 1.25", "moe.capacity_factor"),
        ("mixtral", "z_loss_coef = 0.001", "moe.z_loss_coef"),
        ("qwen3", "aux_loss = true", "has no experts"),
    ] {
        let cfg = config(dir.path(), variant, moe);
        let track = dir.path().join("refused");
        let f = run(&mut train_command(1, &cfg, &track, &[]), std::time::Duration::from_secs(120));
        assert_eq!(f.status.code(), Some(2), "{variant} {moe}: {}\n{}", f.stdout, f.stderr);
        let errors: Vec<&str> = f.stderr.lines().filter(|l| l.contains("error:")).collect();
        assert!(errors.len() == 1 && errors[0].contains(needle), "{variant} {moe}: one line naming {needle}, got:\n{}", f.stderr);
        assert!(!track.exists(), "nothing written");
    }
}
