//! From text to `Config`: TOML parsing, `--set` overrides, the walk against the schema, and defaults.
//!
//! Overrides are applied to the raw table, before the walk, so a value from the command line is checked
//! exactly like one from the file. After `check_table` succeeds every present key is known and has its
//! kind's type and integer range, which is why `build` can read values without failing.

use std::path::PathBuf;

use super::error::{one_line, render_value, ConfigError};
use super::schema::{self, Kind, KeySpec, SectionSpec, SECTIONS};
use super::{
    CheckpointConfig, Config, DataConfig, DeviceChoice, LoraBase, LoraConfig, ModelConfig, ModelKind, MoeSettings, Offload, OptimizerKind, ParallelConfig,
    ContextKind, PipelineSchedule, Precision, ReduceDtype, TrackBackend, TrackConfig, TrainConfig, Vocab, ZeroConfig, ZeroStage,
};

/// Parses TOML text into a table; a syntax error names the source, line and column.
pub(crate) fn parse_toml(text: &str, source_name: &str) -> Result<toml::Table, ConfigError> {
    toml::from_str::<toml::Table>(text).map_err(|e| {
        let location = match e.span() {
            Some(span) => line_and_column(text, span.start),
            None => "an unknown position".to_string(),
        };
        ConfigError::Syntax {
            source_name: source_name.to_string(),
            location,
            message: one_line(e.message().trim()),
        }
    })
}

/// "line L, column C" (both 1-based, columns in characters) of a byte offset into `text`.
fn line_and_column(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    // The parser reports byte offsets on character boundaries, but a slice must not panic if not.
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

/// Applies one `--set section.key=value` to the table. The value is read as TOML (`50`, `3e-4`, `true`,
/// `"x"`); text that is not valid TOML is taken as a string so paths and choices need no quotes. For
/// keys that hold strings the raw text is always used, so `--set data.path=2024` names a file `2024`.
pub(crate) fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let bad = |problem: &str| ConfigError::BadOverride { arg: one_line(arg), problem: problem.to_string() };
    let (dotted, raw) = arg.split_once('=').ok_or_else(|| bad("it has no `=`"))?;
    let dotted = dotted.trim();
    let (section_name, key_name) =
        dotted.split_once('.').ok_or_else(|| bad("the key has no section (no `.`)"))?;
    if section_name.is_empty() || key_name.is_empty() {
        return Err(bad("the section or key name is empty"));
    }
    let source_name = format!("--set {}", one_line(arg));
    let section = schema::section(section_name).ok_or_else(|| ConfigError::UnknownKey {
        key: one_line(section_name),
        source_name: source_name.clone(),
        hint: schema::unknown_section_hint(section_name),
    })?;
    let spec = section.key(key_name).ok_or_else(|| ConfigError::UnknownKey {
        key: one_line(dotted),
        source_name,
        hint: schema::unknown_key_hint(section, key_name),
    })?;
    let value = match (spec.kind, parse_value(raw.trim())) {
        (Kind::Path | Kind::Text | Kind::Choice(_), Some(toml::Value::String(s))) => toml::Value::String(s),
        (Kind::Path | Kind::Text | Kind::Choice(_), _) => toml::Value::String(raw.trim().to_string()),
        (_, Some(value)) => value,
        (_, None) => toml::Value::String(raw.trim().to_string()),
    };
    let entry = table
        .entry(section.name.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(section_table) => {
            section_table.insert(spec.name.to_string(), value);
            Ok(())
        }
        other => Err(not_a_table(section.name, other)),
    }
}

/// `raw` as a single TOML value, or `None` when it is not one.
fn parse_value(raw: &str) -> Option<toml::Value> {
    let mut table = toml::from_str::<toml::Table>(&format!("v = {raw}")).ok()?;
    // `1\nw = 2` parses as two keys; that is not one value.
    if table.len() != 1 {
        return None;
    }
    table.remove("v")
}

fn not_a_table(section: &str, value: &toml::Value) -> ConfigError {
    ConfigError::WrongType {
        key: section.to_string(),
        value: render_value(value),
        expected: format!("a table: write it as a [{section}] section"),
    }
}

