//! The job's rendezvous secret: where a rank gets it, and the per-user file that carries it between the
//! ranks of one host when no launcher hands it out.
//!
//! `ferrospeed launch` generates a token per attempt (or takes the user's `--rdzv-token`, needed for
//! several nodes) and gives it to its ranks as `FERROSPEED_RDZV_TOKEN`. Ranks started by srun or mpirun
//! take `FERROSPEED_RDZV_TOKEN` when it is set; without it, and only when every rank is on one host,
//! rank 0 generates one and writes it to a file only this user can read, keyed by the store's port, and
//! the other ranks read it once the store has answered them (so never a stale file of an earlier job).
//! Ranks on several hosts without a token are refused: there is no safe default for them.

use super::env::WorldInfo;
use super::error::CommError;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Environment variable carrying the job's rendezvous secret.
pub const ENV_RDZV_TOKEN: &str = "FERROSPEED_RDZV_TOKEN";

/// Fewer characters than this would be guessable from one recorded handshake.
const MIN_TOKEN_LEN: usize = 16;
/// What every message naming a missing or bad token suggests.
const HOW_TO_MAKE_ONE: &str = "e.g. the output of `openssl rand -hex 32`";

/// The shared secret of one job. Its `Debug` form never shows the secret.
#[derive(Clone)]
pub struct RdzvToken(Arc<str>);

impl RdzvToken {
    /// A fresh random token: 32 bytes from the operating system, as 64 hex digits (so it fits in an
    /// environment variable).
    pub fn generate() -> Result<Self, CommError> {
        let mut bytes = [0u8; 32];
        fill_random(&mut bytes)?;
        Ok(Self(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>().into()))
    }

    /// A token given by the user; `origin` names where it came from in errors (a flag, a variable, a file).
    /// Surrounding white space (a file's last newline) is not part of it.
    pub fn new(text: &str, origin: &str) -> Result<Self, CommError> {
        let text = text.trim();
        if text.len() < MIN_TOKEN_LEN {
            return Err(CommError::BadToken {
                origin: origin.into(),
                reason: format!("it has {} characters; use at least {MIN_TOKEN_LEN}, {HOW_TO_MAKE_ONE}", text.len()),
            });
        }
        if text.chars().any(char::is_control) {
            return Err(CommError::BadToken { origin: origin.into(), reason: "it contains control characters".into() });
        }
        Ok(Self(text.into()))
    }

    /// The token in the file at `path`, which only its owner may read (like ssh's keys).
    pub fn from_file(path: &Path) -> Result<Self, CommError> {
        let origin = path.display().to_string();
        let bad = |reason: String| CommError::BadToken { origin: origin.clone(), reason };
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!("others can read it (mode {:o}); run chmod 600 {origin}", meta.mode() & 0o777)));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
        Self::new(&text, &origin)
    }

    /// `FERROSPEED_RDZV_TOKEN` as read through `get` (the environment, or a map in tests), if set.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, CommError> {
        get(ENV_RDZV_TOKEN).map(|v| Self::new(&v, ENV_RDZV_TOKEN)).transpose()
    }

    /// The token as text, to hand to the ranks' environment (never to a command line).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The HMAC key.
    pub(crate) fn key(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl PartialEq for RdzvToken {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.key().ct_eq(other.key()).into()
    }
}

impl Eq for RdzvToken {}

impl fmt::Debug for RdzvToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RdzvToken(<{} characters, not shown>)", self.0.len())
    }
}

/// Fill `buf` from the operating system's random source.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), CommError> {
    getrandom::fill(buf).map_err(|e| CommError::Random { reason: e.to_string() })
}

/// Where a rank finds the secret of its job.
#[derive(Debug, Clone)]
pub(crate) enum Secret {
    /// Known from the start.
    Token(RdzvToken),
    /// In the token file of this host's store on `port`, in the private folder `dir`
    /// ([`host_token_dir`]), written by rank 0 before its store answers anyone: read after the store's
    /// challenge arrives.
    LocalFile { dir: PathBuf, port: u16 },
}

