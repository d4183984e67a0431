//! `ferrospeed config [--out FILE] [--defaults] [--data PATH] [--force]`: a commented run config with
//! every section, validated through the same schema `train` uses before it is written. Without
//! `--defaults` it asks (`config_wizard.rs`, in the spirit of `accelerate config`); both end in the one
//! template here, [`render`], filled from [`Answers`], so the questionnaire cannot write a key the
//! defaults do not document.

use crate::usage::usage_error;
use anyhow::Result;
use clap::Args;
use ferrospeed::config::{Config, DeviceChoice, Offload, Precision, ZeroStage};
use std::io::{ErrorKind, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// Write the defaults without asking (for scripts; without it the command asks on a terminal)
    #[arg(long)]
    pub defaults: bool,
    /// Where to write the TOML
    #[arg(long, default_value = "ferrospeed.toml")]
    pub out: PathBuf,
    /// The training text (a file or a folder of text files, or `data prepare` output); the
    /// questionnaire offers it as the default answer
    #[arg(long, default_value = "data/rust-book.txt")]
    pub data: PathBuf,
    /// Replace FILE if it exists
    #[arg(long)]
    pub force: bool,
}

/// The model a config trains: the built-in GPT of a given shape, or a transformers directory (or a
/// llama GGUF file) whose own shape wins (`model.init_from`).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelChoice {
    Gpt { n_layer: usize, n_head: usize, d_model: usize },
    InitFrom(String),
}

/// Everything the template needs: the defaults, or the answers to the questionnaire.
#[derive(Debug, Clone, PartialEq)]
pub struct Answers {
    /// The command that wrote the file, for its first line.
    pub written_by: &'static str,
    pub num_nodes: usize,
    pub num_procs_per_node: usize,
    /// `parallel.pp`: pipeline stages (1: data parallelism only).
    pub pp: usize,
    pub device: DeviceChoice,
    pub model: ModelChoice,
    pub seq_len: usize,
    pub data: String,
    pub steps: usize,
    pub global_batch: usize,
    pub micro_batch: usize,
    pub precision: Precision,
    pub activation_checkpointing: bool,
    pub zero_stage: ZeroStage,
    pub offload: Offload,
    pub offload_ratio: f64,
    /// `zero.nvme_ratio`: with NVMe, the share of the state in files (the offloaded rest in host
    /// memory); `None`: all of the offloaded state.
    pub nvme_ratio: Option<f64>,
    pub nvme_dir: Option<String>,
    /// `checkpoint.dir` and `checkpoint.every`; `None` trains without checkpoints.
    pub checkpoint: Option<(String, usize)>,
    pub track_dir: String,
}

impl Answers {
    /// A first run: the tiny built-in GPT on `data`, one rank, ZeRO stage 0.
    pub fn defaults(data: &str) -> Self {
        Self {
            written_by: "ferrospeed config --defaults",
            num_nodes: 1,
            num_procs_per_node: 1,
            pp: 1,
            device: DeviceChoice::Auto,
            model: ModelChoice::Gpt { n_layer: 2, n_head: 2, d_model: 64 },
            seq_len: 64,
            data: data.to_string(),
            steps: 50,
            global_batch: 8,
            micro_batch: 4,
            precision: Precision::Fp32,
            activation_checkpointing: true,
            zero_stage: ZeroStage::Zero,
            offload: Offload::None,
            offload_ratio: 1.0,
            nvme_ratio: None,
            nvme_dir: None,
            checkpoint: Some(("runs/default/ckpt".into(), 10)),
            track_dir: "runs/default".into(),
        }
    }

    /// Ranks of the whole job.
    pub fn world_size(&self) -> usize {
        self.num_nodes * self.num_procs_per_node
    }

    /// Ranks of the data-parallel group (the batch is split over them): the world over the pipeline.
    pub fn data_parallel_size(&self) -> usize {
        (self.world_size() / self.pp.max(1)).max(1)
    }

    /// The command that starts the run of `config` on this node (node 0 of several).
    pub fn launch_command(&self, config: &Path) -> String {
        let nodes = if self.num_nodes > 1 { format!(" --nnodes {} --node-rank 0 --master-addr HOST_OF_NODE_0 --master-port 29500", self.num_nodes) } else { String::new() };
        format!("ferrospeed launch --nproc-per-node {}{nodes} train --config {}", self.num_procs_per_node, config.display())
    }

