//! Run configuration of `ferrospeed train --config FILE [--set key=value ...]`: the typed `Config`.
//!
//! Loading goes in four steps, one file each:
//! 1. `parse.rs` turns the text into a `toml::Table` and applies `--set` overrides to it;
//! 2. `parse.rs` walks the table against the key table in `schema.rs` (unknown keys, wrong types,
//!    integer ranges) and builds a `Config`, filling defaults;
//! 3. `validate.rs` checks values that depend on each other and on the file system;
//! 4. `error.rs` words every failure as one line naming the key, the value and the fix.
//!
//! Architecture invariant: this module knows nothing of ranks, devices or models. The only place where
//! the world size enters is [`Config::accumulation_steps`], which the trainer calls once it knows it.

mod error;
mod parse;
mod schema;
mod validate;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use error::ConfigError;
// Domain types the config parses into; they live with the code that uses them.
pub use crate::device::DeviceChoice;
pub use crate::precision::Precision;
pub use crate::shard::{Offload, ZeroStage};

/// Everything a training run needs to know, after defaults and overrides, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub zero: ZeroConfig,
    pub parallel: ParallelConfig,
    pub checkpoint: CheckpointConfig,
    pub track: TrackConfig,
    /// `[lora]`: adapters on a frozen base; `None` trains every weight. Absent from the serialised
    /// config when unset, so runs made before the section existed still match theirs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// `[moe]`: how a mixture-of-experts model's router trains; `None` keeps the checkpoint's settings
    /// (no load-balancing loss, as transformers). Absent from the serialised config when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeSettings>,
}

/// `[moe]`: the router's losses and the experts' capacity for a mixture-of-experts model.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MoeSettings {
    /// Add the load-balancing loss (transformers' `output_router_logits`; default off, as there).
    pub aux_loss: bool,
    /// Its weight; default the checkpoint's `router_aux_loss_coef`.
    pub aux_loss_coef: Option<f64>,
    /// The router z-loss's weight (0: none): the mean over every sparse layer's tokens of
    /// `logsumexp(router logits)²` (ST-MoE).
    pub z_loss_coef: f64,
    /// Tokens an expert takes at most, as a multiple of its even share `n·k/E` (rounded up); later ones
    /// are dropped for it in token order. `None`: dropless.
    pub capacity_factor: Option<f64>,
}

/// How a LoRA base's frozen weights are stored (`lora.base`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraBase {
    /// In the compute dtype (`train.precision`'s).
    Bf16,
    /// 4-bit NormalFloat with double quantisation (QLoRA).
    Nf4,
}
named_enum!(LoraBase { Bf16 => "bf16", Nf4 => "nf4" });

/// `[lora]`: train low-rank adapters `W + s·B·A` on a frozen base instead of every weight (PEFT's
/// `LoraConfig`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraConfig {
    /// The rank (PEFT's `r`).
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `alpha / r` (`alpha / √r` with `rslora`).
    pub alpha: f64,
    /// `lora_dropout` on the adapters' input.
    pub dropout: f64,
    /// The adapted modules: `["all-linear"]`, or globs over transformers' module names (a bare name
    /// such as `"q_proj"` matches as PEFT's suffix match does).
    pub targets: Vec<String>,
    /// rsLoRA's scale `alpha / √r`.
    pub rslora: bool,
    /// How the frozen base is stored.
    pub base: LoraBase,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { r: 8, alpha: 8.0, dropout: 0.0, targets: vec!["all-linear".into()], rslora: false, base: LoraBase::Bf16 }
    }
}

/// The model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// The GPT-2 family.
    Gpt,
    /// The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM shapes).
    Llama,
}
named_enum!(ModelKind { Gpt => "gpt", Llama => "llama" });

/// How text becomes token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vocab {
    /// One token per byte (vocabulary of 256); needs no tokenizer files.
    Bytes,
    /// GPT-2 BPE; accepted by the schema so files can name it, rejected by validation until implemented.
    Gpt2,
}
named_enum!(Vocab { Bytes => "bytes", Gpt2 => "gpt2" });

