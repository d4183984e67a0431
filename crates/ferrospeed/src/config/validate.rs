//! Checks on a typed `Config`: value ranges, relations between keys, paths that must exist, and the
//! batch arithmetic that needs the world size.
//!
//! Pure checks come before file system checks so that the same mistake gives the same message on any
//! machine; the order is otherwise the order of the sections in a config file.

use super::error::{quote, quote_path, ConfigError};
use super::{Config, LoraBase, Offload, PipelineSchedule, Vocab, ZeroStage};

/// Which sections a config is checked for: all of them for `ferrospeed train`; for a user's own
/// program (`Accelerator`) `[model]` and `[data]` only when the file has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scope {
    pub model: bool,
    pub data: bool,
}

impl Scope {
    pub(crate) const ALL: Scope = Scope { model: true, data: true };
}

pub(crate) fn validate(config: &Config, scope: Scope) -> Result<(), ConfigError> {
    let model = &config.model;
    let train = &config.train;
    let model_sizes = [
        ("model.n_layer", model.n_layer.unwrap_or(1)),
        ("model.n_head", model.n_head.unwrap_or(1)),
        ("model.d_model", model.d_model.unwrap_or(1)),
        ("model.seq_len", model.seq_len),
    ];
    let sizes = [
        ("train.global_batch", train.global_batch),
        ("train.micro_batch", train.micro_batch),
        ("train.loss_scale_growth_interval", train.loss_scale_growth_interval),
        ("checkpoint.keep", config.checkpoint.keep),
    ];
    for (key, value) in model_sizes.into_iter().filter(|_| scope.model).chain(sizes) {
        if value == 0 {
            return Err(ConfigError::below_one(key, value));
        }
    }
    if let (true, Some(d), Some(nh)) = (scope.model, model.d_model, model.n_head) {
        if d % nh != 0 {
            let choices = nearest_divisors(d, nh, 8);
            return Err(ConfigError::invalid(
                "model.n_head",
                nh,
                &format!("does not divide model.d_model = {d}"),
                format!("use an n_head among {}, or change model.d_model", join(&choices)),
            ));
        }
        if let Some(kv) = model.n_kv_head.filter(|kv| nh % kv != 0) {
            return Err(ConfigError::invalid("model.n_kv_head", kv, &format!("does not divide model.n_head = {nh}"), "use a divisor of model.n_head"));
        }
    }
    if model.vocab == Vocab::Gpt2 {
        return Err(ConfigError::invalid("model.vocab", "\"gpt2\"", "is not built in", "use \"bytes\", or set model.tokenizer to GPT-2's tokenizer.json"));
    }
    if train.micro_batch > train.global_batch {
        return Err(ConfigError::invalid(
            "train.micro_batch",
            train.micro_batch,
            &format!("is larger than train.global_batch = {}", train.global_batch),
            format!("use train.micro_batch ≤ {}, or raise train.global_batch", train.global_batch),
        ));
    }
    check_floats(config)?;
    if train.warmup > train.steps {
        return Err(ConfigError::invalid(
            "train.warmup",
            train.warmup,
            &format!("is longer than train.steps = {}", train.steps),
            format!("use train.warmup ≤ {}, or raise train.steps", train.steps),
        ));
    }
    check_zero(config)?;
    check_eval(config)?;
    check_lora(config)?;
    check_moe(config)?;
    check_parallel(config)?;
    check_track(config)?;
    check_paths(config, scope)
}

/// `[track]`: the MLflow server's URI and experiment name, in the forms the server takes.
fn check_track(config: &Config) -> Result<(), ConfigError> {
    let track = &config.track;
    if let Some(uri) = &track.mlflow_uri {
        mlflow_uri("track.mlflow_uri", uri)?;
    }
    if let Some(name) = &track.mlflow_experiment {
        // MLflow's own limit on experiment names.
        if name.trim().is_empty() || name.chars().count() > 500 {
            return Err(ConfigError::invalid("track.mlflow_experiment", quote(name), "is empty or longer than 500 characters", "name the experiment, e.g. \"ferrospeed\""));
        }
    }
    Ok(())
}

