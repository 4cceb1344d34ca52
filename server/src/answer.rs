//! Short human-readable answers for chat-ops: verdict, score, where the
//! anomaly is and how large.

use flawscope_core::prompt_layer::DefectCheck;

use flawscope_core::model::Inspection;

/// Where `(x, y)` lies in a `width × height` image, in words ("in the upper
/// left", "at the top", "in the centre", …).
pub fn position(x: usize, y: usize, width: usize, height: usize) -> &'static str {
    let third = |v: usize, len: usize| (v.saturating_mul(3) / len.max(1)).min(2);
    match (third(y, height), third(x, width)) {
        (0, 0) => "in the upper left",
        (0, 1) => "at the top",
        (0, _) => "in the upper right",
        (1, 0) => "on the left",
        (1, 1) => "in the centre",
        (1, _) => "on the right",
        (_, 0) => "in the lower left",
        (_, 1) => "at the bottom",
        _ => "in the lower right",
    }
}

/// A share of the image as a percentage in words.
pub fn percent(fraction: f64) -> String {
    let p = fraction * 100.0;
    if p < 0.1 {
        "under 0.1%".to_owned()
    } else {
        format!("about {p:.1}%")
    }
}

/// What an answer says when typed defects could not be checked (the
/// reason, for whoever runs the server, is in the JSON).
pub const UNCHECKED: &str =
    "The typed defects could not be checked here; the verdict is the model's own.";

/// What an answer says where an uncalibrated (zero-shot) score decides.
pub const UNCALIBRATED: &str =
    "Uncalibrated: no false-alarm rate has been measured for this verdict.";

/// A false-alarm bound as a line operator reads it: "1 in 4 normal parts
/// could be flagged, at worst, judging from 10 normal images".
pub fn bound_words(upper_95: f64, normal_images: usize) -> String {
    format!(
        "{} normal parts could be flagged, at worst, judging from {normal_images} normal images",
        flawscope_results::report::one_in(upper_95)
    )
}

/// One typed defect's verdict in a sentence: "\"crack\": flagged — score
/// 0.71; 1 in 4 normal parts could be flagged, at worst, judging from 10
/// normal images; strongest in the lower left."
pub fn describe_defect(d: &DefectCheck, width: usize, height: usize) -> String {
    let (x, y) = (d.location.0 as usize, d.location.1 as usize);
    let cost = if d.normal_images == 0 {
        "uncalibrated (no false-alarm rate measured)".to_owned()
    } else {
        bound_words(d.false_alarm_upper_bound_95, d.normal_images)
    };
    format!(
        "\"{}\": {} — score {:.2}; {cost}; strongest {}.",
        d.description,
        if d.is_anomalous {
            "flagged"
        } else {
            "not seen"
        },
        d.score,
        position(x, y, width, height)
    )
}

/// The answer to a question about typed defects, in one paragraph: a yes or
/// no on the asked defects first, then each defect's sentence, then the
/// model's own verdict. When the `asked` defects were not checked, it says
/// so in an operator's words (the reason is the JSON's `note`).
pub fn ask_answer(model: &str, scored: &Inspection, asked: &[String]) -> String {
    let checks = &scored.defects;
    let general = describe(model, scored);
    if checks.is_empty() {
        if asked.is_empty() {
            return general;
        }
        let names: Vec<String> = asked.iter().map(|a| format!("\"{a}\"")).collect();
        return format!(
            "{general} The defects asked about ({}) could not be checked here; the verdict is \
             the model's own.",
            join_words(&names)
        );
    }
    let flagged: Vec<String> = checks
        .iter()
        .filter(|d| d.is_anomalous)
        .map(|d| format!("\"{}\"", d.description))
        .collect();
    let lead = if flagged.is_empty() {
        "No: none of the asked defects is seen.".to_owned()
    } else {
        format!("Yes: {} seen.", join_words(&flagged))
    };
    let mut text = lead;
    for d in checks {
        text.push(' ');
        text.push_str(&describe_defect(d, scored.width, scored.height));
    }
    text.push_str(" Overall, ");
    text.push_str(&general);
    text
}

