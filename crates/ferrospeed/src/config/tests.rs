//! Tests of config loading: valid files, defaults, overrides, a corpus of broken inputs, batch arithmetic.
//!
//! Broken inputs are data (`BAD`): each row is a config text, overrides, and fragments the one-line
//! message must contain, namely the key and a piece of the fix, so a reworded message that loses either
//! fails here.

use std::path::{Path, PathBuf};

use super::validate::batch_alternatives;
use super::*;

/// A path that exists on every machine that builds the crate, for `data.path`.
fn data_path() -> String {
    format!("{}/Cargo.toml", env!("CARGO_MANIFEST_DIR"))
}

/// `[model]` + `[data]`: the smallest valid config. `DATA` in a test text stands for `data_path()`; it is
/// written as a TOML literal string ('…') so backslashes in Windows paths need no escaping.
const MINIMAL: &str = "
[model]
n_layer = 2
n_head = 2
d_model = 64
seq_len = 64

[data]
path = 'DATA'
";

fn parse(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
    let text = text.replace("DATA", &data_path());
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::from_toml_str(&text, "test.toml", &overrides)
}

fn check_ok(text: &str, overrides: &[&str]) -> Config {
    match parse(text, overrides) {
        Ok(config) => config,
        Err(e) => panic!("expected a valid config, got: {e}"),
    }
}

/// Asserts that loading fails with a one-line message containing every fragment.
fn check_err(name: &str, text: &str, overrides: &[&str], fragments: &[&str]) {
    let message = match parse(text, overrides) {
        Ok(config) => panic!("case `{name}`: expected an error, got {config:?}"),
        Err(e) => e.to_string(),
    };
    assert!(!message.contains('\n'), "case `{name}`: message is not one line: {message}");
    for fragment in fragments {
        assert!(message.contains(fragment), "case `{name}`: message lacks `{fragment}`: {message}");
    }
}

#[test]
fn minimal_config_gets_defaults() {
    let config = check_ok(MINIMAL, &[]);
    let expected = Config {
        model: ModelConfig {
            kind: None,
            n_layer: Some(2),
            n_head: Some(2),
            d_model: Some(64),
            n_kv_head: None,
            d_ff: None,
            rope_theta: None,
            tie_embeddings: None,
            seq_len: 64,
            vocab: Vocab::Bytes,
            tokenizer: None,
            init_from: None,
            adapter_from: None,
        },
        data: DataConfig { path: PathBuf::from(data_path()), packing: true, allow_binary: false, eval_path: None, eval_split: 0.0 },
        train: TrainConfig {
            steps: 20,
            global_batch: 16,
            micro_batch: 4,
            lr: 3e-3,
            min_lr: 3e-3 / 10.0, // lr / 10, computed the same way
            warmup: 2,
            weight_decay: 0.1,
            optimizer: OptimizerKind::AdamW,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 1234,
            precision: Precision::Fp32,
            activation_checkpointing: true,
            sample_tokens: 200,
            grad_reduce_dtype: ReduceDtype::Fp32,
            loss_scale_initial: 65536.0,
            loss_scale_growth_interval: 2000,
            loss_scale_backoff: 0.5,
            loss_scale_min: 1.0,
            device: DeviceChoice::Auto,
            eval_every: 0,
            eval_batches: 0,
            early_stopping_patience: 0,
        },
        zero: ZeroConfig {
            stage: ZeroStage::Zero,
            offload_optimizer: Offload::None,
            offload_ratio: 1.0,
            nvme_ratio: None,
            offload_params: Offload::None,
            nvme_dir: None,
            pinned_budget_mb: 0,
        },
        parallel: ParallelConfig { pp: 1, tp: 1, sp: false, cp: 1, cp_kind: ContextKind::Ulysses, ep: 1, pp_schedule: PipelineSchedule::OneFOneB, pp_virtual: 1, pp_split: vec![] },
        checkpoint: CheckpointConfig { dir: None, every: 0, keep: 3, resume: true, save_on_interrupt: true, keep_best: false },
        track: TrackConfig { dir: None, tensorboard: true, backends: vec![TrackBackend::Tensorboard], mlflow_uri: None, mlflow_experiment: None },
        lora: None,
        moe: None,
    };
    assert_eq!(config, expected);
    assert_eq!(config.train, TrainConfig::default());
    assert_eq!(config.checkpoint, CheckpointConfig::default());
    assert!(config.checkpoint.save_on_interrupt);
    assert_eq!(config.train.device, DeviceChoice::Auto);
}

