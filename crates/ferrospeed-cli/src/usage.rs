//! Bad input from the user: one line saying what to change, exit code 2, nothing started.

use clap::error::ErrorKind;
use std::process::ExitCode;

/// An error in what the user typed or configured (as opposed to a failure while running).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Shorthand for returning a [`UsageError`] from a function that returns `anyhow::Result`.
pub fn usage_error(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// Print clap's error as one line (help and version print as usual) and pick the exit code.
pub fn report_clap_error(e: clap::Error) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand { ExitCode::from(2) } else { ExitCode::SUCCESS };
    }
    eprintln!("{}", one_line(&e.to_string()));
    ExitCode::from(2)
}

/// clap's multi-line message (error, tip, usage) folded into one line without the usage block.
fn one_line(text: &str) -> String {
    let parts: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect();
    let mut line = parts.join(" ");
    if !line.starts_with("error:") {
        line = format!("error: {line}");
    }
    format!("{line} (see --help)")
}

#[cfg(test)]
mod tests {
    #[test]
    fn folds_clap_messages() {
        let text = "error: unexpected argument '--nproc' found\n\n  tip: a similar argument exists: '--nproc-per-node'\n\nUsage: ferrospeed launch [OPTIONS]\n\nFor more information, try '--help'.\n";
        let short = "error: invalid value '0' for '--nproc-per-node': must be at least 1\n\nFor more information, try '--help'.\n";
        assert_eq!(super::one_line(short), "error: invalid value '0' for '--nproc-per-node': must be at least 1 (see --help)");
        assert_eq!(
            super::one_line(text),
            "error: unexpected argument '--nproc' found tip: a similar argument exists: '--nproc-per-node' (see --help)"
        );
    }
}
