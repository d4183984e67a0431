//! `ferrospeed launch`: validate the request, host or join the rendezvous store, start the ranks,
//! and supervise them until all succeed or one fails.
//!
//! Nothing is started until every argument is valid, the program exists, and the store is up (node 0)
//! or reachable (other nodes); each of those failures is a one-line [`UsageError`] with exit code 2.
//!
//! The store answers only those who hold the job's secret: one node makes a fresh token per attempt;
//! several nodes share the one the user gives each (`--rdzv-token-file`, `FERROSPEED_RDZV_TOKEN`,
//! `--rdzv-token`). The ranks get it in their environment, never on a command line.

pub mod guard;
mod ranks;
mod supervise;

use crate::usage::usage_error;
use anyhow::Result;
use clap::Args;
use ferrospeed::comm::store::{resolve, StoreClient, StoreConfig, StoreServer};
use ferrospeed::comm::{RdzvToken, ENV_RDZV_TOKEN};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Subcommands of this binary that `launch` runs as PROGRAM without a path.
const OWN_COMMANDS: &[&str] = &["train", "comm", "bench-train", "checkpoint"];

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Ranks to start on this node
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub nproc_per_node: usize,
    /// Number of nodes in the job
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes; node 0 serves the rendezvous store
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Host name or address of node 0
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of the rendezvous store on node 0 [default: 0 (any free port) on one node, 29500 on several]
    #[arg(long)]
    pub master_port: Option<u16>,
    /// The job's rendezvous secret, the same on every node (required with --nnodes above 1; one node
    /// makes its own). Other users can see it in `ps`: prefer --rdzv-token-file or FERROSPEED_RDZV_TOKEN
    #[arg(long, value_name = "TOKEN", conflicts_with = "rdzv_token_file")]
    pub rdzv_token: Option<String>,
    /// A file only you can read (chmod 600) holding the rendezvous secret, e.g. from `openssl rand -hex 32`
    #[arg(long, value_name = "PATH")]
    pub rdzv_token_file: Option<PathBuf>,
    /// Seconds to wait for node 0 and for all ranks to join
    #[arg(long, default_value_t = 300.0, value_parser = positive_seconds)]
    pub rdzv_timeout: f64,
    /// Seconds a collective may wait for the other ranks before failing [default: 300]
    #[arg(long, value_parser = positive_seconds)]
    pub collective_timeout: Option<f64>,
    /// Seconds to let the other ranks exit after one failed, before killing them
    #[arg(long, default_value_t = 3.0, value_parser = positive_seconds)]
    pub stop_grace: f64,
    /// When a rank fails, stop the job and start it again with the same command (a training run
    /// resumes from its latest checkpoint), at most this many times (one node)
    #[arg(long, default_value_t = 0)]
    pub max_restarts: usize,
    /// `train`, `comm`, or any executable (a path, or a name on PATH)
    #[arg(value_name = "PROGRAM")]
    pub program: String,
    /// Arguments passed to every rank's PROGRAM
    #[arg(value_name = "ARGS", trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

/// The store as this node sees it: served here (node 0) or reached over the network.
pub(crate) enum NodeStore {
    Host(StoreServer),
    Join(StoreClient),
}