/// Whether `uri` names an http(s) server (its scheme, in any case).
pub(crate) fn is_http(uri: &str) -> bool {
    let lower = uri.trim().to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// An MLflow tracking server's URI as the REST client uses it (no trailing `/`), or an error
/// naming `key` (the config key, or the environment variable it came from). The URI may have a path
/// (a server behind a proxy at `https://host/mlflow`); credentials belong in the environment.
pub(crate) fn mlflow_uri(key: &str, uri: &str) -> Result<String, ConfigError> {
    let fix = "write it as http://host:port or https://host[/path], e.g. \"http://127.0.0.1:5000\"";
    let bad = |problem: &str| ConfigError::invalid(key, quote(uri), problem, fix);
    if !is_http(uri) {
        return Err(bad("is not an http or https URL"));
    }
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains spaces or control characters"));
    }
    let rest = &uri[uri.find("://").map_or(0, |i| i + 3)..];
    if rest.contains(['?', '#']) {
        return Err(bad("has a query or fragment"));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Err(ConfigError::invalid(
            key,
            "(a URL with credentials, not repeated here)",
            "holds credentials",
            "remove them from the URL and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN",
        ));
    }
    // The host, then an optional `:port`; an IPv6 literal is bracketed (`[::1]:5000`).
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':')),
            None => return Err(bad("has an unclosed [ in its host")),
        },
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    if let Some(p) = port {
        if !p.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(bad("has a port that is not a number from 1 to 65535"));
        }
    }
    Ok(uri.trim_end_matches('/').to_string())
}