#[test]
fn full_config_sets_every_key() {
    // Every key has a non-default value, so a key the builder forgets to read fails this test.
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("w.safetensors");
    std::fs::write(&weights, b"").expect("write weights");
    let text = format!(
        "
[model]
kind = \"gpt\"
n_layer = 4
n_head = 4
d_model = 128
seq_len = 256
vocab = \"bytes\"
init_from = '{weights}'

[data]
path = '{data}'
eval_split = 0.1

[train]
steps = 100
global_batch = 32
micro_batch = 2
lr = 6e-4
min_lr = 6e-5
warmup = 10
weight_decay = 0.05
beta1 = 0.8
beta2 = 0.99
eps = 1e-6
grad_clip = 0
seed = 7
precision = \"bf16\"
activation_checkpointing = false
sample_tokens = 0
grad_reduce_dtype = \"compute\"
loss_scale_initial = 1024
loss_scale_growth_interval = 500
loss_scale_backoff = 0.25
loss_scale_min = 0.5
device = \"cpu\"
eval_every = 5
eval_batches = 4
early_stopping_patience = 3

[zero]
stage = 3
offload_optimizer = \"nvme\"
offload_ratio = 1
offload_params = \"cpu\"
nvme_dir = \"/\"
pinned_budget_mb = 512

[parallel]
pp = 2
tp = 4
sp = true
cp = 2
cp_kind = \"ring\"
ep = 3
pp_schedule = \"interleaved\"
pp_virtual = 2
pp_split = [3, 2, 2, 1]

[checkpoint]
dir = \"runs/x/ckpt\"
every = 10
keep = 5
resume = false
save_on_interrupt = false
keep_best = true

[track]
dir = \"runs/x\"
tensorboard = false
backends = [\"csv\", \"mlflow\"]
mlflow_uri = \"https://mlflow.example.com/team/\"
mlflow_experiment = \"llama-sft\"
",
        weights = weights.display(),
        data = dir.path().display(),
    );
    let config = check_ok(&text, &[]);
    let expected = Config {
        model: ModelConfig {
            kind: Some(ModelKind::Gpt),
            n_layer: Some(4),
            n_head: Some(4),
            d_model: Some(128),
            n_kv_head: None,
            d_ff: None,
            rope_theta: None,
            tie_embeddings: None,
            seq_len: 256,
            vocab: Vocab::Bytes,
            tokenizer: None,
            init_from: Some(weights.clone()),
            adapter_from: None,
        },
        data: DataConfig { path: dir.path().to_path_buf(), packing: true, allow_binary: false, eval_path: None, eval_split: 0.1 },
        train: TrainConfig {
            steps: 100,
            global_batch: 32,
            micro_batch: 2,
            lr: 6e-4,
            min_lr: 6e-5,
            warmup: 10,
            weight_decay: 0.05,
            optimizer: OptimizerKind::AdamW,
            momentum: 0.9,
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            grad_clip: 0.0,
            seed: 7,
            precision: Precision::Bf16,
            activation_checkpointing: false,
            sample_tokens: 0,
            grad_reduce_dtype: ReduceDtype::Compute,
            loss_scale_initial: 1024.0,
            loss_scale_growth_interval: 500,
            loss_scale_backoff: 0.25,
            loss_scale_min: 0.5,
            device: DeviceChoice::Cpu,
            eval_every: 5,
            eval_batches: 4,
            early_stopping_patience: 3,
        },
        zero: ZeroConfig {
            stage: ZeroStage::Three,
            offload_optimizer: Offload::Nvme,
            offload_ratio: 1.0,
            nvme_ratio: None,
            offload_params: Offload::Cpu,
            nvme_dir: Some(PathBuf::from("/")),
            pinned_budget_mb: 512,
        },
        parallel: ParallelConfig { pp: 2, tp: 4, sp: true, cp: 2, cp_kind: ContextKind::Ring, ep: 3, pp_schedule: PipelineSchedule::Interleaved, pp_virtual: 2, pp_split: vec![3, 2, 2, 1] },
        checkpoint: CheckpointConfig {
            dir: Some("runs/x/ckpt".into()),
            every: 10,
            keep: 5,
            resume: false,
            save_on_interrupt: false,
            keep_best: true,
        },
        track: TrackConfig {
            dir: Some("runs/x".into()),
            tensorboard: false,
            backends: vec![TrackBackend::Csv, TrackBackend::Mlflow],
            mlflow_uri: Some("https://mlflow.example.com/team/".into()),
            mlflow_experiment: Some("llama-sft".into()),
        },
        lora: None,
        moe: None,
    };
    assert_eq!(config, expected);

    let json = serde_json::to_value(&config).expect("serialize");
    assert_eq!(json["zero"]["stage"], 3);
    assert_eq!(json["zero"]["offload_optimizer"], "nvme");
    assert_eq!(json["train"]["precision"], "bf16");
    assert_eq!(json["train"]["grad_reduce_dtype"], "compute");
    assert_eq!(json["train"]["loss_scale_initial"], 1024.0);
    assert_eq!(json["train"]["loss_scale_growth_interval"], 500);
    assert_eq!(json["train"]["loss_scale_backoff"], 0.25);
    assert_eq!(json["train"]["loss_scale_min"], 0.5);
    assert_eq!(json["train"]["device"], "cpu");
    assert_eq!(json["model"]["kind"], "gpt");
    assert_eq!(json["checkpoint"]["dir"], "runs/x/ckpt");
    assert_eq!(json["checkpoint"]["save_on_interrupt"], false);
}

#[test]
fn overrides_apply_before_validation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, "hello").expect("write corpus");
    let data_override = format!("data.path={}", corpus.display());
    let config = check_ok(
        MINIMAL,
        &[
            "train.steps=50",
            "train.lr=1e-4",
            "checkpoint.resume=false",
            &data_override,
            "train.precision=bf16",
            "zero.stage=3",
            "zero.offload_params=\"cpu\"",
            "zero.offload_optimizer=\"cpu\"",
            "track.dir=runs/my run",
            "train.grad_clip=2",
            " model.n_layer = 6 ",
        ],
    );
    assert_eq!(config.train.steps, 50);
    assert_eq!(config.train.lr, 1e-4);
    // min_lr follows an overridden lr when not set itself.
    assert_eq!(config.train.min_lr, 1e-4 / 10.0);
    assert!(!config.checkpoint.resume);
    assert_eq!(config.data.path, corpus);
    assert_eq!(config.train.precision, Precision::Bf16);
    assert_eq!(config.zero.stage, ZeroStage::Three);
    assert_eq!(config.zero.offload_params, Offload::Cpu);
    assert_eq!(config.track.dir, Some(PathBuf::from("runs/my run")));
    assert_eq!(config.train.grad_clip, 2.0);
    assert_eq!(config.model.n_layer, Some(6));

    // A later override wins, and an empty value clears an optional path.
    let config = check_ok(MINIMAL, &["train.steps=5", "train.steps=7", "checkpoint.dir=ck", "checkpoint.dir="]);
    assert_eq!(config.train.steps, 7);
    assert_eq!(config.checkpoint.dir, None);
    // A path that looks like a number stays a path.
    let err = parse(MINIMAL, &["data.path=2024"]).expect_err("2024 does not exist");
    assert!(err.to_string().contains("data.path = \"2024\" does not exist"), "{err}");
}