/// Checks that every section and key is known and has the right type and integer range, and that the
/// required ones are present. Sections are visited in name order, so the first error is deterministic.
pub(crate) fn check_table(table: &toml::Table, source_name: &str, scope: super::validate::Scope) -> Result<(), ConfigError> {
    for (section_name, value) in table {
        let section = schema::section(section_name).ok_or_else(|| ConfigError::UnknownKey {
            key: one_line(section_name),
            source_name: source_name.to_string(),
            hint: schema::unknown_section_hint(section_name),
        })?;
        let toml::Value::Table(section_table) = value else {
            return Err(not_a_table(section_name, value));
        };
        for (key_name, value) in section_table {
            let spec = section.key(key_name).ok_or_else(|| ConfigError::UnknownKey {
                key: format!("{section_name}.{}", one_line(key_name)),
                source_name: source_name.to_string(),
                hint: schema::unknown_key_hint(section, key_name),
            })?;
            check_value(section, spec, value)?;
        }
    }
    for section in SECTIONS {
        let present = table.get(section.name).and_then(toml::Value::as_table);
        let checked = match section.name {
            "model" => scope.model,
            "data" => scope.data,
            _ => true,
        };
        if !checked {
            continue;
        }
        if present.is_none() && section.required {
            let keys: Vec<&str> = section.keys.iter().filter(|k| k.required).map(|k| k.name).collect();
            return Err(ConfigError::Missing {
                what: format!("section [{}]", section.name),
                source_name: source_name.to_string(),
                fix: format!("add a [{}] section with {}", section.name, keys.join(", ")),
            });
        }
        // A model directory's config.json (or a GGUF file's metadata) gives the shape: only seq_len (a
        // training choice) stays required.
        let from_dir = section.name == "model"
            && present.and_then(|t| t.get("init_from")).and_then(toml::Value::as_str).is_some_and(|p| {
                let p = std::path::Path::new(p);
                p.is_dir() || p.extension().is_some_and(|e| e == "gguf")
            });
        for spec in section.keys.iter().filter(|k| k.required && !(from_dir && k.name != "seq_len")) {
            if present.and_then(|t| t.get(spec.name)).is_none() {
                let alternative = if section.name == "model" && spec.name != "seq_len" { ", or set model.init_from to a HuggingFace model directory" } else { "" };
                return Err(ConfigError::Missing {
                    what: format!("key `{}.{}`", section.name, spec.name),
                    source_name: source_name.to_string(),
                    fix: format!("add `{} = {}` under [{}]{alternative}", spec.name, example(spec.kind), section.name),
                });
            }
        }
    }
    Ok(())
}

/// An example right-hand side for a missing key.
fn example(kind: Kind) -> &'static str {
    match kind {
        Kind::Path => "\"data/corpus.txt\"",
        _ => "<a positive integer>",
    }
}

