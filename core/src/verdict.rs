//! The one place a verdict is decided: a 0–1 score against a 0–1 threshold.
//!
//! The model's threshold is
//! [`DECISION_THRESHOLD`](crate::calibration::DECISION_THRESHOLD) at its own
//! operating point; a request or a person may choose another one. With
//! typed defects, [`flagged_by`] is the one rule that joins the layers.

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

/// What flagged an image: `"model"` first when the model's own verdict is
/// anomalous, then each typed defect over its own calibrated threshold, in
/// the order asked. The image is anomalous when the list is not empty.
/// Takes plain `(is_anomalous, description)` pairs so fresh checks and
/// stored ones go through the same rule.
pub fn flagged_by<'a>(
    model_anomalous: bool,
    defects: impl IntoIterator<Item = (bool, &'a str)>,
) -> Vec<String> {
    let mut flagged = Vec::new();
    if model_anomalous {
        flagged.push("model".to_owned());
    }
    flagged.extend(
        defects
            .into_iter()
            .filter(|(is_anomalous, _)| *is_anomalous)
            .map(|(_, description)| description.to_owned()),
    );
    flagged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_layer_over_its_threshold_flags_the_image() {
        assert!(flagged_by(false, [(false, "crack")]).is_empty());
        let text = flagged_by(false, [(true, "crack"), (false, "chip")]);
        assert_eq!(text, ["crack"]);
        let both = flagged_by(true, [(true, "crack")]);
        assert_eq!(both, ["model", "crack"]);
    }

    #[test]
    fn anomalous_at_and_above_the_threshold() {
        assert_eq!(Verdict::at(0.5, 0.5), Verdict::Anomalous);
        assert_eq!(Verdict::at(0.499, 0.5), Verdict::Ok);
        assert_eq!(Verdict::at(0.3, 0.25), Verdict::Anomalous);
        assert_eq!(Verdict::parse(Verdict::Ok.as_str()), Some(Verdict::Ok));
    }
}
