//! Reading a chat question for `/v1/ask`: which defects it asks about, and
//! which loaded model it means.
//!
//! The rule for defect phrases, in order:
//! 1. drop the question mark and other end punctuation;
//! 2. split on commas, semicolons, slashes and the words "or", "and";
//! 3. in each part, drop leading question words ("is there any", "does it
//!    have", "check for", …) and trailing place words ("on this part",
//!    "in the image", …);
//! 4. keep the non-empty parts, in order, without repeats;
//! 5. if none is left, the whole question (trimmed) is the one phrase.
//!
//! "any chips or scratches on this part?" → `["chips", "scratches"]`;
//! "is the thread damaged?" → `["thread damaged"]`.
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
    for part in trimmed.split([',', ';', '/', '?']) {
        for piece in split_on_words(part, &["or", "and"]) {
            let phrase = strip_place(&strip_leading(&piece));
            if !phrase.is_empty() && !phrases.contains(&phrase) {
                phrases.push(phrase);
            }
        }
    }
    if phrases.is_empty() && !trimmed.is_empty() {
        phrases.push(trimmed.to_owned());
    }
    phrases
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
            ("is the thread damaged?", &["thread damaged"]),
            (
                "Do you see a crack near the edge, a dark spot, or bent pins?",
                &["crack near the edge", "dark spot", "bent pins"],
            ),
            (
                "check for scratch on the thread",
                &["scratch on the thread"],
            ),
            ("scratch and scratch", &["scratch"]),
            ("is this ok?", &["ok"]),
            ("is it?", &["is it"]),
            ("  ", &[]),
        ];
        for (question, expected) in cases {
            assert_eq!(&defect_phrases(question), expected, "{question:?}");
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