/// Checks one value's type, and for integers its range.
fn check_value(section: &SectionSpec, spec: &KeySpec, value: &toml::Value) -> Result<(), ConfigError> {
    let key = format!("{}.{}", section.name, spec.name);
    let wrong_type = || ConfigError::WrongType {
        key: key.clone(),
        value: render_value(value),
        expected: spec.kind.expected(),
    };
    match (spec.kind, value) {
        (Kind::PositiveInt, toml::Value::Integer(n)) => {
            if *n < 1 {
                return Err(ConfigError::below_one(&key, n));
            }
            usize::try_from(*n).map(drop).map_err(|_| too_large(&key, *n))
        }
        (Kind::Count, toml::Value::Integer(n)) => {
            if *n < 0 {
                return Err(ConfigError::invalid(&key, n, "is out of range", "must be ≥ 0"));
            }
            usize::try_from(*n).map(drop).map_err(|_| too_large(&key, *n))
        }
        (Kind::Number, toml::Value::Float(_) | toml::Value::Integer(_)) => Ok(()),
        (Kind::Bool, toml::Value::Boolean(_)) => Ok(()),
        (Kind::Path | Kind::Text, toml::Value::String(_)) => Ok(()),
        (Kind::Choice(names), toml::Value::String(s)) => {
            if names.contains(&s.as_str()) {
                Ok(())
            } else {
                let fix = format!("use {}", schema::quoted_list(names));
                Err(ConfigError::invalid(&key, render_value(value), "is not a known choice", fix))
            }
        }
        (Kind::Choices(names), toml::Value::Array(items)) => match items.iter().find(|i| !i.as_str().is_some_and(|s| names.contains(&s))) {
            None => Ok(()),
            Some(bad) => Err(ConfigError::invalid(&key, render_value(bad), "is not a known choice", format!("use {}", schema::quoted_list(names)))),
        },
        (Kind::Strings, toml::Value::String(_)) => Ok(()),
        (Kind::Strings, toml::Value::Array(items)) => match items.iter().find(|i| !i.is_str()) {
            None if items.is_empty() => Err(ConfigError::invalid(&key, "[]", "is empty", "list at least one, or \"all-linear\"")),
            None => Ok(()),
            Some(bad) => Err(ConfigError::invalid(&key, render_value(bad), "is not a string", "write each entry in quotes")),
        },
        (Kind::PositiveInts, toml::Value::Array(items)) => match items.iter().find(|i| !i.as_integer().is_some_and(|n| n >= 1)) {
            None => Ok(()),
            Some(bad) => Err(ConfigError::invalid(&key, render_value(bad), "is not a positive integer", "list integers ≥ 1, e.g. [7, 8, 8, 7]")),
        },
        (Kind::Stage, toml::Value::Integer(n)) => match ZeroStage::from_int(*n) {
            Some(_) => Ok(()),
            None => Err(ConfigError::invalid(&key, n, "is out of range", "use 0, 1, 2 or 3")),
        },
        _ => Err(wrong_type()),
    }
}

fn too_large(key: &str, n: i64) -> ConfigError {
    ConfigError::invalid(key, n, "is too large for this machine", format!("use at most {}", usize::MAX))
}

/// Typed reads from a table that `check_table` accepted; a missing key reads as `None`.
struct Values<'a>(&'a toml::Table);

impl Values<'_> {
    fn get(&self, section: &str, key: &str) -> Option<&toml::Value> {
        self.0.get(section)?.as_table()?.get(key)
    }

    fn usize(&self, section: &str, key: &str) -> Option<usize> {
        usize::try_from(self.get(section, key)?.as_integer()?).ok()
    }

    fn u64(&self, section: &str, key: &str) -> Option<u64> {
        u64::try_from(self.get(section, key)?.as_integer()?).ok()
    }

    fn f64(&self, section: &str, key: &str) -> Option<f64> {
        match self.get(section, key)? {
            toml::Value::Float(f) => Some(*f),
            // TOML integers are i64; every one that is a sensible hyper-parameter converts exactly.
            toml::Value::Integer(n) => Some(*n as f64),
            _ => None,
        }
    }

    fn bool(&self, section: &str, key: &str) -> Option<bool> {
        self.get(section, key)?.as_bool()
    }

    fn str(&self, section: &str, key: &str) -> Option<&str> {
        self.get(section, key)?.as_str()
    }

    /// An optional path; an empty string means "not set", so `--set model.init_from=` clears it.
    fn path(&self, section: &str, key: &str) -> Option<PathBuf> {
        self.str(section, key).filter(|s| !s.is_empty()).map(PathBuf::from)
    }
}

