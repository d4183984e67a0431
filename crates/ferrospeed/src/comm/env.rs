//! Who am I in the job: rank, world size and master address from torchrun, Slurm or Open MPI variables.

use super::error::CommError;
use super::token::RdzvToken;

/// Where the rank information came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource {
    /// `RANK`, `WORLD_SIZE`, … as set by `ferrospeed launch` or torchrun.
    Torchrun,
    /// `SLURM_PROCID`, `SLURM_NTASKS`, … as set by `srun`.
    Slurm,
    /// `OMPI_COMM_WORLD_RANK`, … as set by Open MPI's `mpirun`.
    OpenMpi,
    /// No launcher variables: a single process.
    Single,
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldInfo {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The launcher serves the store (`FERROSPEED_AGENT_STORE=1`); otherwise rank 0 serves it.
    pub agent_store: bool,
    pub source: EnvSource,
    /// The job's rendezvous secret (`FERROSPEED_RDZV_TOKEN`), if given; see `comm/token.rs` for what
    /// happens without it.
    pub token: Option<RdzvToken>,
}

/// Set by `ferrospeed launch` when it serves the rendezvous store itself.
pub const ENV_AGENT_STORE: &str = "FERROSPEED_AGENT_STORE";
const DEFAULT_PORT: u16 = 29500;

impl WorldInfo {
    /// A world of one process, with no store.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            agent_store: false,
            source: EnvSource::Single,
            token: None,
        }
    }

    /// Read the process environment.
    pub fn from_env() -> Result<Self, CommError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Read rank information through `get` (the environment, or a map in tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, CommError> {
        let agent_store = get(ENV_AGENT_STORE).is_some_and(|v| v == "1");
        let token = RdzvToken::from_vars(&get)?;
        let info = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let rank = required_usize(&get, "RANK")?;
            let world_size = required_usize(&get, "WORLD_SIZE")?;
            Self {
                rank,
                world_size,
                local_rank: optional_usize(&get, "LOCAL_RANK")?.unwrap_or(rank),
                local_world_size: optional_usize(&get, "LOCAL_WORLD_SIZE")?.unwrap_or(world_size),
                master_addr: master_addr(&get, world_size, None)?,
                master_port: master_port(&get, world_size, None)?,
                agent_store,
                source: EnvSource::Torchrun,
                token,
            }
        } else if get("OMPI_COMM_WORLD_RANK").is_some() {
            let world_size = required_usize(&get, "OMPI_COMM_WORLD_SIZE")?;
            let local_world_size = required_usize(&get, "OMPI_COMM_WORLD_LOCAL_SIZE")?;
            // On one node the master is this machine; across nodes the user must say which one.
            let local_default = (local_world_size == world_size).then(|| "127.0.0.1".to_string());
            Self {
                rank: required_usize(&get, "OMPI_COMM_WORLD_RANK")?,
                world_size,
                local_rank: required_usize(&get, "OMPI_COMM_WORLD_LOCAL_RANK")?,
                local_world_size,
                master_addr: master_addr(&get, world_size, local_default)?,
                master_port: master_port(&get, world_size, Some(DEFAULT_PORT))?,
                agent_store,
                source: EnvSource::OpenMpi,
                token,
            }
        } else if get("SLURM_PROCID").is_some() {
            let world_size = required_usize(&get, "SLURM_NTASKS")?;
            let nodelist = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST"));
            let first_node = nodelist.as_deref().and_then(first_host);
            // Jobs sharing a node must not share a port: derive it from the job id, as Lightning does.
            let port = get("SLURM_JOB_ID").and_then(|id| id.parse::<u64>().ok()).map(|id| 20000 + (id % 10000) as u16);
            Self {
                rank: required_usize(&get, "SLURM_PROCID")?,
                world_size,
                local_rank: optional_usize(&get, "SLURM_LOCALID")?.unwrap_or(0),
                local_world_size: slurm_local_world_size(&get)?.unwrap_or(world_size),
                master_addr: master_addr(&get, world_size, first_node)?,
                master_port: master_port(&get, world_size, Some(port.unwrap_or(DEFAULT_PORT)))?,
                agent_store,
                source: EnvSource::Slurm,
                token,
            }
        } else {
            Self::single()
        };
        info.validate()?;
        Ok(info)
    }

    fn validate(&self) -> Result<(), CommError> {
        if self.world_size == 0 {
            return Err(bad("WORLD_SIZE", "0", "the world needs at least one rank"));
        }
        if self.rank >= self.world_size {
            return Err(bad("RANK", &self.rank.to_string(), &format!("must be below WORLD_SIZE={}", self.world_size)));
        }
        if self.local_rank >= self.local_world_size {
            return Err(bad(
                "LOCAL_RANK",
                &self.local_rank.to_string(),
                &format!("must be below LOCAL_WORLD_SIZE={}", self.local_world_size),
            ));
        }
        Ok(())
    }

    /// `host:port` of the rendezvous store.
    pub fn store_addr(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

fn bad(var: &str, value: &str, reason: &str) -> CommError {
    CommError::BadEnv { var: var.into(), value: value.into(), reason: reason.into() }
}

fn optional_usize(get: &impl Fn(&str) -> Option<String>, var: &str) -> Result<Option<usize>, CommError> {
    match get(var) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| bad(var, &v, "expected a non-negative integer")),
    }
}