/// `[model]`: the network's shape. With `init_from` a transformers model directory, its `config.json`
/// gives the family and the shape: keys given here must agree with it (they are `None` when absent).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// `None`: GPT, or the family of `init_from`'s `config.json`.
    pub kind: Option<ModelKind>,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub d_model: Option<usize>,
    /// Llama: key/value heads (grouped-query attention when fewer than `n_head`); default `n_head`.
    pub n_kv_head: Option<usize>,
    /// Llama: width of the MLP; default about 8/3 · d_model.
    pub d_ff: Option<usize>,
    /// Llama: the rotary base; default 10000.
    pub rope_theta: Option<f64>,
    /// Llama: the head reuses the embedding; default false.
    pub tie_embeddings: Option<bool>,
    pub seq_len: usize,
    pub vocab: Vocab,
    /// A `tokenizer.json` (HuggingFace tokenizers); default: the one in `init_from`, else `vocab`.
    pub tokenizer: Option<PathBuf>,
    /// Weights to start from instead of random initialisation: a transformers model directory
    /// (`config.json` + safetensors, sharded or not) or a safetensors file.
    pub init_from: Option<PathBuf>,
    /// A PEFT LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`) the adapters
    /// of `[lora]` start from, over the base of `init_from`. Absent from the serialised config when
    /// unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_from: Option<PathBuf>,
}

impl ModelConfig {
    /// The family: the one given, else GPT.
    pub fn kind_or_default(&self) -> ModelKind {
        self.kind.unwrap_or(ModelKind::Gpt)
    }
}

/// `[data]`: where the training text lives.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DataConfig {
    /// A text file, a directory of text files, or a directory written by `ferrospeed data prepare`;
    /// relative paths are relative to the working directory.
    pub path: PathBuf,
    /// Prepared data only: pack documents into `seq_len` windows (positions restart and attention stays
    /// inside each document) rather than one padded document per sample. Default true.
    pub packing: bool,
    /// Raw text data that is not text (invalid UTF-8, or mostly control bytes) is refused unless this
    /// is true (then it is trained on as bytes, with a warning).
    pub allow_binary: bool,
    /// Held-out data the run evaluates on (same forms as `path`, same tokenizer).
    pub eval_path: Option<PathBuf>,
    /// The fraction of `path` held out for evaluation instead (0 = none): prepared data's documents
    /// chosen by the seed (packed apart from the training ones), or raw text's last tokens.
    pub eval_split: f64,
}


/// Numeric format in which gradients are all-reduced or reduce-scattered between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceDtype {
    /// Always fp32, whatever `train.precision` is.
    Fp32,
    /// The compute dtype of `train.precision`; halves the traffic in bf16 and fp16.
    Compute,
}
named_enum!(ReduceDtype { Fp32 => "fp32", Compute => "compute" });

/// The optimizer; `train.optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// AdamW with `train.beta1`, `beta2`, `eps`, `weight_decay`.
    AdamW,
    /// SGD with `train.momentum` and L2 `weight_decay`.
    Sgd,
}
named_enum!(OptimizerKind { AdamW => "adamw", Sgd => "sgd" });


/// `[train]`: the optimisation loop.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainConfig {
    /// Optimizer steps to run.
    pub steps: usize,
    /// Sequences per optimizer step, all ranks together.
    pub global_batch: usize,
    /// Sequences per rank per forward pass.
    pub micro_batch: usize,
    /// Peak learning rate, reached after `warmup` steps.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay; `lr / 10` unless given.
    pub min_lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    /// `"adamw"` (default) or `"sgd"`.
    pub optimizer: OptimizerKind,
    /// SGD's momentum (0 = plain SGD).
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Maximum global gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    pub seed: u64,
    pub precision: Precision,
    pub activation_checkpointing: bool,
    /// Bytes of sample text generated at the end of the run; 0 = none.
    pub sample_tokens: usize,
    /// Dtype in which gradients are all-reduced / reduce-scattered (`fp32` or the compute dtype).
    pub grad_reduce_dtype: ReduceDtype,
    /// fp16 dynamic loss scaling: the scale at the first step; > 0 and finite.
    pub loss_scale_initial: f64,
    /// fp16 dynamic loss scaling: consecutive steps without overflow before the scale doubles.
    pub loss_scale_growth_interval: usize,
    /// fp16 dynamic loss scaling: factor applied to the scale after an overflow; in (0, 1).
    pub loss_scale_backoff: f64,
    /// fp16 dynamic loss scaling: the scale never drops below this; in (0, `loss_scale_initial`].
    pub loss_scale_min: f64,
    /// Where blocks compute: "cuda" (GPU LOCAL_RANK), "cpu", or "auto" (the GPU when this build has the cuda feature and a GPU is present, else the CPU).
    pub device: DeviceChoice,
    /// Evaluate the held-out data every this many steps (and after the last); 0 = after the last only.
    pub eval_every: usize,
    /// Global batches of held-out data an evaluation reads; 0 = every whole one there is.
    pub eval_batches: usize,
    /// Stop when this many evaluations in a row did not lower the best held-out loss; 0 = never.
    pub early_stopping_patience: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let lr = 3e-3;
        TrainConfig {
            steps: 20,
            global_batch: 16,
            micro_batch: 4,
            lr,
            min_lr: lr / 10.0,
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
        }
    }
}