/// Builds the typed config from a checked table, filling defaults for absent keys.
pub(crate) fn build(table: &toml::Table) -> Config {
    let v = Values(table);
    let train_default = TrainConfig::default();
    let zero_default = ZeroConfig::default();
    let parallel_default = ParallelConfig::default();
    let checkpoint_default = CheckpointConfig::default();
    let track_default = TrackConfig::default();
    let lora_default = LoraConfig::default();
    let lr = v.f64("train", "lr").unwrap_or(train_default.lr);
    Config {
        model: ModelConfig {
            kind: v.str("model", "kind").and_then(ModelKind::from_name),
            n_layer: v.usize("model", "n_layer"),
            n_head: v.usize("model", "n_head"),
            d_model: v.usize("model", "d_model"),
            n_kv_head: v.usize("model", "n_kv_head"),
            d_ff: v.usize("model", "d_ff"),
            rope_theta: v.f64("model", "rope_theta"),
            tie_embeddings: v.bool("model", "tie_embeddings"),
            // Required: `check_table` guarantees presence; 0 would be rejected by validation anyway.
            seq_len: v.usize("model", "seq_len").unwrap_or(0),
            vocab: v.str("model", "vocab").and_then(Vocab::from_name).unwrap_or(Vocab::Bytes),
            tokenizer: v.path("model", "tokenizer"),
            init_from: v.path("model", "init_from"),
            adapter_from: v.path("model", "adapter_from"),
        },
        data: DataConfig { path: v.str("data", "path").map(PathBuf::from).unwrap_or_default(), packing: v.bool("data", "packing").unwrap_or(true), allow_binary: v.bool("data", "allow_binary").unwrap_or(false),
            eval_path: v.path("data", "eval_path"),
            eval_split: v.f64("data", "eval_split").unwrap_or(0.0),
        },
        train: TrainConfig {
            steps: v.usize("train", "steps").unwrap_or(train_default.steps),
            global_batch: v.usize("train", "global_batch").unwrap_or(train_default.global_batch),
            micro_batch: v.usize("train", "micro_batch").unwrap_or(train_default.micro_batch),
            lr,
            // The floor of the decay follows the peak unless set, so `--set train.lr=…` alone is enough.
            min_lr: v.f64("train", "min_lr").unwrap_or(lr / 10.0),
            warmup: v.usize("train", "warmup").unwrap_or(train_default.warmup),
            weight_decay: v.f64("train", "weight_decay").unwrap_or(train_default.weight_decay),
            beta1: v.f64("train", "beta1").unwrap_or(train_default.beta1),
            optimizer: v.str("train", "optimizer").and_then(OptimizerKind::from_name).unwrap_or(train_default.optimizer),
            momentum: v.f64("train", "momentum").unwrap_or(train_default.momentum),
            beta2: v.f64("train", "beta2").unwrap_or(train_default.beta2),
            eps: v.f64("train", "eps").unwrap_or(train_default.eps),
            grad_clip: v.f64("train", "grad_clip").unwrap_or(train_default.grad_clip),
            seed: v.u64("train", "seed").unwrap_or(train_default.seed),
            precision: v
                .str("train", "precision")
                .and_then(Precision::from_name)
                .unwrap_or(train_default.precision),
            activation_checkpointing: v
                .bool("train", "activation_checkpointing")
                .unwrap_or(train_default.activation_checkpointing),
            sample_tokens: v.usize("train", "sample_tokens").unwrap_or(train_default.sample_tokens),
            grad_reduce_dtype: v
                .str("train", "grad_reduce_dtype")
                .and_then(ReduceDtype::from_name)
                .unwrap_or(train_default.grad_reduce_dtype),
            loss_scale_initial: v
                .f64("train", "loss_scale_initial")
                .unwrap_or(train_default.loss_scale_initial),
            loss_scale_growth_interval: v
                .usize("train", "loss_scale_growth_interval")
                .unwrap_or(train_default.loss_scale_growth_interval),
            loss_scale_backoff: v
                .f64("train", "loss_scale_backoff")
                .unwrap_or(train_default.loss_scale_backoff),
            loss_scale_min: v.f64("train", "loss_scale_min").unwrap_or(train_default.loss_scale_min),
            eval_every: v.usize("train", "eval_every").unwrap_or(train_default.eval_every),
            eval_batches: v.usize("train", "eval_batches").unwrap_or(train_default.eval_batches),
            early_stopping_patience: v.usize("train", "early_stopping_patience").unwrap_or(train_default.early_stopping_patience),
            device: v
                .str("train", "device")
                .and_then(DeviceChoice::from_name)
                .unwrap_or(train_default.device),
        },
        parallel: ParallelConfig {
            pp: v.usize("parallel", "pp").unwrap_or(parallel_default.pp),
            tp: v.usize("parallel", "tp").unwrap_or(parallel_default.tp),
            sp: v.bool("parallel", "sp").unwrap_or(parallel_default.sp),
            cp: v.usize("parallel", "cp").unwrap_or(parallel_default.cp),
            cp_kind: v.str("parallel", "cp_kind").and_then(ContextKind::from_name).unwrap_or(parallel_default.cp_kind),
            ep: v.usize("parallel", "ep").unwrap_or(parallel_default.ep),
            pp_schedule: v.str("parallel", "pp_schedule").and_then(PipelineSchedule::from_name).unwrap_or(parallel_default.pp_schedule),
            pp_virtual: v.usize("parallel", "pp_virtual").unwrap_or(parallel_default.pp_virtual),
            pp_split: v
                .get("parallel", "pp_split")
                .and_then(toml::Value::as_array)
                .map(|a| a.iter().filter_map(|i| usize::try_from(i.as_integer()?).ok()).collect())
                .unwrap_or_default(),
        },
        zero: ZeroConfig {
            stage: v
                .get("zero", "stage")
                .and_then(toml::Value::as_integer)
                .and_then(ZeroStage::from_int)
                .unwrap_or(zero_default.stage),
            offload_optimizer: v
                .str("zero", "offload_optimizer")
                .and_then(Offload::from_name)
                .unwrap_or(zero_default.offload_optimizer),
            offload_params: v
                .str("zero", "offload_params")
                .and_then(Offload::from_name)
                .unwrap_or(zero_default.offload_params),
            offload_ratio: v.f64("zero", "offload_ratio").unwrap_or(zero_default.offload_ratio),
            nvme_ratio: v.f64("zero", "nvme_ratio"),
            nvme_dir: v.path("zero", "nvme_dir"),
            pinned_budget_mb: v.u64("zero", "pinned_budget_mb").unwrap_or(zero_default.pinned_budget_mb),
        },
        checkpoint: CheckpointConfig {
            dir: v.path("checkpoint", "dir"),
            every: v.usize("checkpoint", "every").unwrap_or(checkpoint_default.every),
            keep: v.usize("checkpoint", "keep").unwrap_or(checkpoint_default.keep),
            resume: v.bool("checkpoint", "resume").unwrap_or(checkpoint_default.resume),
            save_on_interrupt: v
                .bool("checkpoint", "save_on_interrupt")
                .unwrap_or(checkpoint_default.save_on_interrupt),
            keep_best: v.bool("checkpoint", "keep_best").unwrap_or(checkpoint_default.keep_best),
        },
        track: TrackConfig {
            dir: v.path("track", "dir"),
            tensorboard: v.bool("track", "tensorboard").unwrap_or(track_default.tensorboard),
            backends: v
                .get("track", "backends")
                .and_then(toml::Value::as_array)
                .map(|a| a.iter().filter_map(|i| i.as_str().and_then(TrackBackend::from_name)).collect())
                .unwrap_or(track_default.backends),
            // An empty string means "not set", as for paths (`--set track.mlflow_uri=` clears it).
            mlflow_uri: v.str("track", "mlflow_uri").filter(|s| !s.is_empty()).map(str::to_string),
            mlflow_experiment: v.str("track", "mlflow_experiment").filter(|s| !s.is_empty()).map(str::to_string),
        },
        lora: table.contains_key("lora").then(|| LoraConfig {
            r: v.usize("lora", "r").unwrap_or(lora_default.r),
            alpha: v.f64("lora", "alpha").unwrap_or(lora_default.alpha),
            dropout: v.f64("lora", "dropout").unwrap_or(lora_default.dropout),
            targets: match v.get("lora", "targets") {
                Some(toml::Value::String(s)) => vec![s.clone()],
                Some(toml::Value::Array(a)) => a.iter().filter_map(|i| i.as_str().map(str::to_string)).collect(),
                _ => lora_default.targets.clone(),
            },
            rslora: v.bool("lora", "rslora").unwrap_or(lora_default.rslora),
            base: v.str("lora", "base").and_then(LoraBase::from_name).unwrap_or(lora_default.base),
        }),
        moe: table.contains_key("moe").then(|| MoeSettings {
            aux_loss: v.bool("moe", "aux_loss").unwrap_or(false),
            aux_loss_coef: v.f64("moe", "aux_loss_coef"),
            z_loss_coef: v.f64("moe", "z_loss_coef").unwrap_or(0.0),
            capacity_factor: v.f64("moe", "capacity_factor"),
        }),
    }
}
