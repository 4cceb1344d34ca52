//! The one place a verdict is decided: a 0–1 score against a 0–1 threshold.
//!
//! Every face (CLI, server, TUI, results store) calls [`Verdict::at`]; the
//! model's threshold is [`DECISION_THRESHOLD`](crate::calibration::DECISION_THRESHOLD),
//! a person may choose another one (the TUI's `+` / `-`).

use serde::{Deserialize, Serialize};

/// The call on one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Anomalous,
}

impl Verdict {
    /// Anomalous at and above the threshold.
    pub fn at(score: f32, threshold: f32) -> Self {
        if score >= threshold {
            Self::Anomalous
        } else {
            Self::Ok
        }
    }

    pub fn is_anomalous(self) -> bool {
        self == Self::Anomalous
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Anomalous => "anomalous",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "ok" => Some(Self::Ok),
            "anomalous" => Some(Self::Anomalous),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anomalous_at_and_above_the_threshold() {
        assert_eq!(Verdict::at(0.5, 0.5), Verdict::Anomalous);
        assert_eq!(Verdict::at(0.499, 0.5), Verdict::Ok);
        assert_eq!(Verdict::at(0.3, 0.25), Verdict::Anomalous);
        assert_eq!(Verdict::parse(Verdict::Ok.as_str()), Some(Verdict::Ok));
    }
}
