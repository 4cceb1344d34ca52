//! The one place a verdict is decided: a 0–1 score against a 0–1 threshold.
//!
//! Every face (CLI, server, TUI, results store) calls [`Verdict::at`]; the
//! model's threshold is [`DECISION_THRESHOLD`](crate::calibration::DECISION_THRESHOLD),
//! a person may choose another one (the TUI's `+` / `-`).

use serde::{Deserialize, Serialize};

use crate::prompt_layer::DefectCheck;

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

/// The verdict of a model and the typed defects checked beside it
/// ([`crate::model::Model::check_defects`]): anomalous when any layer is
/// over its own calibrated threshold. Also names the layers that are:
/// `"model"`, then each flagged description.
pub fn layered(model_anomalous: bool, defects: &[DefectCheck]) -> (bool, Vec<String>) {
    layers(
        model_anomalous,
        defects
            .iter()
            .map(|d| (d.is_anomalous, d.description.as_str())),
    )
}

/// [`layered`] over `(is_anomalous, description)` pairs, for checks kept in
/// another form (a results store's rows).
pub fn layers<'a>(
    model_anomalous: bool,
    defects: impl IntoIterator<Item = (bool, &'a str)>,
) -> (bool, Vec<String>) {
    let mut flagged_by = Vec::new();
    if model_anomalous {
        flagged_by.push("model".to_owned());
    }
    flagged_by.extend(
        defects
            .into_iter()
            .filter(|(is_anomalous, _)| *is_anomalous)
            .map(|(_, description)| description.to_owned()),
    );
    (!flagged_by.is_empty(), flagged_by)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(description: &str, is_anomalous: bool) -> DefectCheck {
        DefectCheck {
            description: description.into(),
            score: if is_anomalous { 0.7 } else { 0.3 },
            probability: 0.5,
            raw_threshold: 0.5,
            is_anomalous,
            estimated_false_alarm_rate: 0.0,
            false_alarm_upper_bound_95: 0.1,
            normal_images: 30,
            location: (0, 0),
        }
    }

    #[test]
    fn any_layer_over_its_threshold_flags_the_image() {
        let none = layered(false, &[check("crack", false)]);
        assert_eq!(none, (false, vec![]));
        let text = layered(false, &[check("crack", true), check("chip", false)]);
        assert_eq!(text, (true, vec!["crack".to_owned()]));
        let both = layered(true, &[check("crack", true)]);
        assert_eq!(both, (true, vec!["model".to_owned(), "crack".to_owned()]));
    }

    #[test]
    fn anomalous_at_and_above_the_threshold() {
        assert_eq!(Verdict::at(0.5, 0.5), Verdict::Anomalous);
        assert_eq!(Verdict::at(0.499, 0.5), Verdict::Ok);
        assert_eq!(Verdict::at(0.3, 0.25), Verdict::Anomalous);
        assert_eq!(Verdict::parse(Verdict::Ok.as_str()), Some(Verdict::Ok));
    }
}
