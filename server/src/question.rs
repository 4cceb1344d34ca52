//! Reading a chat question for `/v1/ask`: which defects it asks about, and
//! which loaded model it means.
//!
//! The rule for defect phrases, in order:
//! 1. drop the question mark and other end punctuation;
//! 2. split on commas, semicolons, slashes and the words "or", "and";
//! 3. in each part, drop leading question words ("is there any", "does it
//!    have", "check for", …) and trailing place words ("on this part",
//!    "in the image", …);
//! 4. a part ending in a defect's participle ("cracked", "scratched", …)
//!    becomes that defect's noun ("crack"): the other words name the part;
//! 5. a part made only of greetings or general words ("hello", "ok",
//!    "defective") is dropped;
//! 6. keep the non-empty parts, in order, without repeats.
//!
//! "any chips or scratches on this part?" → `["chips", "scratches"]`;
//! "is this tile cracked?" → `["crack"]`; "is this ok?" → `[]` (the
//! general verdict); "hello" → `[]`, and [`names_nothing`] says it asks
//! nothing, so `/v1/ask` asks for a defect instead of answering.
//!
//! The model: the `model` field when given, else the only model, else the
//! one model whose name or object shares the most words with the question
//! (a word of the name counts twice), where words are compared lower-cased
//! with a plural `s` dropped ("cell" finds the model named "cells"). A tie or
//! no shared word is no match.

/// Words dropped from the start of a phrase.
const LEADING: &[&str] = &[
    "is", "are", "was", "were", "does", "do", "did", "has", "have", "had", "can", "could", "will",
    "would", "should", "there", "here", "any", "anything", "some", "it", "this", "that", "these",
    "those", "they", "you", "i", "we", "see", "find", "spot", "detect", "show", "me", "us",
    "check", "look", "looking", "for", "please", "tell", "whether", "if", "a", "an", "the", "of",
    "part", "image", "picture", "photo", "one", "got", "contain", "contains", "visible", "signs",
    "sign",
];

/// A defect's participle or adjective, and its noun.
const PARTICIPLES: &[(&str, &str)] = &[
    ("cracked", "crack"),
    ("scratched", "scratch"),
    ("chipped", "chip"),
    ("dented", "dent"),
    ("stained", "stain"),
    ("bent", "bend"),
    ("broken", "break"),
    ("torn", "tear"),
    ("damaged", "damage"),
    ("contaminated", "contamination"),
    ("rusted", "rust"),
    ("rusty", "rust"),
    ("corroded", "corrosion"),
    ("deformed", "deformation"),
    ("discoloured", "discolouration"),
    ("discolored", "discoloration"),
    ("scuffed", "scuff"),
    ("warped", "warp"),
    ("burnt", "burn"),
    ("burned", "burn"),
    ("misaligned", "misalignment"),
    ("holed", "hole"),
    ("cut", "cut"),
];

/// Words that name no defect: greetings, and the general verdict.
const GREETINGS: &[&str] = &[
    "hello",
    "hi",
    "hey",
    "thanks",
    "thank",
    "you",
    "help",
    "please",
    "morning",
    "evening",
    "afternoon",
    "good",
    "yo",
    "there",
];
/// Words asking for the general verdict ("is this ok?").
const GENERAL: &[&str] = &[
    "ok",
    "okay",
    "fine",
    "normal",
    "defective",
    "anomalous",
    "faulty",
    "bad",
    "flawed",
    "good",
    "acceptable",
    "alright",
    "right",
    "wrong",
    "defect",
    "defects",
    "anomaly",
    "anomalies",
    "flaw",
    "flaws",
    "problem",
    "problems",
    "issue",
    "issues",
];

/// Words that start a trailing place phrase ("on this part").
const PLACE_PREPOSITIONS: &[&str] = &["on", "in", "at", "of"];
/// What a trailing place phrase refers to.
const PLACE_NOUNS: &[&str] = &[
    "part", "parts", "image", "images", "picture", "photo", "one", "it", "item", "piece", "sample",
    "here",
];
const PLACE_DETERMINERS: &[&str] = &["this", "that", "the", "my", "our"];

/// The defect phrases of `question`, by the rule in the module docs.
pub fn defect_phrases(question: &str) -> Vec<String> {
    let trimmed = question.trim().trim_end_matches(['?', '!', '.']).trim();
    let mut phrases: Vec<String> = Vec::new();
    for part in trimmed.split([',', ';', '/', '?', '!', '.']) {
        for piece in split_on_words(part, &["or", "and"]) {
            let phrase = noun_of(strip_place(&strip_leading(&piece)));
            if phrase.is_empty() || only_words(&phrase, &[GREETINGS, GENERAL]) {
                continue;
            }
            if !phrases.contains(&phrase) {
                phrases.push(phrase);
            }
        }
    }
    phrases
}

/// Whether `question` names neither a defect nor the general verdict
/// ("hello", "is it?"): it is answered with a request for a defect. An
/// empty question asks for the general verdict.
pub fn names_nothing(question: &str) -> bool {
    // No text at all asks for the general verdict (an image sent alone).
    !question.trim().is_empty()
        && defect_phrases(question).is_empty()
        && !lower_words(question)
            .iter()
            .any(|w| GENERAL.contains(&w.as_str()))
}

fn lower_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn only_words(phrase: &str, lists: &[&[&str]]) -> bool {
    lower_words(phrase)
        .iter()
        .all(|w| lists.iter().any(|l| l.contains(&w.as_str())))
}