/// `[zero]`: how training state is sharded and offloaded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ZeroConfig {
    pub stage: ZeroStage,
    pub offload_optimizer: Offload,
    /// Share of the optimizer state on the offload tier, in (0, 1]; the rest stays on the device.
    pub offload_ratio: f64,
    /// With `offload_optimizer = "nvme"`: the share of the whole optimizer state in NVMe files, in
    /// (0, `offload_ratio`]; the offloaded rest stays in host memory. Default: `offload_ratio`.
    pub nvme_ratio: Option<f64>,
    /// Stage 3 only.
    pub offload_params: Offload,
    /// Required when either offload is `nvme`.
    pub nvme_dir: Option<PathBuf>,
    /// Host memory for offload transfers and NVMe buffers, in MB; 0 = what the pipeline needs.
    pub pinned_budget_mb: u64,
}

impl ZeroConfig {
    /// The engine's strategy for these settings.
    pub fn strategy(&self) -> crate::shard::Strategy {
        let s = crate::shard::Strategy::new(self.stage).with_offload(self.offload_optimizer, self.offload_ratio, self.offload_params);
        self.nvme_ratio.map_or(s, |q| s.with_nvme_ratio(q))
    }
}

impl Default for ZeroConfig {
    fn default() -> Self {
        Self { stage: ZeroStage::Zero, offload_optimizer: Offload::None, offload_ratio: 1.0, nvme_ratio: None, offload_params: Offload::None, nvme_dir: None, pinned_budget_mb: 0 }
    }
}

/// The order a pipeline runs its micro-batches in (`parallel.pp_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineSchedule {
    /// One forward, one backward in turn after the pipe fills (bubble (pp − 1)/m).
    OneFOneB,
    /// Every forward, then every backward (the most activation memory).
    Gpipe,
    /// 1F1B over `pp_virtual` stages per rank (bubble (pp − 1)/(v·m)).
    Interleaved,
    /// ZB-H1: the backward split into input and weight gradients, the latter filling the bubble.
    ZeroBubble,
}
named_enum!(PipelineSchedule { OneFOneB => "1f1b", Gpipe => "gpipe", Interleaved => "interleaved", ZeroBubble => "zb" });

impl From<PipelineSchedule> for crate::parallel::ScheduleKind {
    /// The schedule `parallel.pp_schedule` names.
    fn from(s: PipelineSchedule) -> Self {
        use crate::parallel::ScheduleKind as K;
        match s {
            PipelineSchedule::OneFOneB => K::OneFOneB,
            PipelineSchedule::Gpipe => K::Gpipe,
            PipelineSchedule::Interleaved => K::Interleaved,
            PipelineSchedule::ZeroBubble => K::ZeroBubble,
        }
    }
}

/// How context parallelism splits attention (`parallel.cp_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextKind {
    /// DeepSpeed-Ulysses: all-to-alls from sequence chunks to whole heads around attention.
    Ulysses,
    /// Ring attention: key/value chunks passed around the ring, partial results merged.
    Ring,
}
named_enum!(ContextKind { Ulysses => "ulysses", Ring => "ring" });

/// `[parallel]`: the axes of parallelism besides data parallelism (the device mesh). The data-parallel
/// size is what is left: `world / (pp · tp · cp)`; `ep` divides it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ParallelConfig {
    /// Pipeline stages.
    pub pp: usize,
    /// Tensor-parallel ranks per layer.
    pub tp: usize,
    /// Sequence parallelism inside the tensor-parallel group (needs `tp > 1`).
    pub sp: bool,
    /// Context-parallel ranks per sequence.
    pub cp: usize,
    /// How context parallelism splits attention.
    pub cp_kind: ContextKind,
    /// Expert-parallel ranks (a divisor of the data-parallel size).
    pub ep: usize,
    pub pp_schedule: PipelineSchedule,
    /// Stages per pipeline rank (`pp_schedule = "interleaved"` only).
    pub pp_virtual: usize,
    /// Layers per stage, first to last (`pp · pp_virtual` numbers); empty: split by the cost estimate.
    pub pp_split: Vec<usize>,
}

impl ParallelConfig {
    /// The mesh of `world` ranks these axes describe, or the error naming the numbers to change.
    pub fn mesh(&self, world: usize) -> Result<crate::parallel::Mesh, crate::parallel::MeshError> {
        crate::parallel::Mesh::new(world, self.pp, self.tp, self.cp, self.ep)
    }