pub fn run(args: LaunchArgs) -> Result<ExitCode> {
    if args.node_rank >= args.nnodes {
        return Err(usage_error(format!(
            "--node-rank {} is out of range for --nnodes {}: use 0..{}",
            args.node_rank,
            args.nnodes,
            args.nnodes - 1
        )));
    }
    let port = match (args.master_port, args.nnodes) {
        (Some(0), n) if n > 1 => {
            return Err(usage_error("--master-port 0 (any free port) works only with --nnodes 1: other nodes must know the port; pick one, e.g. 29500"))
        }
        (Some(p), _) => p,
        (None, 1) => 0,
        (None, _) => 29500,
    };
    if args.max_restarts > 0 && args.nnodes > 1 {
        return Err(usage_error("--max-restarts works on one node so far (--nnodes 1): restarting several nodes together needs a rendezvous round per attempt"));
    }
    let given_token = given_token(&args)?;
    if args.nnodes > 1 && given_token.is_none() {
        return Err(usage_error(format!(
            "--nnodes {} needs a rendezvous secret shared by every node: give each the same --rdzv-token-file PATH \
             (chmod 600), {ENV_RDZV_TOKEN} or --rdzv-token, e.g. from `openssl rand -hex 32`",
            args.nnodes
        )));
    }
    let (program, prefix_args) = resolve_program(&args.program)?;
    resolve(&format!("{}:{port}", args.master_addr))
        .map_err(|e| usage_error(format!("--master-addr {:?} cannot be resolved ({e}); give node 0's host name or address", args.master_addr)))?;
    let mut reasons: Vec<String> = Vec::new();
    for restart in 0..=args.max_restarts {
        // Every attempt has a store of its own: nothing of the last one's rendezvous is left, and no
        // process of the last attempt holds this one's secret (unless the user gave it).
        let token = match &given_token {
            Some(t) => t.clone(),
            None => RdzvToken::generate()?,
        };
        let (store, actual_port) = node_store(&args, port, &token)?;
        let plan = ranks::LaunchPlan {
            program: program.clone(),
            args: prefix_args.iter().cloned().chain(args.args.iter().cloned()).collect(),
            nproc_per_node: args.nproc_per_node,
            nnodes: args.nnodes,
            node_rank: args.node_rank,
            master_addr: args.master_addr.clone(),
            master_port: actual_port,
            rdzv_timeout: args.rdzv_timeout,
            collective_timeout: args.collective_timeout,
            restart,
            token,
        };
        let outcome = supervise::supervise(&plan, store, Duration::from_secs_f64(args.stop_grace))?;
        let summary = |reasons: &[String]| {
            if !reasons.is_empty() {
                eprintln!("ferrospeed launch: {} restart(s): {}", reasons.len(), reasons.iter().enumerate().map(|(i, r)| format!("{}. {r}", i + 1)).collect::<Vec<_>>().join("; "));
            }
        };
        match outcome {
            // Exit code 2 is bad input (or a full disk): the same command would fail the same way.
            supervise::Outcome::Failed { message, code } if restart < args.max_restarts && code != 2 => {
                eprintln!("ferrospeed launch: restart {} of {}: {message}", restart + 1, args.max_restarts);
                reasons.push(message);
            }
            supervise::Outcome::Failed { message, code } => {
                summary(&reasons);
                eprintln!("ferrospeed launch: failed: {message}");
                return Ok(ExitCode::from(code.max(1)));
            }
            supervise::Outcome::Interrupted => {
                summary(&reasons);
                return Ok(ExitCode::from(130));
            }
            supervise::Outcome::Success => {
                summary(&reasons);
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// The secret the user gave: `--rdzv-token-file`, `--rdzv-token`, or `FERROSPEED_RDZV_TOKEN`, in that order.
fn given_token(args: &LaunchArgs) -> Result<Option<RdzvToken>> {
    let token = if let Some(path) = &args.rdzv_token_file {
        Some(RdzvToken::from_file(path))
    } else if let Some(text) = &args.rdzv_token {
        Some(RdzvToken::new(text, "--rdzv-token"))
    } else {
        RdzvToken::from_vars(|k| std::env::var(k).ok()).transpose()
    };
    token.transpose().map_err(|e| usage_error(e.to_string()))
}

/// The rendezvous store of one attempt on this node: served here (node 0) or joined; and its port.
fn node_store(args: &LaunchArgs, port: u16, token: &RdzvToken) -> Result<(NodeStore, u16)> {
    let rdzv_timeout = Duration::from_secs_f64(args.rdzv_timeout);
    let store = if args.node_rank == 0 {
        // One node keeps the store on the given (usually loopback) address; several nodes need it
        // reachable, on the master address's interface when it is one of this host's.
        let listener = if args.nnodes == 1 {
            StoreServer::listen(&format!("{}:{port}", args.master_addr))
        } else {
            StoreServer::listen_for_hosts(&args.master_addr, port)
        };
        let world_size = args.nproc_per_node * args.nnodes;
        let server = listener.and_then(|l| StoreServer::serve(l, StoreConfig::new(token.clone(), world_size))).map_err(|e| {
            usage_error(format!(
                "cannot listen on {}:{port} ({}); pass a free --master-port, or 0 to pick one (single node)",
                args.master_addr,
                io_reason(&e)
            ))
        })?;
        NodeStore::Host(server)
    } else {
        let addr = format!("{}:{port}", args.master_addr);
        let client = StoreClient::connect(&addr, token, rdzv_timeout).map_err(|e| match e {
            ferrospeed::CommError::StoreUnreachable { .. } => usage_error(format!(
                "cannot reach node 0 at {addr} within {:.0} s ({}); start node 0's launcher first, or check --master-addr/--master-port",
                args.rdzv_timeout,
                io_reason(&e)
            )),
            // A refused token, or something else on that port: the error names it and the fix.
            other => usage_error(other.to_string()),
        })?;
        NodeStore::Join(client)
    };
    let actual_port = match &store {
        NodeStore::Host(s) => s.local_addr().port(),
        NodeStore::Join(_) => port,
    };
    Ok((store, actual_port))
}

/// The most specific reason inside a communication error, for one-line messages.
fn io_reason(e: &ferrospeed::CommError) -> String {
    match e {
        ferrospeed::CommError::Bind { source, .. } => source.to_string(),
        ferrospeed::CommError::StoreUnreachable { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// `train`/`comm` run this binary; anything else must be an executable file or a name on PATH.
fn resolve_program(program: &str) -> Result<(PathBuf, Vec<String>)> {
    if OWN_COMMANDS.contains(&program) {
        let exe = std::env::current_exe().map_err(|e| usage_error(format!("cannot find the ferrospeed executable itself: {e}")))?;
        return Ok((exe, vec![program.to_string()]));
    }
    let not_found = || {
        usage_error(format!(
            "PROGRAM '{program}' not found: it is not a ferrospeed command ({}), an executable file, or a name on PATH",
            OWN_COMMANDS.join(", ")
        ))
    };
    let candidate = if program.contains('/') {
        Some(PathBuf::from(program))
    } else {
        std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| is_executable(p)))
    };
    match candidate {
        Some(path) if is_executable(&path) => Ok((path, Vec::new())),
        Some(path) if path.exists() => Err(usage_error(format!(
            "PROGRAM '{}' is not an executable file; check its permissions (chmod +x)",
            path.display()
        ))),
        _ => Err(not_found()),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
