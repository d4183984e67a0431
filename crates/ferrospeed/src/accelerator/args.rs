//! `--config FILE` and `--set key=value` for programs built on the `Accelerator`: the same
//! configuration file and overrides as `ferrospeed train`, with a built-in default for examples.

use super::AccelError;
use crate::config::Config;
use std::path::PathBuf;

/// The config from the process arguments: `--config FILE` (else `default_toml`, the program's own
/// defaults) and any number of `--set key=value`. `[model]` and `[data]` are optional here.
pub fn config_from_args(default_toml: &str) -> Result<Config, AccelError> {
    parse(std::env::args().skip(1), default_toml)
}

fn parse(args: impl Iterator<Item = String>, default_toml: &str) -> Result<Config, AccelError> {
    let mut file: Option<PathBuf> = None;
    let mut sets = Vec::new();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f == "--config" || f == "--set" => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let value = match inline {
            Some(v) => Some(v),
            None if flag == "--config" || flag == "--set" => args.next(),
            None => None,
        };
        match (flag.as_str(), value) {
            ("--config", Some(v)) => file = Some(PathBuf::from(v)),
            ("--set", Some(v)) => sets.push(v),
            ("--config" | "--set", None) => return Err(AccelError::Args(format!("{flag} needs a value"))),
            _ => return Err(AccelError::Args(format!("unknown argument {arg}: use --config FILE and --set key=value"))),
        }
    }
    Ok(match file {
        Some(path) => Config::load_for_program(&path, &sets)?,
        None => Config::from_toml_str_for_program(default_toml, "the built-in config", &sets)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> impl Iterator<Item = String> {
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn defaults_overrides_and_bad_arguments() {
        let c = parse(args(&["--set", "train.steps=7", "--set=zero.stage=2"]), "[train]\nsteps = 3\nglobal_batch = 4\nmicro_batch = 2\nwarmup = 1").unwrap();
        assert_eq!(c.train.steps, 7);
        assert_eq!(c.zero.stage.as_int(), 2);
        let e = parse(args(&["--stage", "2"]), "").unwrap_err();
        assert!(e.to_string().contains("unknown argument --stage"), "{e}");
        let e = parse(args(&["--set"]), "").unwrap_err();
        assert!(e.to_string().contains("--set needs a value"), "{e}");
        let e = parse(args(&["--set", "train.stpes=2"]), "").unwrap_err();
        assert!(e.to_string().contains("train.steps"), "{e}");
    }
}