    /// Whether any axis besides data parallelism is on.
    pub fn is_data_parallel(&self) -> bool {
        self.pp == 1 && self.tp == 1 && self.cp == 1 && self.ep == 1
    }
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self { pp: 1, tp: 1, sp: false, cp: 1, cp_kind: ContextKind::Ulysses, ep: 1, pp_schedule: PipelineSchedule::OneFOneB, pp_virtual: 1, pp_split: Vec::new() }
    }
}

/// `[checkpoint]`: when and where checkpoints are written.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CheckpointConfig {
    /// `None`: no checkpoints.
    pub dir: Option<PathBuf>,
    /// Steps between checkpoints; 0 = only at the end.
    pub every: usize,
    /// How many checkpoints to keep; older ones are deleted.
    pub keep: usize,
    /// Resume from `<dir>/latest` when it exists.
    pub resume: bool,
    /// On Ctrl-C (SIGINT) or SIGTERM, save a checkpoint at the next step boundary before exiting
    /// (needs checkpoint.dir).
    pub save_on_interrupt: bool,
    /// Never remove the checkpoint with the lowest held-out loss (besides the `keep` latest); the
    /// file `best` names it.
    pub keep_best: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { dir: None, every: 0, keep: 3, resume: true, save_on_interrupt: true, keep_best: false }
    }
}

/// An output of a run besides `metrics.jsonl` (`track.backends`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackBackend {
    Tensorboard,
    /// `metrics.csv`.
    Csv,
    /// MLflow: the tracking server of `track.mlflow_uri` (or `MLFLOW_TRACKING_URI`), else a file
    /// store in `mlruns/`.
    Mlflow,
}
named_enum!(TrackBackend { Tensorboard => "tensorboard", Csv => "csv", Mlflow => "mlflow" });

/// `[track]`: where metrics go.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrackConfig {
    /// `None`: the CLI picks a fresh run directory.
    pub dir: Option<PathBuf>,
    /// `false` turns TensorBoard off whatever `backends` says (the older spelling).
    pub tensorboard: bool,
    /// Outputs besides `metrics.jsonl`; default `["tensorboard"]`.
    pub backends: Vec<TrackBackend>,
    /// An MLflow tracking server (`http://host:port`, `https://…`), validated; setting it turns
    /// MLflow logging on. Absent from the serialised config when unset, so the `config.json` of runs
    /// made before the key existed still matches (a continued run compares them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlflow_uri: Option<String>,
    /// The server's experiment; `None`: `MLFLOW_EXPERIMENT_NAME`, else "Default" (MLflow's own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlflow_experiment: Option<String>,
}

impl Default for TrackConfig {
    fn default() -> Self {
        TrackConfig { dir: None, tensorboard: true, backends: vec![TrackBackend::Tensorboard], mlflow_uri: None, mlflow_experiment: None }
    }
}

impl TrackConfig {
    /// The outputs the tracker writes, with MLflow's server taken from the environment where the
    /// config leaves it open (`MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`, as MLflow's own client).
    pub fn outputs(&self) -> Result<crate::track::Backends, ConfigError> {
        self.outputs_with_env(|name| std::env::var(name).ok())
    }

    /// As [`TrackConfig::outputs`], with the environment given by `env` (tests).
    ///
    /// Where MLflow logs, first match wins: `track.mlflow_uri` (which turns MLflow on by itself);
    /// `MLFLOW_TRACKING_URI` when `track.backends` holds "mlflow" and the variable names an http(s)
    /// server (another kind of URI, such as a path or `databricks`, is noted and the file store used);
    /// else the file store `mlruns/` in the run directory. A malformed http(s) URI in the variable is
    /// an error naming it, as the key's would be.
    pub fn outputs_with_env(&self, env: impl Fn(&str) -> Option<String>) -> Result<crate::track::Backends, ConfigError> {
        use crate::track::{MlflowServer, MlflowTarget};
        let on = |b| self.backends.contains(&b);
        let env_uri = env("MLFLOW_TRACKING_URI").filter(|u| !u.trim().is_empty());
        let experiment = || self.mlflow_experiment.clone().or_else(|| env("MLFLOW_EXPERIMENT_NAME").filter(|e| !e.trim().is_empty())).unwrap_or_else(|| "Default".into());
        let mlflow = match (&self.mlflow_uri, on(TrackBackend::Mlflow), env_uri) {
            (Some(uri), _, _) => Some(MlflowTarget::Server(MlflowServer { uri: validate::mlflow_uri("track.mlflow_uri", uri)?, experiment: experiment(), source: "track.mlflow_uri" })),
            (None, true, Some(uri)) if validate::is_http(&uri) => {
                Some(MlflowTarget::Server(MlflowServer { uri: validate::mlflow_uri("MLFLOW_TRACKING_URI", &uri)?, experiment: experiment(), source: "MLFLOW_TRACKING_URI" }))
            }
            (None, true, other) => Some(MlflowTarget::FileStore { ignored_env_uri: other }),
            (None, false, _) => None,
        };
        Ok(crate::track::Backends { tensorboard: self.tensorboard && on(TrackBackend::Tensorboard), csv: on(TrackBackend::Csv), mlflow })
    }
}