/// Float hyper-parameters. Conditions are written so that NaN fails them too.
fn check_floats(config: &Config) -> Result<(), ConfigError> {
    let t = &config.train;
    if !(t.lr.is_finite() && t.lr > 0.0) {
        let fix = "must be a finite number > 0, e.g. 3e-3";
        return Err(ConfigError::invalid("train.lr", t.lr, "is out of range", fix));
    }
    if !(t.min_lr >= 0.0 && t.min_lr <= t.lr) {
        return Err(ConfigError::invalid(
            "train.min_lr",
            t.min_lr,
            &format!("is outside [0, train.lr = {}]", t.lr),
            format!("use a value between 0 and {}, or leave it out for lr / 10", t.lr),
        ));
    }
    let non_negative = [("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip)];
    for (key, value) in non_negative {
        if !(value.is_finite() && value >= 0.0) {
            let fix = "must be a finite number ≥ 0 (0 disables it)";
            return Err(ConfigError::invalid(key, value, "is out of range", fix));
        }
    }
    for (key, value) in [("train.beta1", t.beta1), ("train.beta2", t.beta2), ("train.momentum", t.momentum)] {
        if !(0.0..1.0).contains(&value) {
            let fix = "must be in [0, 1), e.g. 0.9 or 0.95";
            return Err(ConfigError::invalid(key, value, "is out of range", fix));
        }
    }
    if !(t.eps.is_finite() && t.eps > 0.0) {
        let fix = "must be a finite number > 0, e.g. 1e-8";
        return Err(ConfigError::invalid("train.eps", t.eps, "is out of range", fix));
    }
    check_loss_scale(config)
}

/// fp16 dynamic loss scaling. Checked whatever the precision, so a file keeps working when it switches
/// to fp16. Conditions are written so that NaN fails them too.
fn check_loss_scale(config: &Config) -> Result<(), ConfigError> {
    let t = &config.train;
    if !(t.loss_scale_initial.is_finite() && t.loss_scale_initial > 0.0) {
        let fix = "must be a finite number > 0, e.g. 65536";
        return Err(ConfigError::invalid("train.loss_scale_initial", t.loss_scale_initial, "is out of range", fix));
    }
    if !(t.loss_scale_backoff > 0.0 && t.loss_scale_backoff < 1.0) {
        let fix = "must be strictly between 0 and 1, e.g. 0.5";
        return Err(ConfigError::invalid("train.loss_scale_backoff", t.loss_scale_backoff, "is out of range", fix));
    }
    if !(t.loss_scale_min > 0.0) {
        let fix = "must be a finite number > 0, e.g. 1";
        return Err(ConfigError::invalid("train.loss_scale_min", t.loss_scale_min, "is out of range", fix));
    }
    if t.loss_scale_min > t.loss_scale_initial {
        return Err(ConfigError::invalid(
            "train.loss_scale_min",
            t.loss_scale_min,
            &format!("is above train.loss_scale_initial = {}", t.loss_scale_initial),
            format!(
                "use train.loss_scale_min ≤ {}, or raise train.loss_scale_initial",
                t.loss_scale_initial
            ),
        ));
    }
    Ok(())
}

/// Evaluation: one source of held-out data, a fraction that leaves data on both sides.
fn check_eval(config: &Config) -> Result<(), ConfigError> {
    let (d, t) = (&config.data, &config.train);
    if !(0.0..1.0).contains(&d.eval_split) {
        return Err(ConfigError::invalid("data.eval_split", d.eval_split, "is not a fraction in [0, 1)", "use e.g. 0.05 to hold out 5% of data.path, or 0 for none"));
    }
    if d.eval_split > 0.0 && d.eval_path.is_some() {
        return Err(ConfigError::invalid("data.eval_split", d.eval_split, "is set with data.eval_path: two sources of held-out data", "keep one of the two"));
    }
    let held_out = d.eval_split > 0.0 || d.eval_path.is_some();
    for (key, value) in [("train.eval_every", t.eval_every), ("train.eval_batches", t.eval_batches), ("train.early_stopping_patience", t.early_stopping_patience), ("checkpoint.keep_best", usize::from(config.checkpoint.keep_best))] {
        if value > 0 && !held_out {
            let shown = if key == "checkpoint.keep_best" { "true".to_string() } else { value.to_string() };
            return Err(ConfigError::invalid(key, shown, "has no held-out data to evaluate", "set data.eval_path or data.eval_split"));
        }
    }
    if t.early_stopping_patience > 0 && t.eval_every == 0 {
        return Err(ConfigError::invalid("train.early_stopping_patience", t.early_stopping_patience, "needs evaluations during training", "set train.eval_every"));
    }
    let c = &config.checkpoint;
    if c.keep_best && (c.dir.is_none() || t.eval_every == 0 || c.every == 0 || c.every % t.eval_every != 0) {
        return Err(ConfigError::invalid(
            "checkpoint.keep_best",
            true,
            "needs a held-out loss at every checkpoint",
            "set checkpoint.dir, and checkpoint.every to a multiple of train.eval_every",
        ));
    }
    Ok(())
}

/// `[moe]`: a non-negative weight; what is built.
fn check_moe(config: &Config) -> Result<(), ConfigError> {
    let Some(m) = &config.moe else { return Ok(()) };
    if let Some(c) = m.aux_loss_coef.filter(|c| !(c.is_finite() && *c >= 0.0)) {
        return Err(ConfigError::invalid("moe.aux_loss_coef", c, "is not a non-negative number", "use e.g. 0.01, or leave it out for the checkpoint's router_aux_loss_coef"));
    }
    if !(m.z_loss_coef.is_finite() && m.z_loss_coef >= 0.0) {
        return Err(ConfigError::invalid("moe.z_loss_coef", m.z_loss_coef, "is not a non-negative number", "use e.g. 0.001, or 0 for no z-loss"));
    }
    if let Some(c) = m.capacity_factor.filter(|c| !(c.is_finite() && *c > 0.0)) {
        return Err(ConfigError::invalid("moe.capacity_factor", c, "is not a positive number", "use e.g. 1.25, or leave it out for dropless experts"));
    }
    Ok(())
}

/// `[lora]`: a positive scale, a dropout probability, what is built.
fn check_lora(config: &Config) -> Result<(), ConfigError> {
    let Some(l) = &config.lora else { return Ok(()) };
    if !(l.alpha.is_finite() && l.alpha > 0.0) {
        return Err(ConfigError::invalid("lora.alpha", l.alpha, "is not a positive number", "use e.g. 16 (the update is scaled by alpha / r)"));
    }
    if !(0.0..1.0).contains(&l.dropout) {
        return Err(ConfigError::invalid("lora.dropout", l.dropout, "is not a probability in [0, 1)", "use e.g. 0.05, or 0 for none"));
    }
    if l.dropout > 0.0 {
        return Err(ConfigError::invalid("lora.dropout", l.dropout, "is not built yet (adapters train without dropout)", "set lora.dropout = 0"));
    }
    if l.base == LoraBase::Nf4 && config.zero.stage == ZeroStage::Three {
        return Err(ConfigError::invalid("lora.base", "\"nf4\"", "is not built for zero.stage = 3 yet (an NF4 base is kept whole on each rank)", "use zero.stage = 2 (the base is frozen: stage 3 would shard only the base), or lora.base = \"bf16\""));
    }
    Ok(())
}

/// `[parallel]` settings that need no world size (the mesh itself is checked by `Config::mesh`).
fn check_parallel(config: &Config) -> Result<(), ConfigError> {
    let p = &config.parallel;
    for (key, v) in [("parallel.pp", p.pp), ("parallel.tp", p.tp), ("parallel.cp", p.cp), ("parallel.ep", p.ep), ("parallel.pp_virtual", p.pp_virtual)] {
        if v == 0 {
            return Err(ConfigError::invalid(key, 0, "is out of range", "use 1 or more (1 turns the axis off)"));
        }
    }
    if p.pp_virtual > 1 && p.pp_schedule != PipelineSchedule::Interleaved {
        return Err(ConfigError::invalid(
            "parallel.pp_virtual",
            p.pp_virtual,
            &format!("needs parallel.pp_schedule = \"interleaved\" (it is \"{}\")", p.pp_schedule),
            "set parallel.pp_schedule = \"interleaved\", or parallel.pp_virtual = 1",
        ));
    }
    if p.sp && p.tp == 1 {
        return Err(ConfigError::invalid(
            "parallel.sp",
            true,
            "needs parallel.tp > 1 (sequence parallelism splits the norms' activations over the tensor-parallel group)",
            "set parallel.tp to 2 or more, or parallel.sp = false",
        ));
    }
    let stages = p.pp * p.pp_virtual;
    if !p.pp_split.is_empty() && p.pp_split.len() != stages {
        return Err(ConfigError::invalid(
            "parallel.pp_split",
            format!("{:?}", p.pp_split),
            &format!("lists {} stages but parallel.pp · pp_virtual = {stages}", p.pp_split.len()),
            "give one layer count per stage, or remove pp_split to split by the cost estimate",
        ));
    }
    if p.pp_split.contains(&0) {
        return Err(ConfigError::invalid("parallel.pp_split", format!("{:?}", p.pp_split), "has a stage of 0 layers", "give every stage at least one layer"));
    }
    Ok(())
}

/// ZeRO settings: parameter offload only exists where parameters are sharded, and NVMe needs a place.
fn check_zero(config: &Config) -> Result<(), ConfigError> {
    let zero = &config.zero;
    if zero.offload_params != Offload::None && zero.stage != ZeroStage::Three {
        return Err(ConfigError::invalid(
            "zero.offload_params",
            format!("\"{}\"", zero.offload_params),
            &format!("needs zero.stage = 3 (it is {})", zero.stage),
            "set zero.stage = 3, or use zero.offload_params = \"none\"",
        ));
    }
    if !(zero.offload_ratio > 0.0 && zero.offload_ratio <= 1.0) {
        return Err(ConfigError::invalid(
            "zero.offload_ratio",
            zero.offload_ratio.to_string(),
            "must be in (0, 1]: the share of the optimizer state on the offload tier",
            "use e.g. 0.5 (half offloaded) or 1.0 (all of it)",
        ));
    }
    if let Some(q) = zero.nvme_ratio {
        if zero.offload_optimizer != Offload::Nvme {
            return Err(ConfigError::invalid(
                "zero.nvme_ratio",
                q.to_string(),
                &format!("needs zero.offload_optimizer = \"nvme\" (it is \"{}\")", zero.offload_optimizer),
                "set zero.offload_optimizer = \"nvme\", or remove zero.nvme_ratio",
            ));
        }
        if !(q > 0.0 && q <= zero.offload_ratio) {
            return Err(ConfigError::invalid(
                "zero.nvme_ratio",
                q.to_string(),
                &format!("must be in (0, zero.offload_ratio = {}]: the share of the optimizer state in NVMe files, the offloaded rest in host memory", zero.offload_ratio),
                "use e.g. half of zero.offload_ratio, or remove the key to put all the offloaded state on NVMe",
            ));
        }
    }
    if zero.offload_params != Offload::None && (zero.offload_optimizer == Offload::None || zero.offload_ratio < 1.0) {
        return Err(ConfigError::invalid(
            "zero.offload_params",
            format!("\"{}\"", zero.offload_params),
            &format!(
                "needs the whole optimizer state offloaded (it is zero.offload_optimizer = \"{}\", zero.offload_ratio = {}): offloaded parameters are updated off the device",
                zero.offload_optimizer, zero.offload_ratio
            ),
            "set zero.offload_optimizer = \"cpu\" (or \"nvme\") and zero.offload_ratio = 1.0",
        ));
    }
    if zero.offload_params == Offload::Nvme && zero.offload_optimizer != Offload::Nvme {
        return Err(ConfigError::invalid(
            "zero.offload_params",
            "\"nvme\"",
            &format!("needs the optimizer state on NVMe too (it is zero.offload_optimizer = \"{}\"): a block's parameter shard goes to disk with its state", zero.offload_optimizer),
            "set zero.offload_optimizer = \"nvme\", or use zero.offload_params = \"cpu\"",
        ));
    }
    let offloads = [("zero.offload_optimizer", zero.offload_optimizer), ("zero.offload_params", zero.offload_params)];
    for (key, offload) in offloads {
        if offload == Offload::Nvme && zero.nvme_dir.is_none() {
            return Err(ConfigError::invalid(
                key,
                "\"nvme\"",
                "needs zero.nvme_dir",
                "set zero.nvme_dir = \"/path/on/fast/disk\", or use \"cpu\"",
            ));
        }
    }
    Ok(())
}

/// Paths that are read must exist now, rather than failing after the run has started. Directories
/// that are written (checkpoint, track, NVMe) are created by their owners and are not checked here.
fn check_paths(config: &Config, scope: Scope) -> Result<(), ConfigError> {
    let data = &config.data.path;
    if scope.data && !data.exists() {
        return Err(ConfigError::invalid(
            "data.path",
            quote_path(data),
            "does not exist",
            "point it at a text file or a directory of text files",
        ));
    }
    if let Some(eval) = config.data.eval_path.as_ref().filter(|p| scope.data && !p.exists()) {
        return Err(ConfigError::invalid("data.eval_path", quote_path(eval), "does not exist", "point it at held-out text or prepared data, or remove the key"));
    }
    let nvme = [config.zero.offload_optimizer, config.zero.offload_params].contains(&Offload::Nvme);
    if let Some(dir) = config.zero.nvme_dir.as_ref().filter(|d| nvme && !d.is_dir()) {
        return Err(ConfigError::invalid(
            "zero.nvme_dir",
            quote_path(dir),
            "does not exist or is not a directory",
            "create it, or point it at a folder on a fast local disk",
        ));
    }
    if let Some(dir) = config.zero.nvme_dir.as_ref().filter(|_| nvme) {
        // A probe file created and removed: a folder that cannot take the state files is refused
        // before anything else is written.
        let probe = dir.join(format!(".ferrospeed-probe-{}", std::process::id()));
        if let Err(e) = std::fs::write(&probe, b"") {
            return Err(ConfigError::invalid(
                "zero.nvme_dir",
                quote_path(dir),
                &format!("is not writable ({e})"),
                "choose a folder this user can write, or fix its permissions",
            ));
        }
        let _ = std::fs::remove_file(&probe);
    }
    if let Some(tok) = config.model.tokenizer.as_ref().filter(|t| !t.is_file()) {
        return Err(ConfigError::invalid("model.tokenizer", quote_path(tok), "does not exist", "point it at a tokenizer.json, or remove the key"));
    }
    if let Some(dir) = &config.model.adapter_from {
        if config.lora.is_none() {
            return Err(ConfigError::invalid("model.adapter_from", quote_path(dir), "needs adapters to load into", "add a [lora] section with the adapter's r, alpha and targets"));
        }
        if !dir.join("adapter_model.safetensors").is_file() {
            return Err(ConfigError::invalid("model.adapter_from", quote_path(dir), "has no adapter_model.safetensors", "point it at a PEFT adapter directory (save_pretrained's output)"));
        }
    }
    if let Some(init) = &config.model.init_from {
        if !init.exists() {
            return Err(ConfigError::invalid(
                "model.init_from",
                quote_path(init),
                "does not exist",
                "point it at a safetensors file, a HuggingFace model directory or a llama GGUF file, or remove the key to start from random weights",
            ));
        }
    }
    Ok(())
}

/// `global_batch / (micro_batch × world_size)`, or an error proposing values that divide.
pub(crate) fn accumulation_steps(
    global_batch: usize,
    micro_batch: usize,
    world_size: usize,
) -> Result<usize, ConfigError> {
    if world_size == 0 {
        return Err(ConfigError::invalid("world size", 0, "is out of range", "must be ≥ 1"));
    }
    if micro_batch == 0 {
        return Err(ConfigError::below_one("train.micro_batch", 0));
    }
    let per_step = micro_batch.checked_mul(world_size);
    if let Some(per_step) = per_step {
        if global_batch > 0 && global_batch % per_step == 0 {
            return Ok(global_batch / per_step);
        }
    }
    let (globals, micros) = batch_alternatives(global_batch, micro_batch, world_size);
    let mut options = Vec::new();
    if !globals.is_empty() {
        let values: Vec<String> = globals.iter().map(usize::to_string).collect();
        options.push(format!("train.global_batch = {}", values.join(" or ")));
    }
    match micros.as_slice() {
        [] => {}
        [only] => options.push(format!("train.micro_batch = {only}")),
        [first, second, ..] => options.push(format!("train.micro_batch = {first} (or {second})")),
    }
    let fix = if options.is_empty() {
        "use a smaller train.micro_batch or fewer ranks".to_string()
    } else {
        format!("use {}", options.join(", or "))
    };
    Err(ConfigError::Batch {
        global_batch,
        micro_batch,
        world_size,
        product: per_step.map_or_else(|| "more than usize::MAX".to_string(), |p| p.to_string()),
        fix,
    })
}

/// Values that would divide: the multiples of `micro × world` just below and above `global`, and the
/// divisors of `global / world` nearest to `micro` (none when `world` does not divide `global`).
pub(crate) fn batch_alternatives(global: usize, micro: usize, world: usize) -> (Vec<usize>, Vec<usize>) {
    let mut globals = Vec::new();
    if let Some(per_step) = micro.checked_mul(world).filter(|&p| p > 0) {
        let below = global / per_step * per_step;
        if below > 0 && below != global {
            globals.push(below);
        }
        if let Some(above) = (global / per_step).checked_add(1).and_then(|k| k.checked_mul(per_step)) {
            globals.push(above);
        }
    }
    let mut micros = Vec::new();
    if world > 0 && global > 0 && global % world == 0 {
        let candidates = divisors(global / world);
        // Nearest divisor below `micro` first (it keeps memory use within what was asked), then above.
        if let Some(&below) = candidates.iter().rev().find(|&&d| d < micro) {
            micros.push(below);
        }
        if let Some(&above) = candidates.iter().find(|&&d| d > micro) {
            micros.push(above);
        }
    }
    (globals, micros)
}

/// Up to `count` divisors of `n` nearest to `near`, in increasing order.
fn nearest_divisors(n: usize, near: usize, count: usize) -> Vec<usize> {
    let mut divisors = divisors(n);
    divisors.sort_by_key(|&d| (d.abs_diff(near), d));
    divisors.truncate(count);
    divisors.sort_unstable();
    divisors
}

fn join(values: &[usize]) -> String {
    let strings: Vec<String> = values.iter().map(usize::to_string).collect();
    strings.join(", ")
}

/// The divisors of `n` in increasing order. Trial division stops after 2^20 candidates so that an absurd
/// value cannot stall the error path; past that only the divisors found so far (all valid) are listed.
fn divisors(n: usize) -> Vec<usize> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut d: usize = 1;
    while d <= n / d && d <= 1 << 20 {
        if n % d == 0 {
            small.push(d);
            if d != n / d {
                large.push(n / d);
            }
        }
        d += 1;
    }
    small.extend(large.into_iter().rev());
    small
}