/// "a", "a and b", "a, b and c".
fn join_words(words: &[String]) -> String {
    match words {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The answer for one scored image.
pub fn describe(model: &str, scored: &Inspection) -> String {
    let verdict = format!(
        "{model}: {} — score {:.2} (threshold {:.2}).",
        if scored.model_is_anomalous {
            "anomalous"
        } else {
            "looks normal"
        },
        scored.score,
        scored.threshold
    );
    // Zero-shot decides without a calibration: said in every answer.
    let verdict = if scored.operating_point.normal_images == 0 {
        format!("{verdict} {UNCALIBRATED}")
    } else {
        verdict
    };
    let total = scored.width.saturating_mul(scored.height).max(1) as f64;
    let main = scored.regions.first().map(|r| {
        let (cx, cy) = (r.x + r.w / 2, r.y + r.h / 2);
        (
            position(cx, cy, scored.width, scored.height),
            percent(r.area as f64 / total),
        )
    });
    let others = scored.regions.len().saturating_sub(1);
    let more = match others {
        0 => String::new(),
        1 => format!(
            " 1 more area is flagged; {} of the image in all.",
            percent(scored.anomalous_fraction)
        ),
        n => format!(
            " {n} more areas are flagged; {} of the image in all.",
            percent(scored.anomalous_fraction)
        ),
    };
    match (scored.model_is_anomalous, main) {
        (true, Some((place, size))) => {
            format!("{verdict} The main anomaly is {place}, {size} of the image.{more}")
        }
        (true, None) => {
            let (x, y) = scored.hotspot;
            format!(
                "{verdict} No single area stands out in the map; the strongest response is {}.",
                position(x, y, scored.width, scored.height)
            )
        }
        (false, Some((place, size))) => {
            format!("{verdict} A borderline area is {place}, {size} of the image.{more}")
        }
        (false, None) => verdict,
    }
}

#[cfg(test)]
mod tests {
    use flawscope_core::regions::Region;

    use super::*;

    fn scored(is_anomalous: bool, regions: Vec<Region>) -> Inspection {
        scored_with(is_anomalous, regions, Vec::new())
    }

    fn scored_with(
        is_anomalous: bool,
        regions: Vec<Region>,
        defects: Vec<DefectCheck>,
    ) -> Inspection {
        let anomalous_pixels: usize = regions.iter().map(|r| r.area).sum();
        Inspection {
            score: if is_anomalous { 0.87 } else { 0.2 },
            raw_score: 0.0,
            is_anomalous,
            threshold: 0.5,
            model_is_anomalous: is_anomalous,
            flagged_by: Vec::new(),
            defects,
            defects_unchecked: None,
            // A calibrated model's point; zero-shot's is tested on its own.
            operating_point: flawscope_core::operating_point::OperatingPoint {
                normal_images: 10,
                warning: None,
                ..flawscope_core::operating_point::OperatingPoint::probability()
            },
            width: 300,
            height: 200,
            regions,
            anomalous_fraction: anomalous_pixels as f64 / 60_000.0,
            anomalous_pixels,
            hotspot: (290, 190),
            map: flawscope_core::anomaly_map::AnomalyMap::default(),
        }
    }

    fn check(description: &str, is_anomalous: bool) -> DefectCheck {
        DefectCheck {
            description: description.into(),
            score: if is_anomalous { 0.71 } else { 0.3 },
            probability: 0.5,
            raw_threshold: 0.5,
            is_anomalous,
            estimated_false_alarm_rate: 0.0,
            false_alarm_upper_bound_95: 0.26,
            normal_images: 10,
            location: (20, 180),
        }
    }

    #[test]
    fn ask_answers_lead_with_the_asked_defects() {
        let with = |checks: Vec<DefectCheck>| scored_with(false, vec![], checks);
        let asked = vec!["crack".to_owned()];
        let yes = ask_answer(
            "cells",
            &with(vec![check("crack", true), check("dark spot", false)]),
            &asked,
        );
        assert_eq!(
            yes,
            "Yes: \"crack\" seen. \"crack\": flagged — score 0.71; 1 in 4 normal parts could be \
             flagged, at worst, judging from 10 normal images; strongest in the lower left. \
             \"dark spot\": not seen — score 0.30; 1 in 4 normal parts could be flagged, at \
             worst, judging from 10 normal images; strongest in the lower left. Overall, cells: \
             looks normal — score 0.20 (threshold 0.50)."
        );
        let no = ask_answer("cells", &with(vec![check("crack", false)]), &asked);
        assert!(
            no.starts_with("No: none of the asked defects is seen."),
            "{no}"
        );
        let both = ask_answer(
            "cells",
            &with(vec![check("a", true), check("b", true), check("c", true)]),
            &asked,
        );
        assert!(
            both.starts_with("Yes: \"a\", \"b\" and \"c\" seen."),
            "{both}"
        );
        // Why the defects were not checked is the JSON note's, not the
        // answer's: no developer advice reaches an operator.
        let unchecked = ask_answer("cells", &with(vec![]), &asked);
        assert_eq!(
            unchecked,
            "cells: looks normal — score 0.20 (threshold 0.50). The defects asked about \
             (\"crack\") could not be checked here; the verdict is the model's own."
        );
        assert!(!unchecked.contains("--") && !unchecked.contains("fit"));
        let general = ask_answer("cells", &with(vec![]), &[]);
        assert_eq!(
            general,
            "cells: looks normal — score 0.20 (threshold 0.50)."
        );
    }

    #[test]
    fn zero_shot_answers_say_uncalibrated() {
        let mut zero_shot = scored(true, vec![]);
        zero_shot.operating_point = flawscope_core::operating_point::OperatingPoint::probability();
        let text = describe("zero-shot", &zero_shot);
        assert!(
            text.starts_with(
                "zero-shot: anomalous — score 0.87 (threshold 0.50). Uncalibrated: no \
                 false-alarm rate has been measured for this verdict."
            ),
            "{text}"
        );
        let mut unmeasured = check("crack", true);
        unmeasured.normal_images = 0;
        let defect = describe_defect(&unmeasured, 300, 200);
        assert!(defect.contains("uncalibrated"), "{defect}");
        assert!(!defect.contains("normal parts"), "{defect}");
    }

    #[test]
    fn positions_cover_the_nine_cells() {
        assert_eq!(position(0, 0, 300, 300), "in the upper left");
        assert_eq!(position(150, 10, 300, 300), "at the top");
        assert_eq!(position(150, 150, 300, 300), "in the centre");
        assert_eq!(position(299, 299, 300, 300), "in the lower right");
        assert_eq!(position(5, 5, 0, 0), "in the lower right");
    }

    #[test]
    fn answers_say_verdict_place_and_size() {
        let region = Region {
            x: 10,
            y: 5,
            w: 40,
            h: 30,
            peak: 0.9,
            area: 600,
        };
        let text = describe("cells", &scored(true, vec![region]));
        assert_eq!(
            text,
            "cells: anomalous — score 0.87 (threshold 0.50). The main anomaly is in the upper left, about 1.0% of the image."
        );
        let two = describe("cells", &scored(true, vec![region, region]));
        assert!(two.ends_with("1 more area is flagged; about 2.0% of the image in all."));
        let ok = describe("cells", &scored(false, vec![]));
        assert_eq!(ok, "cells: looks normal — score 0.20 (threshold 0.50).");
        let diffuse = describe("cells", &scored(true, vec![]));
        assert!(diffuse.ends_with("the strongest response is in the lower right."));
    }
}