impl Secret {
    /// The secret of `world`'s job, or why there is none (ranks on several hosts need a token).
    pub(crate) fn for_world(world: &WorldInfo) -> Result<Self, CommError> {
        if let Some(token) = &world.token {
            return Ok(Self::Token(token.clone()));
        }
        if world.agent_store {
            return Err(CommError::MissingToken {
                reason: format!(
                    "a launcher serves the store (FERROSPEED_AGENT_STORE=1) but {ENV_RDZV_TOKEN} is not set; \
                     start the ranks with `ferrospeed launch`, which sets it, or export the launcher's token"
                ),
            });
        }
        if world.local_world_size < world.world_size {
            return Err(CommError::MissingToken {
                reason: format!(
                    "the {} ranks span several hosts ({} on this one) and {ENV_RDZV_TOKEN} is not set; export \
                     the same secret on every host before starting them ({HOW_TO_MAKE_ONE})",
                    world.world_size, world.local_world_size
                ),
            });
        }
        Ok(Self::LocalFile { dir: host_token_dir(), port: world.master_port })
    }

    /// The token itself (reads the file of [`Secret::LocalFile`]).
    pub(crate) fn resolve(&self) -> Result<RdzvToken, CommError> {
        match self {
            Self::Token(t) => Ok(t.clone()),
            Self::LocalFile { dir, port } => read_local_token(dir, *port),
        }
    }
}

/// The token file rank 0 writes for the other ranks of its host; removed when dropped. Drop it before
/// the store stops listening, so that a later job on the same port cannot have written its own yet.
#[derive(Debug)]
pub(crate) struct LocalTokenFile {
    path: PathBuf,
}

impl LocalTokenFile {
    /// Write `token` as the token of this host's store on `port` into the private folder `dir`, made
    /// if missing (replacing any older file).
    pub(crate) fn create(dir: &Path, port: u16, token: &RdzvToken) -> Result<Self, CommError> {
        check_private_dir(dir, true)?;
        let path = dir.join(format!("rdzv-{port}.token"));
        let fail = |e: std::io::Error| CommError::TokenFile { path: path.clone(), reason: e.to_string() };
        // A fresh file of mode 0600 renamed into place: a reader sees the old token or the new, whole.
        let mut suffix = [0u8; 8];
        fill_random(&mut suffix)?;
        let tmp = dir.join(format!(".rdzv-{port}.{}.tmp", u64::from_le_bytes(suffix)));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(token.key()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(e));
        }
        Ok(Self { path })
    }
}

impl Drop for LocalTokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The token of this host's store on `port`, from the file its rank 0 wrote into `dir`.
fn read_local_token(dir: &Path, port: u16) -> Result<RdzvToken, CommError> {
    check_private_dir(dir, false)?;
    let path = dir.join(format!("rdzv-{port}.token"));
    let fail = |reason: String| CommError::TokenFile {
        path: path.clone(),
        reason: format!("{reason}; ranks on other hosts, or not sharing this temporary folder, need {ENV_RDZV_TOKEN}"),
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| fail(format!("cannot open it ({e})")))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(fail("it is not a private file of this user".into()));
    }
    let text = std::io::read_to_string(file).map_err(|e| fail(e.to_string()))?;
    RdzvToken::new(&text, &path.display().to_string())
}

/// `$TMPDIR/ferrospeed-<uid>`: where ranks of one host without a launcher keep their store's token.
pub(crate) fn host_token_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    std::env::temp_dir().join(format!("ferrospeed-{me}"))
}