#[test]
fn load_reads_the_file_and_names_a_missing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("run.toml");
    std::fs::write(&file, MINIMAL.replace("DATA", &data_path())).expect("write config");
    let config = Config::load(&file, &["train.steps=3".to_string()]).expect("valid file");
    assert_eq!(config.train.steps, 3);

    let missing = dir.path().join("nope.toml");
    let message = Config::load(&missing, &[]).expect_err("missing file").to_string();
    assert!(message.contains("nope.toml") && message.contains("--config"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

/// `MINIMAL` with `line` appended (usually a further section).
fn minimal_with(line: &str) -> String {
    format!("{MINIMAL}{line}\n")
}

/// (case, config text, overrides, fragments the message must contain: the key, then the fix).
type BadCase = (&'static str, String, &'static [&'static str], &'static [&'static str]);

fn bad_cases() -> Vec<BadCase> {
    let without = |needle: &str| MINIMAL.lines().filter(|l| !l.contains(needle)).collect::<Vec<_>>().join("\n");
    let model_only = MINIMAL.split("[data]").next().unwrap_or_default().to_string();
    vec![
        ("string for int", minimal_with("[train]\nglobal_batch = \"ten\""), &[], &["train.global_batch = \"ten\"", "expected a positive integer"]),
        ("string for bool", minimal_with("[train]\nactivation_checkpointing = \"yes\""), &[], &["train.activation_checkpointing", "expected true or false"]),
        ("string for float", minimal_with("[train]\nlr = \"fast\""), &[], &["train.lr", "expected a number"]),
        ("float for int", MINIMAL.replace("seq_len = 64", "seq_len = 1.5"), &[], &["model.seq_len = 1.5", "expected a positive integer"]),
        ("number for path", MINIMAL.replace("'DATA'", "3"), &[], &["data.path = 3", "expected a path"]),
        ("section as value", format!("model = 3\n{}", MINIMAL.replace("[model]", "[x]")), &[], &["model = 3", "[model] section"]),
        ("unknown key", minimal_with("[train]\nstpes = 10"), &[], &["train.stpes", "did you mean `train.steps`?"]),
        ("unknown key prefix", minimal_with("[train]\nwarm = 1"), &[], &["train.warm", "did you mean `train.warmup`?"]),
        ("unknown key far", minimal_with("[train]\nbanana = 1"), &[], &["train.banana", "known keys of [train]: steps"]),
        ("unknown section", minimal_with("[trian]\nsteps = 10"), &[], &["`trian`", "did you mean `train`?"]),
        ("key at top level", format!("steps = 10\n{MINIMAL}"), &[], &["`steps`", "did you mean `train.steps`?"]),
        ("negative size", MINIMAL.replace("n_layer = 2", "n_layer = -2"), &[], &["model.n_layer = -2", "must be ≥ 1"]),
        ("zero size", minimal_with("[train]\nglobal_batch = 0"), &[], &["train.global_batch = 0", "must be ≥ 1"]),
        ("string for save_on_interrupt", minimal_with("[checkpoint]\nsave_on_interrupt = \"yes\""), &[], &["checkpoint.save_on_interrupt = \"yes\"", "expected true or false"]),
        ("zero keep", minimal_with("[checkpoint]\nkeep = 0"), &[], &["checkpoint.keep = 0", "must be ≥ 1"]),
        ("negative count", minimal_with("[train]\nwarmup = -1"), &[], &["train.warmup = -1", "must be ≥ 0"]),
        ("n_head not dividing", MINIMAL.replace("n_head = 2", "n_head = 3"), &[], &["model.n_head = 3 does not divide model.d_model = 64", "use an n_head among", "2, 4"]),
        ("missing data path key", model_only, &[], &["data.path", "add `path = "]),
        ("nonexistent data path", MINIMAL.replace("'DATA'", "'no/such/x.txt'"), &[], &["data.path = \"no/such/x.txt\" does not exist", "point it at a text file"]),
        ("nonexistent init_from", MINIMAL.replace("seq_len = 64", "seq_len = 64\ninit_from = 'no.safetensors'"), &[], &["model.init_from", "point it at a safetensors file"]),
        ("missing [model]", MINIMAL.replace("[model]", "[train]").replace("n_layer = 2\nn_head = 2\nd_model = 64\nseq_len = 64", ""), &[], &["[model]", "add a [model] section with n_layer"]),
        ("missing model.n_layer", without("n_layer"), &[], &["model.n_layer", "add `n_layer = "]),
        ("bad precision", minimal_with("[train]\nprecision = \"fp8\""), &[], &["train.precision = \"fp8\"", "use \"fp32\", \"bf16\" or \"fp16\""]),
        ("bad model kind", MINIMAL.replace("[model]", "[model]\nkind = \"mamba\""), &[], &["model.kind = \"mamba\"", "\"gpt\"", "\"llama\""]),
        ("kv heads that do not divide", MINIMAL.replace("[model]", "[model]\nkind = \"llama\"\nn_kv_head = 3"), &[], &["model.n_kv_head = 3", "does not divide model.n_head = 2"]),
        ("missing tokenizer", MINIMAL.replace("[model]", "[model]\ntokenizer = 'nope.json'"), &[], &["model.tokenizer", "does not exist"]),
        ("zero.stage = 5", minimal_with("[zero]\nstage = 5"), &[], &["zero.stage = 5", "use 0, 1, 2 or 3"]),
        ("zero.stage string", minimal_with("[zero]\nstage = \"3\""), &[], &["zero.stage = \"3\"", "expected an integer 0, 1, 2 or 3"]),
        ("offload_params without stage 3", minimal_with("[zero]\nstage = 2\noffload_params = \"cpu\""), &[], &["zero.offload_params", "needs zero.stage = 3", "set zero.stage = 3"]),
        ("nvme_ratio without nvme", minimal_with("[zero]\noffload_optimizer = \"cpu\"\nnvme_ratio = 0.5"), &[], &["zero.nvme_ratio = 0.5", "needs zero.offload_optimizer = \"nvme\""]),
        ("nvme_ratio above offload_ratio", minimal_with("[zero]\noffload_optimizer = \"nvme\"\noffload_ratio = 0.5\nnvme_ratio = 0.7\nnvme_dir = \"/tmp\""), &[], &["zero.nvme_ratio = 0.7", "(0, zero.offload_ratio = 0.5]"]),
        ("nvme_ratio zero", minimal_with("[zero]\noffload_optimizer = \"nvme\"\nnvme_ratio = 0\nnvme_dir = \"/tmp\""), &[], &["zero.nvme_ratio = 0", "must be in"]),
        ("params on nvme, state on cpu", minimal_with("[zero]\nstage = 3\noffload_optimizer = \"cpu\"\noffload_params = \"nvme\"\nnvme_dir = \"/tmp\""), &[], &["zero.offload_params = \"nvme\"", "needs the optimizer state on NVMe too"]),
        ("nvme without nvme_dir", minimal_with("[zero]\noffload_optimizer = \"nvme\""), &[], &["zero.offload_optimizer", "needs zero.nvme_dir", "set zero.nvme_dir"]),
        ("min_lr above lr", minimal_with("[train]\nlr = 1e-3\nmin_lr = 1e-2"), &[], &["train.min_lr = 0.01", "use a value between 0 and 0.001"]),
        ("warmup above steps", minimal_with("[train]\nsteps = 10\nwarmup = 30"), &[], &["train.warmup = 30", "use train.warmup ≤ 10"]),
        ("micro above global", minimal_with("[train]\nglobal_batch = 8\nmicro_batch = 16"), &[], &["train.micro_batch = 16", "use train.micro_batch ≤ 8"]),
        ("zero lr", minimal_with("[train]\nlr = 0"), &[], &["train.lr = 0", "must be a finite number > 0"]),
        ("nan lr", minimal_with("[train]\nlr = nan"), &[], &["train.lr = NaN", "must be a finite number > 0"]),
        ("beta1 = 1", minimal_with("[train]\nbeta1 = 1.0"), &[], &["train.beta1 = 1", "must be in [0, 1)"]),
        ("negative grad_clip", minimal_with("[train]\ngrad_clip = -1"), &[], &["train.grad_clip = -1", "must be a finite number ≥ 0"]),
        ("zero eps", minimal_with("[train]\neps = 0.0"), &[], &["train.eps = 0", "must be a finite number > 0"]),
        ("bad grad_reduce_dtype", minimal_with("[train]\ngrad_reduce_dtype = \"fp64\""), &[], &["train.grad_reduce_dtype = \"fp64\"", "use \"fp32\" or \"compute\""]),
        ("bad device", minimal_with("[train]\ndevice = \"gpu\""), &[], &["train.device = \"gpu\"", "use \"auto\", \"cpu\" or \"cuda\""]),
        ("loss_scale_backoff = 1.5", minimal_with("[train]\nloss_scale_backoff = 1.5"), &[], &["train.loss_scale_backoff = 1.5", "must be strictly between 0 and 1"]),
        ("loss_scale_min above initial", minimal_with("[train]\nloss_scale_initial = 4\nloss_scale_min = 8"), &[], &["train.loss_scale_min = 8 is above train.loss_scale_initial = 4", "use train.loss_scale_min ≤ 4"]),
        ("zero loss_scale_growth_interval", minimal_with("[train]\nloss_scale_growth_interval = 0"), &[], &["train.loss_scale_growth_interval = 0", "must be ≥ 1"]),
        ("negative loss_scale_initial", minimal_with("[train]\nloss_scale_initial = -1"), &[], &["train.loss_scale_initial = -1", "must be a finite number > 0"]),
        ("gpt2 vocab", MINIMAL.replace("[model]", "[model]\nvocab = \"gpt2\""), &[], &["model.vocab = \"gpt2\" is not built in", "model.tokenizer"]),
        ("toml syntax", MINIMAL.replace("d_model = 64", "d_model = = 64"), &[], &["test.toml at line 5, column", "fix the syntax"]),
        ("unclosed string", MINIMAL.replace("'DATA'", "\"abc"), &[], &["test.toml at line 9", "fix the syntax"]),
        ("--set without =", MINIMAL.to_string(), &["train.steps"], &["--set train.steps`", "expected the form `--set train.steps=50`"]),
        ("--set without section", MINIMAL.to_string(), &["steps=5"], &["--set steps=5", "expected the form `--set train.steps=50`"]),
        ("--set empty key", MINIMAL.to_string(), &["train.=5"], &["--set train.=5", "expected the form"]),
        ("--set unknown key", MINIMAL.to_string(), &["train.stpes=5"], &["train.stpes", "--set train.stpes=5", "did you mean `train.steps`?"]),
        ("--set unknown section", MINIMAL.to_string(), &["trian.steps=5"], &["trian", "did you mean `train`?"]),
        ("--set wrong type", MINIMAL.to_string(), &["train.micro_batch=ten"], &["train.micro_batch = \"ten\"", "expected a positive integer"]),
        ("--set zero size", MINIMAL.to_string(), &["train.micro_batch=0"], &["train.micro_batch = 0", "must be ≥ 1"]),
        ("--set bad enum", MINIMAL.to_string(), &["zero.offload_optimizer=disk"], &["zero.offload_optimizer = \"disk\"", "use \"none\", \"cpu\" or \"nvme\""]),
        ("mlflow_uri not http", minimal_with("[track]\nmlflow_uri = \"mlruns\""), &[], &["track.mlflow_uri = \"mlruns\" is not an http or https URL", "http://127.0.0.1:5000"]),
        ("mlflow_uri no host", minimal_with("[track]\nmlflow_uri = \"http://:5000\""), &[], &["track.mlflow_uri", "has no host"]),
        ("mlflow_uri bad port", MINIMAL.to_string(), &["track.mlflow_uri=http://host:50000000"], &["track.mlflow_uri = \"http://host:50000000\"", "port"]),
        ("mlflow_uri with credentials", minimal_with("[track]\nmlflow_uri = \"https://me:secret@host\""), &[], &["track.mlflow_uri", "MLFLOW_TRACKING_USERNAME"]),
        ("mlflow_uri typo", minimal_with("[track]\nmlflow_url = \"http://host:5000\""), &[], &["track.mlflow_url", "did you mean `track.mlflow_uri`?"]),
        ("mlflow_uri number", minimal_with("[track]\nmlflow_uri = 5000"), &[], &["track.mlflow_uri = 5000", "expected a string"]),
        ("empty mlflow_experiment", minimal_with("[track]\nmlflow_experiment = \" \""), &[], &["track.mlflow_experiment", "name the experiment"]),
    ]
}

#[test]
fn malformed_configs_name_the_key_and_the_fix() {
    let cases = bad_cases();
    assert!(cases.len() >= 18);
    for (name, text, overrides, fragments) in cases {
        check_err(name, &text, overrides, fragments);
    }
}

#[test]
fn accumulation_steps_divides_or_proposes_valid_values() {
    let mut config = check_ok(MINIMAL, &[]);
    assert_eq!(config.accumulation_steps(1), Ok(4));
    assert_eq!(config.accumulation_steps(2), Ok(2));
    assert_eq!(config.accumulation_steps(4), Ok(1));
    assert!(config.accumulation_steps(0).is_err());

    config.train.global_batch = 10;
    let message = config.accumulation_steps(2).expect_err("10 / 8").to_string();
    assert_eq!(
        message,
        "train.global_batch = 10 is not divisible by train.micro_batch (4) × world size (2) = 8: \
         use train.global_batch = 8 or 16, or train.micro_batch = 1 (or 5)"
    );

    // Over a grid, every proposed value must divide, and every failure must propose at least one.
    for global in 1..=48 {
        for micro in 1..=8 {
            for world in 1..=8 {
                let steps = super::validate::accumulation_steps(global, micro, world);
                if global % (micro * world) == 0 {
                    assert_eq!(steps, Ok(global / (micro * world)));
                    continue;
                }
                let message = steps.expect_err("does not divide").to_string();
                let (globals, micros) = batch_alternatives(global, micro, world);
                assert!(!globals.is_empty(), "no alternative for {global}/{micro}/{world}");
                for g in globals {
                    assert!(message.contains(&g.to_string()), "{message}");
                    assert!(super::validate::accumulation_steps(g, micro, world).is_ok(), "{g}/{micro}/{world}");
                }
                for m in micros {
                    assert!(message.contains(&format!("{m}")), "{message}");
                    assert!(m <= global, "{m} > {global}");
                    assert!(super::validate::accumulation_steps(global, m, world).is_ok(), "{global}/{m}/{world}");
                }
            }
        }
    }
    // Absurd inputs answer quickly and without overflow.
    assert!(super::validate::accumulation_steps(usize::MAX, 2, usize::MAX).is_err());
    assert!(super::validate::accumulation_steps(usize::MAX, 1, 2).is_err());
}

#[test]
fn names_round_trip_and_suggestions_are_close() {
    for name in Precision::NAMES {
        assert_eq!(Precision::from_name(name).map(Precision::name), Some(*name));
    }
    for name in ReduceDtype::NAMES {
        assert_eq!(ReduceDtype::from_name(name).map(ReduceDtype::name), Some(*name));
    }
    for name in DeviceChoice::NAMES {
        assert_eq!(DeviceChoice::from_name(name).map(DeviceChoice::name), Some(*name));
    }
    for name in Offload::NAMES {
        assert_eq!(Offload::from_name(name).map(Offload::name), Some(*name));
    }
    for name in Vocab::NAMES.iter().chain(ModelKind::NAMES) {
        assert!(Vocab::from_name(name).is_some() || ModelKind::from_name(name).is_some());
    }
    for n in 0..=3 {
        assert_eq!(ZeroStage::from_int(n).map(|s| i64::from(s.as_int())), Some(n));
    }
    assert_eq!(super::schema::edit_distance("stpes", "steps"), 2);
    assert_eq!(super::schema::edit_distance("", "abc"), 3);
    assert_eq!(super::schema::closest("Steps", ["steps", "seed"].into_iter()), Some("steps"));
    assert_eq!(super::schema::closest("zzz", ["steps", "seed"].into_iter()), None);
    assert!(Path::new(&data_path()).exists());
}

#[test]
fn errors_name_the_key_they_are_about() {
    let key = |text: &str| parse(text, &[]).unwrap_err().key().map(str::to_string);
    assert_eq!(key(&minimal_with("[train]\nmicro_batch = 0")).as_deref(), Some("train.micro_batch"));
    assert_eq!(key(&minimal_with("[train]\nsteps = \"many\"")).as_deref(), Some("train.steps"));
    assert_eq!(key(&MINIMAL.replace("DATA", "/no/such/text")).as_deref(), Some("data.path"));
    // Errors of the whole file name none.
    assert_eq!(key("[model"), None);
    assert_eq!(key("[data]\npath = 'DATA'\n"), None);
}

#[test]
fn mlflow_goes_to_the_key_then_the_environment_then_the_file_store() {
    use crate::track::{MlflowServer, MlflowTarget};
    let env = |vars: &'static [(&'static str, &'static str)]| move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
    let target = |sets: &[&str], vars: &'static [(&'static str, &'static str)]| check_ok(MINIMAL, sets).track.outputs_with_env(env(vars)).map(|b| b.mlflow);
    let server = |uri: &str, experiment: &str, source| Ok(Some(MlflowTarget::Server(MlflowServer { uri: uri.into(), experiment: experiment.into(), source })));
    let tracking = &[("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000/"), ("MLFLOW_EXPERIMENT_NAME", "team")];
    // The key turns MLflow on by itself; the experiment falls back to the environment, then "Default".
    assert_eq!(target(&["track.mlflow_uri=http://h:1/"], &[]), server("http://h:1", "Default", "track.mlflow_uri"));
    assert_eq!(target(&["track.mlflow_uri=http://h:1", "track.mlflow_experiment=x"], tracking), server("http://h:1", "x", "track.mlflow_uri"));
    assert_eq!(target(&["track.mlflow_uri=http://h:1"], tracking), server("http://h:1", "team", "track.mlflow_uri"));
    // The environment is read only when "mlflow" is asked for, as MLflow's client reads it.
    assert_eq!(target(&[], tracking), Ok(None));
    assert_eq!(target(&["track.backends=[\"mlflow\"]"], tracking), server("http://10.0.0.1:5000", "team", "MLFLOW_TRACKING_URI"));
    assert_eq!(target(&["track.backends=[\"mlflow\"]"], &[]), Ok(Some(MlflowTarget::FileStore { ignored_env_uri: None })));
    assert_eq!(
        target(&["track.backends=[\"mlflow\"]"], &[("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")]),
        Ok(Some(MlflowTarget::FileStore { ignored_env_uri: Some("file:///tmp/mlruns".into()) }))
    );
    let bad = target(&["track.backends=[\"mlflow\"]"], &[("MLFLOW_TRACKING_URI", "http://")]).unwrap_err().to_string();
    assert!(bad.contains("MLFLOW_TRACKING_URI = \"http://\" has no host"), "{bad}");
    // An empty --set clears the key; the serialised config leaves unset keys out.
    assert_eq!(check_ok(MINIMAL, &["track.mlflow_uri=http://h:1", "track.mlflow_uri="]).track.mlflow_uri, None);
    let json = serde_json::to_value(check_ok(MINIMAL, &[])).unwrap();
    assert!(json["track"].get("mlflow_uri").is_none() && json["track"].get("mlflow_experiment").is_none(), "{json}");
}

#[test]
fn parallel_settings_are_checked_alone_and_against_the_world() {
    let with = |extra: &str| format!("{MINIMAL}\n[parallel]\n{extra}\n");
    check_err("virtual", &with("pp_virtual = 2"), &[], &["parallel.pp_virtual = 2 needs parallel.pp_schedule = \"interleaved\""]);
    check_err("sp", &with("sp = true"), &[], &["parallel.sp = true needs parallel.tp > 1"]);
    check_err("split", &with("pp = 2\npp_split = [1, 2, 3]"), &[], &["lists 3 stages but parallel.pp · pp_virtual = 2"]);
    check_err("zero", &with("pp = 0"), &[], &["parallel.pp = 0"]);
    check_err("negative", &with("pp_split = [2, -1]"), &[], &["is not a positive integer"]);
    check_err("schedule", &with("pp_schedule = \"1F1B\""), &[], &["\"1f1b\""]);
    check_err("typo", &with("ppp = 2"), &[], &["ppp"]);
    let ok = check_ok(&with("pp = 2\ntp = 2\nep = 2"), &[]);
    let e = ok.mesh(6).unwrap_err().to_string();
    assert!(e.contains("world size 6 does not split into pp·tp·cp = 4"), "{e}");
    let e = ok.mesh(8).unwrap_err().to_string();
    assert!(e.contains("parallel.tp = 2 with parallel.ep = 2: tensor and expert parallelism together are not in this build yet"), "{e}");
    assert_eq!(check_ok(&with("pp = 2\ntp = 2"), &[]).mesh(8).unwrap().size(crate::parallel::Axis::Dp), 2);
    assert_eq!(check_ok(&with("tp = 2\ncp = 2"), &[]).mesh(4).unwrap().size(crate::parallel::Axis::Cp), 2);
    let e = check_ok(&with("tp = 2\ncp = 2\nsp = true"), &[]).mesh(4).unwrap_err().to_string();
    assert!(e.contains("parallel.sp with parallel.cp = 2: sequence and context parallelism together are not in this build yet"), "{e}");
    let e = check_ok(&with("pp = 2\ncp = 2"), &[]).mesh(4).unwrap_err().to_string();
    assert!(e.contains("parallel.cp = 2 with parallel.pp = 2: context parallelism combined with another axis"), "{e}");
    assert_eq!(check_ok(&with("cp = 2\ncp_kind = \"ring\""), &[]).mesh(4).unwrap().size(crate::parallel::Axis::Cp), 2);
    assert_eq!(check_ok(&with("cp = 2"), &[]).mesh(4).unwrap().size(crate::parallel::Axis::Cp), 2);
    check_err("cp_kind", &with("cp_kind = \"rings\""), &[], &["\"ring\""]);
    assert_eq!(check_ok(&with("tp = 2"), &[]).mesh(4).unwrap().size(crate::parallel::Axis::Dp), 2);
    let pp = check_ok(&with("pp = 2"), &[]);
    assert_eq!(pp.mesh(4).unwrap().size(crate::parallel::Axis::Dp), 2);
    let zb = check_ok(&with("pp = 2
pp_schedule = \"zb\""), &[]);
    assert_eq!(zb.mesh(4).unwrap().size(crate::parallel::Axis::Pp), 2, "the zero-bubble schedule runs");
    let dp = check_ok(MINIMAL, &["parallel.pp=1"]);
    assert_eq!(dp.mesh(3).unwrap(), crate::parallel::Mesh::data_parallel(3));
}

#[test]
fn evaluation_settings_are_checked() {
    check_err("split range", MINIMAL, &["data.eval_split=1.5"], &["data.eval_split = 1.5 is not a fraction in [0, 1)"]);
    check_err("two sources", MINIMAL, &["data.eval_split=0.1", &format!("data.eval_path={}", data_path())], &["two sources of held-out data"]);
    check_err("nothing to evaluate", MINIMAL, &["train.eval_every=10"], &["train.eval_every = 10 has no held-out data", "data.eval_path or data.eval_split"]);
    check_err("missing", MINIMAL, &["data.eval_path=/no/such/eval"], &["data.eval_path", "does not exist"]);
    check_err("batches without data", MINIMAL, &["train.eval_batches=3"], &["train.eval_batches = 3 has no held-out data"]);
    check_err("patience without data", MINIMAL, &["train.early_stopping_patience=2"], &["train.early_stopping_patience = 2 has no held-out data"]);
    check_err("patience without evals", MINIMAL, &["data.eval_split=0.1", "train.early_stopping_patience=2"], &["needs evaluations during training", "train.eval_every"]);
    check_err("best without data", MINIMAL, &["checkpoint.keep_best=true"], &["checkpoint.keep_best = true has no held-out data"]);
    check_err("best between evals", MINIMAL, &["data.eval_split=0.1", "train.eval_every=4", "checkpoint.dir=ck", "checkpoint.every=6", "checkpoint.keep_best=true"], &["needs a held-out loss at every checkpoint"]);
    check_ok(MINIMAL, &["data.eval_split=0.1", "train.eval_every=3", "checkpoint.dir=ck", "checkpoint.every=6", "checkpoint.keep_best=true", "train.early_stopping_patience=2"]);
    let ok = check_ok(MINIMAL, &["data.eval_split=0.05", "train.eval_every=10", "train.eval_batches=2"]);
    assert_eq!((ok.data.eval_split, ok.train.eval_every, ok.train.eval_batches), (0.05, 10, 2));
}

#[test]
fn lora_section_parses_with_peft_defaults_and_refuses_bad_values() {
    let base = MINIMAL;
    assert_eq!(check_ok(base, &[]).lora, None);
    let l = check_ok(&format!("{base}[lora]\n"), &[]).lora.unwrap();
    assert_eq!(l, super::LoraConfig::default());
    let l = check_ok(&format!("{base}[lora]\nr = 16\nalpha = 32\ntargets = [\"q_proj\", \"model.layers.*.mlp.*\"]\nrslora = true\n"), &[]).lora.unwrap();
    assert_eq!((l.r, l.alpha, l.rslora, l.targets.len()), (16, 32.0, true, 2));
    let l = check_ok(base, &["lora.targets=v_proj", "lora.r=4"]).lora.unwrap();
    assert_eq!((l.r, l.targets), (4, vec!["v_proj".to_string()]));
    for (text, want) in [
        ("r = 0", "lora.r"),
        ("r = -2", "lora.r"),
        ("alpha = 0", "lora.alpha"),
        ("dropout = 1.5", "lora.dropout"),
        ("targets = []", "lora.targets"),
        ("targets = [1]", "lora.targets"),
        ("base = \"nf8\"", "lora.base"),
        ("rank = 8", "lora.rank"),
        ("dropout = 0.05", "not built yet"),
        ("base = \"nf4\"\n[zero]\nstage = 3", "zero.stage = 3"),
    ] {
        check_err(text, &format!("{base}[lora]\n{text}\n"), &[], &[want]);
    }
}