impl Config {
    /// Parse TOML text (`source` names it in messages), apply `--set key=value` overrides, validate.
    pub fn from_toml_str(text: &str, source: &str, overrides: &[String]) -> Result<Config, ConfigError> {
        Self::parse_in(text, source, overrides, None)
    }

    /// As [`Config::from_toml_str`], for a user's own training program: `[model]` and `[data]` (which
    /// describe the built-in trainer's GPT and text) are optional, and checked only when present.
    pub fn from_toml_str_for_program(text: &str, source: &str, overrides: &[String]) -> Result<Config, ConfigError> {
        Self::parse_in(text, source, overrides, Some(()))
    }

    fn parse_in(text: &str, source: &str, overrides: &[String], program: Option<()>) -> Result<Config, ConfigError> {
        let mut table = parse::parse_toml(text, source)?;
        for arg in overrides {
            parse::apply_override(&mut table, arg)?;
        }
        let scope = match program {
            None => validate::Scope::ALL,
            Some(()) => validate::Scope { model: table.contains_key("model"), data: table.contains_key("data") },
        };
        parse::check_table(&table, source, scope)?;
        let config = parse::build(&table);
        validate::validate(&config, scope)?;
        Ok(config)
    }

    /// As [`Config::load`], for a user's own program (see [`Config::from_toml_str_for_program`]).
    pub fn load_for_program(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let text = Self::read(path)?;
        Self::from_toml_str_for_program(&text, &path.display().to_string(), overrides)
    }

    fn read(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|e| ConfigError::Read { path: path.to_path_buf(), reason: error::one_line(&e.to_string()) })
    }

    /// Read the file at `path`, then as [`Config::from_toml_str`]. Relative paths inside the file are kept
    /// as given, i.e. relative to the working directory, not to the file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let text = Self::read(path)?;
        Self::from_toml_str(&text, &path.display().to_string(), overrides)
    }

    /// Check every value and every relation between values; `from_toml_str` and `load` call this, and
    /// code that builds or edits a `Config` by hand should too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::validate(self, validate::Scope::ALL)
    }

    /// The device mesh of `world_size` ranks that `[parallel]` describes; refused in one line where
    /// the numbers do not fit the ranks, or name an axis this build does not run yet.
    pub fn mesh(&self, world_size: usize) -> Result<crate::parallel::Mesh, ConfigError> {
        let mesh = self.parallel.mesh(world_size)?;
        let p = &self.parallel;
        if p.cp > 1 && p.sp {
            return Err(ConfigError::NotBuilt(format!("parallel.sp with parallel.cp = {}: sequence and context parallelism together are not in this build yet; set parallel.sp = false or parallel.cp = 1", p.cp)));
        }
        for (key, v) in [("pp", p.pp), ("ep", p.ep)] {
            if p.cp > 1 && v > 1 {
                return Err(ConfigError::NotBuilt(format!(
                    "parallel.cp = {} with parallel.{key} = {v}: context parallelism combined with another axis than data parallelism is not in this build yet; set one of them to 1",
                    p.cp
                )));
            }
        }
        if p.tp > 1 && p.ep > 1 {
            return Err(ConfigError::NotBuilt(format!(
                "parallel.tp = {} with parallel.ep = {}: tensor and expert parallelism together are not in this build yet; set one of them to 1",
                p.tp, p.ep
            )));
        }
        if p.ep > 1 && p.pp > 1 {
            return Err(ConfigError::NotBuilt(format!(
                "parallel.ep = {} with parallel.pp = {}: expert parallelism inside a pipeline is not in this build yet; set one of them to 1",
                p.ep, p.pp
            )));
        }
        Ok(mesh)
    }

    /// Gradient accumulation steps for `world_size` ranks: `global_batch / (micro_batch × world_size)`.
    /// When that does not divide, the error proposes values that do.
    pub fn accumulation_steps(&self, world_size: usize) -> Result<usize, ConfigError> {
        validate::accumulation_steps(self.train.global_batch, self.train.micro_batch, world_size)
    }
}