    /// The config as the schema reads it (`source` names it in messages).
    pub fn validate(&self, source: &str) -> Result<Config, ferrospeed::config::ConfigError> {
        Config::from_toml_str(&render(self, Path::new(source)), source, &[])
    }
}

/// A TOML string (quoted and escaped).
fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// The commented TOML of `a`, to be written to `out`.
pub fn render(a: &Answers, out: &Path) -> String {
    let model = match &a.model {
        ModelChoice::Gpt { n_layer, n_head, d_model } => format!(
            r#"kind = "gpt"              # "gpt" (GPT-2 family) or "llama"
n_layer = {n_layer:<16}# transformer layers
n_head = {n_head:<17}# attention heads (d_model must divide by it)
d_model = {d_model:<16}# width of the residual stream
seq_len = {:<16}# tokens per training sequence
vocab = "bytes"           # "bytes", "gpt2", or a tokenizer.json
# init_from = "path/to/hf-model-dir"   # a transformers directory or a llama GGUF file: its shape wins"#,
            a.seq_len
        ),
        ModelChoice::InitFrom(dir) => format!(
            r#"init_from = {}   # a transformers directory or a llama GGUF file: family, shape and tokenizer come from it
seq_len = {:<16}# tokens per training sequence"#,
            quoted(dir),
            a.seq_len
        ),
    };
    let checkpoint = match &a.checkpoint {
        Some((dir, every)) => format!("dir = {:<20}# remove to train without checkpoints\nevery = {every:<18}# steps between checkpoints (0: only at the end)", quoted(dir)),
        None => "# dir = \"runs/NAME/ckpt\"   # no checkpoints: a run that dies starts again from step 0\nevery = 10                # steps between checkpoints (0: only at the end)".into(),
    };
    let nvme = a.nvme_dir.as_ref().map_or_else(|| "# nvme_dir = \"/path/on/fast/disk\"   # needed when an offload is \"nvme\"".to_string(), |d| format!("nvme_dir = {}   # the optimizer state's files (scratch)", quoted(d)));
    let world = a.world_size();
    let dp = a.data_parallel_size();
    let accumulation = a.global_batch / (a.micro_batch * dp).max(1);
    let (ranks, at) = match a.pp {
        1 => ("ranks", format!("{world} rank(s)")),
        _ => ("data-parallel ranks", format!("{dp} data-parallel of {world} rank(s)")),
    };
    let parallel = if a.pp > 1 {
        format!(
            "[parallel]                # axes besides data parallelism; data-parallel size = ranks / (pp·tp·cp) = {dp}\n\
             pp = {:<20}# pipeline stages, blocks split by cost (pp_split = [..] to place them yourself)\n\
             pp_schedule = \"1f1b\"      # \"1f1b\", \"gpipe\" or \"interleaved\" (with pp_virtual stages a rank)\n\
             # tp = 1                  # tensor-parallel ranks per layer (sp = true: sequence parallelism over them)\n\
             # cp = 1                  # context-parallel ranks per sequence\n\
             # ep = 1                  # expert-parallel ranks, a divisor of the data-parallel size\n\
             #                         # (this build refuses tp, cp and ep above 1)",
            a.pp
        )
    } else {
        "# [parallel]              # axes besides data parallelism; data-parallel size = ranks / (pp·tp·cp)\n\
         # pp = 1                  # pipeline stages (pp_schedule \"1f1b\", \"gpipe\", \"interleaved\"; pp_virtual, pp_split)\n\
         # tp = 1                  # tensor-parallel ranks per layer (sp = true: sequence parallelism over them)\n\
         # cp = 1                  # context-parallel ranks per sequence\n\
         # ep = 1                  # expert-parallel ranks, a divisor of the data-parallel size\n\
         #                         # (this build refuses tp, cp and ep above 1)"
            .to_string()
    };
    format!(
        r#"# ferrospeed run configuration, written by `{written_by}`.
# For {nodes} node(s) × {procs} process(es) per node = {world} rank(s). Train with:
#   {launch}
# Any key can be overridden on the command line: --set train.steps=50

[model]
{model}

[data]
path = {data}
# packing = true          # prepared data only: pack documents, attention stays inside each
# allow_binary = false    # refuse raw files that are not text

[train]
steps = {steps}
global_batch = {global_batch:<11}# sequences per optimizer step, all ranks together
micro_batch = {micro_batch:<12}# sequences per rank per forward; accumulation = global / (micro × {ranks}) = {accumulation} at {at}
lr = 3e-3
warmup = {warmup}
weight_decay = 0.1
grad_clip = 1.0           # 0 disables clipping
seed = 1234
precision = {precision:<14}# "fp32", "bf16", or "fp16" (dynamic loss scaling)
activation_checkpointing = {ckpt}   # recompute each block in the backward: less memory, ~30% more compute
device = {device:<17}# "auto" (the GPU of LOCAL_RANK when built with --features cuda), "cpu", "cuda"

[zero]
stage = {stage}                 # 0 (DDP), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)
offload_optimizer = {offload}   # "none", "cpu" or "nvme": where the fp32 optimizer state lives
offload_ratio = {ratio:<10}# share of the optimizer state offloaded, in (0, 1]
{nvme_ratio}
{nvme}

{parallel}

[checkpoint]
{checkpoint}
keep = 3                  # checkpoints kept, the oldest removed
resume = true             # continue from the latest checkpoint (the same command continues a run)

[track]
dir = {track:<20}# metrics.jsonl, config.json, summary.json, plot.png, and the backends below
backends = ["tensorboard"]   # any of "tensorboard", "csv", "mlflow"
# mlflow_uri = "http://127.0.0.1:5000"   # an MLflow tracking server (turns MLflow on)
# mlflow_experiment = "ferrospeed"       # its experiment (default: MLFLOW_EXPERIMENT_NAME, else "Default")
"#,
        written_by = a.written_by,
        nodes = a.num_nodes,
        procs = a.num_procs_per_node,
        launch = a.launch_command(out),
        data = quoted(&a.data),
        steps = a.steps,
        global_batch = a.global_batch,
        micro_batch = a.micro_batch,
        // A tenth of the run, as the defaults' 5 of 50; never longer than the run.
        warmup = (a.steps / 10).max(1).min(a.steps),
        precision = quoted(a.precision.name()),
        ckpt = a.activation_checkpointing,
        device = quoted(a.device.name()),
        stage = a.zero_stage.as_int(),
        offload = quoted(a.offload.name()),
        ratio = format!("{:?}", a.offload_ratio),
        nvme_ratio = a.nvme_ratio.map_or_else(
            || "# nvme_ratio = 0.5        # with \"nvme\": the share in files (≤ offload_ratio), the rest of it in host memory".to_string(),
            |q| format!("nvme_ratio = {:<13}# the share in NVMe files; the rest of the offloaded state in host memory", format!("{q:?}"))
        ),
        track = quoted(&a.track_dir),
    )
}

