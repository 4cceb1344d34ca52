//! One module per subcommand. Each exposes `Args` (clap) and `run`.

pub mod bench;
pub mod clip;
pub mod dataset_info;
pub mod demo;
pub mod eval;
pub mod export;
pub mod fit;
pub mod options;
pub mod refit;
pub mod report;
pub mod results;
pub mod score;
pub mod serve;
pub mod tui;
pub mod watch;

use std::process::ExitCode;

/// How a command ended, mapped to the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Bad usage or missing setup (weights, configuration).
    Usage,
    /// Some inputs failed while the others were processed.
    PartialFailure,
}

impl Outcome {
    /// The outcome for an error that stopped a command.
    pub fn from_error(err: &anyhow::Error) -> Self {
        if err.downcast_ref::<UsageError>().is_some() {
            Self::Usage
        } else {
            Self::Failure
        }
    }
}

impl From<Outcome> for ExitCode {
    fn from(outcome: Outcome) -> Self {
        ExitCode::from(match outcome {
            Outcome::Success => 0,
            Outcome::Failure => 1,
            Outcome::Usage => 2,
            Outcome::PartialFailure => 3,
        })
    }
}

/// An error the user fixes by changing the command line or the setup; it
/// exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The error and its causes, each cause said once: many errors already
/// quote their cause in their own message.
pub fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}