/// A phrase ending in a defect's participle is that defect's noun ("tile
/// cracked" → "crack"); others ("bent pins") are kept as they are.
fn noun_of(phrase: String) -> String {
    lower_words(&phrase)
        .last()
        .and_then(|w| PARTICIPLES.iter().find(|(p, _)| p == w))
        .map_or(phrase, |(_, noun)| (*noun).to_owned())
}

fn split_on_words(text: &str, separators: &[&str]) -> Vec<String> {
    let mut out = vec![Vec::new()];
    for word in text.split_whitespace() {
        if separators.contains(&word.to_lowercase().as_str()) {
            out.push(Vec::new());
        } else if let Some(last) = out.last_mut() {
            last.push(word);
        }
    }
    out.into_iter().map(|words| words.join(" ")).collect()
}

fn strip_leading(phrase: &str) -> Vec<String> {
    let words: Vec<&str> = phrase.split_whitespace().collect();
    let start = words
        .iter()
        .position(|w| !LEADING.contains(&w.to_lowercase().as_str()))
        .unwrap_or(words.len());
    words[start..].iter().map(|w| (*w).to_owned()).collect()
}

fn strip_place(words: &[String]) -> String {
    let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    let mut end = words.len();
    // "... on this part", "... in the image", "... on it", "... here"
    for cut in (0..words.len()).rev() {
        let tail: Vec<&str> = lower[cut..].iter().map(String::as_str).collect();
        let is_place = match tail.as_slice() {
            [noun] => *noun == "here",
            [prep, noun] => PLACE_PREPOSITIONS.contains(prep) && PLACE_NOUNS.contains(noun),
            [prep, det, noun] => {
                PLACE_PREPOSITIONS.contains(prep)
                    && PLACE_DETERMINERS.contains(det)
                    && PLACE_NOUNS.contains(noun)
            }
            _ => false,
        };
        if is_place && cut > 0 {
            end = cut;
        }
    }
    words[..end].join(" ")
}

/// Lower-cased words of `text`, with a plural `s` dropped.
fn word_stems(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let w = w.to_lowercase();
            match w.strip_suffix('s') {
                Some(stem) if stem.len() >= 3 && !stem.ends_with('s') => stem.to_owned(),
                _ => w,
            }
        })
        .collect()
}

/// The one model of `models` (name, object) that `text` means, if any.
pub fn match_model<'a>(text: &str, models: &[(&'a str, Option<&str>)]) -> Option<&'a str> {
    let asked = word_stems(text);
    let mut scored: Vec<(usize, &'a str)> = models
        .iter()
        .map(|(name, object)| {
            let mut own = word_stems(name);
            own.sort();
            own.dedup();
            let mut described = object.map(word_stems).unwrap_or_default();
            described.sort();
            described.dedup();
            described.retain(|w| !own.contains(w));
            let hits = |words: &[String]| words.iter().filter(|w| asked.contains(w)).count();
            // A word of the model's name counts double: two models of the
            // same object are told apart by their names.
            (2 * hits(&own) + hits(&described), *name)
        })
        .filter(|(hits, _)| *hits > 0)
        .collect();
    scored.sort_by_key(|s| std::cmp::Reverse(s.0));
    match scored.as_slice() {
        [(best, name), rest @ ..] if rest.first().is_none_or(|(next, _)| next < best) => Some(name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_follow_the_documented_rule() {
        let cases: &[(&str, &[&str])] = &[
            (
                "any chips or scratches on this part?",
                &["chips", "scratches"],
            ),
            ("is the thread damaged?", &["damage"]),
            ("is this tile cracked?", &["crack"]),
            ("Is the cable cut or scratched?", &["cut", "scratch"]),
            ("hello", &[]),
            ("hi there!", &[]),
            (
                "Do you see a crack near the edge, a dark spot, or bent pins?",
                &["crack near the edge", "dark spot", "bent pins"],
            ),
            (
                "check for scratch on the thread",
                &["scratch on the thread"],
            ),
            ("scratch and scratch", &["scratch"]),
            ("is this ok?", &[]),
            ("is it?", &[]),
            ("  ", &[]),
        ];
        for (question, expected) in cases {
            assert_eq!(&defect_phrases(question), expected, "{question:?}");
        }
    }

    #[test]
    fn a_question_without_a_defect_is_told_from_a_general_one() {
        for nothing in ["hello", "hi there!", "is it?", "thanks"] {
            assert!(names_nothing(nothing), "{nothing:?}");
        }
        for something in [
            "",
            "  ",
            "is this ok?",
            "any defects?",
            "is this tile cracked?",
            "scratches",
        ] {
            assert!(!names_nothing(something), "{something:?}");
        }
    }

    #[test]
    fn models_match_by_name_or_object_words() {
        let models = [("cells", Some("solar cell")), ("nuts", Some("metal nut"))];
        assert_eq!(match_model("is this cell ok?", &models), Some("cells"));
        assert_eq!(
            match_model("scratch on the metal nut", &models),
            Some("nuts")
        );
        assert_eq!(match_model("any scratches?", &models), None);
        // A tie is no answer.
        let twins = [("left_cells", None), ("right_cells", None)];
        assert_eq!(match_model("cells please", &twins), None);
        assert_eq!(match_model("the left cells", &twins), Some("left_cells"));
        // Two models of the same object: the name decides.
        let same = [("cells", Some("solar cell")), ("tiles", Some("solar cell"))];
        assert_eq!(match_model("is this cell ok?", &same), Some("cells"));
        assert_eq!(match_model("a solar panel", &same), None);
    }
}