fn required_usize(get: &impl Fn(&str) -> Option<String>, var: &str) -> Result<usize, CommError> {
    optional_usize(get, var)?.ok_or_else(|| bad(var, "", "is not set but the launcher set related variables"))
}

fn master_addr(
    get: &impl Fn(&str) -> Option<String>,
    world_size: usize,
    fallback: Option<String>,
) -> Result<String, CommError> {
    match get("MASTER_ADDR").filter(|v| !v.trim().is_empty()) {
        Some(v) => Ok(v.trim().to_string()),
        None if world_size == 1 => Ok("127.0.0.1".into()),
        None => fallback.ok_or_else(|| bad("MASTER_ADDR", "", "is not set; export the host name of rank 0")),
    }
}

fn master_port(
    get: &impl Fn(&str) -> Option<String>,
    world_size: usize,
    fallback: Option<u16>,
) -> Result<u16, CommError> {
    match get("MASTER_PORT") {
        Some(v) => v.trim().parse().map_err(|_| bad("MASTER_PORT", &v, "expected a port number 1-65535")),
        None if world_size == 1 => Ok(0),
        None => fallback.ok_or_else(|| bad("MASTER_PORT", "", "is not set; export a free TCP port on rank 0's host")),
    }
}

/// `SLURM_NTASKS_PER_NODE`, or the first count of `SLURM_TASKS_PER_NODE` ("4(x2),3" → 4).
fn slurm_local_world_size(get: &impl Fn(&str) -> Option<String>) -> Result<Option<usize>, CommError> {
    if let Some(n) = optional_usize(get, "SLURM_NTASKS_PER_NODE")? {
        return Ok(Some(n));
    }
    Ok(get("SLURM_TASKS_PER_NODE").and_then(|v| {
        let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }))
}

/// The first host of a Slurm node list: "gpu[03-05,09],cpu1" → "gpu03".
pub(crate) fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let head_end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..head_end];
    if list[head_end..].starts_with('[') {
        let inner = &list[head_end + 1..];
        let first: String = inner.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        (!first.is_empty()).then(|| format!("{prefix}{first}"))
    } else {
        (!prefix.is_empty()).then(|| prefix.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<WorldInfo, CommError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        WorldInfo::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let w = from(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
            ("FERROSPEED_AGENT_STORE", "1"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank, w.local_world_size), (3, 4, 1, 2));
        assert_eq!(w.store_addr(), "node0:1234");
        assert!(w.agent_store);
        assert_eq!(w.source, EnvSource::Torchrun);
    }

    #[test]
    fn slurm_variables() {
        let w = from(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_TASKS_PER_NODE", "4(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[03-04]"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank, w.local_world_size), (5, 8, 1, 4));
        assert_eq!(w.master_addr, "gpu03");
        assert_eq!(w.master_port, 20000 + 3456);
        assert_eq!(w.source, EnvSource::Slurm);
    }

    #[test]
    fn open_mpi_variables() {
        let w = from(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.world_size), (1, 2));
        assert_eq!(w.store_addr(), "127.0.0.1:29500");
        // Across nodes the master cannot be guessed.
        let err = from(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("MASTER_ADDR"), "{err}");
    }

    #[test]
    fn the_rendezvous_token_comes_from_its_variable_and_a_bad_one_is_named() {
        let base = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")];
        assert_eq!(from(&base).unwrap().token, None);
        let w = from(&[&base[..], &[("FERROSPEED_RDZV_TOKEN", "0123456789abcdef0123\n")]].concat()).unwrap();
        assert_eq!(w.token.as_ref().map(RdzvToken::expose), Some("0123456789abcdef0123"));
        let err = from(&[&base[..], &[("FERROSPEED_RDZV_TOKEN", "abc")]].concat()).unwrap_err().to_string();
        assert!(err.contains("FERROSPEED_RDZV_TOKEN") && err.contains("at least 16"), "{err}");
    }

    #[test]
    fn no_variables_is_a_single_process() {
        assert_eq!(from(&[]).unwrap(), WorldInfo::single());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK"),
            (&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "RANK"),
            (&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")], "MASTER_ADDR"),
            (&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "99999")], "MASTER_PORT"),
            (&[("WORLD_SIZE", "2")], "RANK"),
        ];
        for (vars, name) in cases {
            let err = from(vars).unwrap_err().to_string();
            assert!(err.contains(name), "{vars:?}: {err}");
        }
    }

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_host("gpu[03-05,09],cpu1").as_deref(), Some("gpu03"));
        assert_eq!(first_host("node7,node8").as_deref(), Some("node7"));
        assert_eq!(first_host("single").as_deref(), Some("single"));
        assert_eq!(first_host("").as_deref(), None);
    }
}