pub fn run(args: ConfigArgs) -> Result<ExitCode> {
    if args.out.exists() && !args.force {
        return Err(usage_error(format!("{} exists: choose another --out, or pass --force to replace it", args.out.display())));
    }
    let data = args.data.display().to_string();
    let answers = if args.defaults {
        let answers = Answers::defaults(&data);
        // Validated exactly as `train` will read it: nothing is written if it would not train.
        answers.validate(&args.out.display().to_string()).map_err(|e| usage_error(format!("{e} (pass --data PATH to train on other text)")))?;
        answers
    } else {
        if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
            return Err(usage_error("ferrospeed config asks its questions on a terminal and this is none: pass --defaults (with --out FILE, --data PATH) to write the defaults without asking"));
        }
        crate::config_wizard::ask(&args.out, &data)?
    };
    write(&args.out, &render(&answers, &args.out), args.force)?;
    println!("wrote {}; train with:\n  {}", args.out.display(), answers.launch_command(&args.out));
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to `out`; without `force` only if `out` does not exist (even one created while the
/// questions were answered).
fn write(out: &Path, text: &str, force: bool) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let cannot = |e: std::io::Error| match e.kind() {
        ErrorKind::AlreadyExists => usage_error(format!("{} exists: choose another --out, or pass --force to replace it", out.display())),
        _ => usage_error(format!("cannot write {}: {e}", out.display())),
    };
    let mut file = options.open(out).map_err(cannot)?;
    file.write_all(text.as_bytes()).map_err(cannot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> String {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/rust-book.txt").display().to_string()
    }

    #[test]
    fn every_shape_of_answers_renders_a_valid_config() {
        let base = Answers::defaults(&corpus());
        let cases = [
            base.clone(),
            Answers { num_nodes: 2, num_procs_per_node: 4, global_batch: 64, micro_batch: 2, ..base.clone() },
            // Two pipelines of four stages: 64 / (2 × 2) = 16 micro-batches a step.
            Answers { num_nodes: 2, num_procs_per_node: 4, pp: 4, global_batch: 64, micro_batch: 2, ..base.clone() },
            Answers { zero_stage: ZeroStage::Three, offload: Offload::Cpu, offload_ratio: 0.5, precision: Precision::Bf16, ..base.clone() },
            Answers { checkpoint: None, activation_checkpointing: false, steps: 3, device: DeviceChoice::Cpu, ..base.clone() },
        ];
        for a in cases {
            let cfg = a.validate("test.toml").unwrap_or_else(|e| panic!("{a:?}: {e}"));
            assert_eq!((cfg.train.steps, cfg.train.micro_batch, cfg.zero.stage), (a.steps, a.micro_batch, a.zero_stage));
            assert_eq!(cfg.accumulation_steps(a.data_parallel_size()).unwrap(), a.global_batch / (a.micro_batch * a.data_parallel_size()));
            assert_eq!(cfg.parallel.pp, a.pp);
            cfg.mesh(a.world_size()).unwrap_or_else(|e| panic!("{a:?}: {e}"));
            assert_eq!(cfg.checkpoint.dir.map(|d| d.display().to_string()), a.checkpoint.map(|c| c.0));
        }
        // Three tiers: a share on NVMe, the offloaded rest in host memory.
        let disk = tempfile::tempdir().unwrap();
        let three = Answers { offload: Offload::Nvme, offload_ratio: 0.8, nvme_ratio: Some(0.3), nvme_dir: Some(disk.path().display().to_string()), ..base.clone() };
        let cfg = three.validate("three.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((cfg.zero.offload_ratio, cfg.zero.nvme_ratio), (0.8, Some(0.3)));
        assert!(render(&three, Path::new("three.toml")).contains("\nnvme_ratio = 0.3 "));
        // A model directory gives the shape: no n_layer & co. are written, and the schema asks for none.
        let dir = tempfile::tempdir().unwrap();
        let hf = Answers { model: ModelChoice::InitFrom(dir.path().display().to_string()), ..base.clone() };
        let text = render(&hf, Path::new("hf.toml"));
        assert!(!text.contains("n_layer") && text.contains(&format!("init_from = {:?}", dir.path().display().to_string())), "{text}");
        assert_eq!(hf.validate("hf.toml").unwrap().model.init_from.as_deref(), Some(dir.path()));
        let missing = Answers { model: ModelChoice::InitFrom("/no/such/model-dir".into()), ..base };
        assert!(missing.validate("test.toml").is_err());
    }

    #[test]
    fn the_commented_parallel_section_is_valid_once_uncommented() {
        let text = render(&Answers::defaults(&corpus()), Path::new("p.toml"));
        let start = text.find("# [parallel]").expect("the template names [parallel]");
        let end = start + text[start..].find("\n\n").expect("a blank line ends it");
        let uncommented: String = text[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(uncommented.contains("[parallel]") && uncommented.contains("ep = 1"), "{uncommented}");
        let full = format!("{}{uncommented}{}", &text[..start], &text[end..]);
        let cfg = ferrospeed::config::Config::from_toml_str(&full, "p.toml", &[]).unwrap_or_else(|e| panic!("{e}\n{full}"));
        assert_eq!(cfg.parallel, ferrospeed::config::ParallelConfig::default());
    }

    #[test]
    fn the_launch_command_names_the_nodes() {
        let a = Answers { num_nodes: 2, num_procs_per_node: 8, ..Answers::defaults("x") };
        let cmd = a.launch_command(Path::new("big.toml"));
        assert!(cmd.starts_with("ferrospeed launch --nproc-per-node 8 --nnodes 2 --node-rank 0 ") && cmd.ends_with(" train --config big.toml"), "{cmd}");
        assert_eq!(Answers::defaults("x").launch_command(Path::new("a.toml")), "ferrospeed launch --nproc-per-node 1 train --config a.toml");
    }
}