/// Refuse `dir` unless it is a folder of this user that nobody else can enter (made so when `create`
/// and missing): anyone who could write there could plant a token of their own.
fn check_private_dir(dir: &Path, create: bool) -> Result<(), CommError> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let fail = |reason: String| CommError::TokenFile { path: dir.to_path_buf(), reason };
    if create {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(fail(format!("cannot create it ({e})"))),
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| fail(format!("cannot read it ({e})")))?;
    if !meta.is_dir() || meta.uid() != me || meta.permissions().mode() & 0o077 != 0 {
        return Err(fail(format!(
            "it must be a folder of this user that nobody else can open (mode 700); remove it or set {ENV_RDZV_TOKEN}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::env::EnvSource;

    fn world(rank: usize, world_size: usize, local_world_size: usize, token: Option<RdzvToken>) -> WorldInfo {
        WorldInfo {
            rank,
            world_size,
            local_rank: rank % local_world_size,
            local_world_size,
            master_addr: "127.0.0.1".into(),
            master_port: 1,
            agent_store: false,
            source: EnvSource::Slurm,
            token,
        }
    }

    #[test]
    fn generated_tokens_are_long_distinct_and_never_printed() {
        let (a, b) = (RdzvToken::generate().unwrap(), RdzvToken::generate().unwrap());
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a, b);
        assert_eq!(a, a.clone());
        assert!(!format!("{a:?}").contains(a.expose()), "{a:?}");
    }

    #[test]
    fn short_or_world_readable_tokens_are_refused_with_the_fix() {
        let err = RdzvToken::new("short\n", "--rdzv-token").unwrap_err().to_string();
        assert!(err.contains("--rdzv-token") && err.contains("at least 16") && err.contains("openssl rand"), "{err}");
        assert_eq!(RdzvToken::new(" 0123456789abcdef\n", "x").unwrap().expose(), "0123456789abcdef");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = RdzvToken::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(RdzvToken::from_file(&path).unwrap().expose(), "0123456789abcdef0123");
    }

    #[test]
    fn the_secret_comes_from_the_token_then_the_host_and_never_from_nothing_across_hosts() {
        let t = RdzvToken::generate().unwrap();
        assert!(matches!(Secret::for_world(&world(1, 4, 2, Some(t.clone()))).unwrap(), Secret::Token(x) if x == t));
        assert!(matches!(Secret::for_world(&world(1, 4, 4, None)).unwrap(), Secret::LocalFile { port: 1, dir } if dir == host_token_dir()));
        let err = Secret::for_world(&world(1, 4, 2, None)).unwrap_err().to_string();
        assert!(err.contains("span several hosts") && err.contains(ENV_RDZV_TOKEN), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        let mut launched = world(1, 4, 4, None);
        launched.agent_store = true;
        let err = Secret::for_world(&launched).unwrap_err().to_string();
        assert!(err.contains("ferrospeed launch") && err.contains(ENV_RDZV_TOKEN), "{err}");
    }

    #[test]
    fn rank_0_writes_the_host_token_file_privately_and_removes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, port) = (tmp.path().join("tokens"), 29500);
        let secret = Secret::LocalFile { dir: dir.clone(), port };
        let token = RdzvToken::generate().unwrap();
        let file = LocalTokenFile::create(&dir, port, &token).unwrap();
        assert_eq!(std::fs::metadata(&file.path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(secret.resolve().unwrap(), token);
        // A newer job on the port replaces it whole.
        let newer = RdzvToken::generate().unwrap();
        let file2 = LocalTokenFile::create(&dir, port, &newer).unwrap();
        assert_eq!(secret.resolve().unwrap(), newer);
        drop(file2);
        let err = secret.resolve().unwrap_err().to_string();
        assert!(err.contains("rdzv-29500.token") && err.contains(ENV_RDZV_TOKEN), "{err}");
        drop(file);
        // A folder others can enter is refused on both sides: someone could have planted a token there.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = LocalTokenFile::create(&dir, port, &token).unwrap_err().to_string();
        assert!(err.contains("mode 700") && err.contains(ENV_RDZV_TOKEN), "{err}");
        assert!(secret.resolve().unwrap_err().to_string().contains("mode 700"));
    }
}
