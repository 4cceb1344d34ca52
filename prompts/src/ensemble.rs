//! The WinCLIP compositional prompt ensemble, as data.
//!
//! A sentence is a *template* (how the photo was taken) filled with a *state*
//! phrase (what the object looks like), itself filled with the object name:
//! `"a close-up photo of a {}."` + `"{} without defect"` + `"metal nut"` gives
//! `"a close-up photo of a metal nut without defect."`.

use crate::PromptError;

/// State phrases of a defect-free object; `{}` is the object.
pub const NORMAL_STATES: [&str; 7] = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
];

/// State phrases of a defective object; `{}` is the object.
pub const ANOMALOUS_STATES: [&str; 4] = [
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
];

/// Sentence templates describing the photo; `{}` is a filled state phrase.
pub const TEMPLATES: [&str; 21] = [
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    // Twice, as in anomalib's list: it weighs this template double, and the
    // same list gives the same class vectors (core/tests/winclip_reference.rs).
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
];

/// The sentences of both classes for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptSentences {
    /// Sentences describing a defect-free object.
    pub normal: Vec<String>,
    /// Sentences describing a defective object.
    pub anomalous: Vec<String>,
}

/// A prompt ensemble: templates × states, plus extra user sentences.
///
/// [`PromptSet::winclip`] is the default ensemble; user defect descriptions
/// ("scratch on the thread") become extra anomalous states with
/// [`PromptSet::with_defect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptSet {
    templates: Vec<String>,
    normal_states: Vec<String>,
    anomalous_states: Vec<String>,
    normal_sentences: Vec<String>,
    anomalous_sentences: Vec<String>,
}

impl Default for PromptSet {
    fn default() -> Self {
        Self::winclip()
    }
}

impl PromptSet {
    /// The WinCLIP ensemble: 7 normal and 4 anomalous states × 21 templates.
    pub fn winclip() -> Self {
        Self {
            templates: TEMPLATES.iter().map(|s| (*s).to_owned()).collect(),
            normal_states: NORMAL_STATES.iter().map(|s| (*s).to_owned()).collect(),
            anomalous_states: ANOMALOUS_STATES.iter().map(|s| (*s).to_owned()).collect(),
            normal_sentences: Vec::new(),
            anomalous_sentences: Vec::new(),
        }
    }

    /// The WinCLIP templates and normal states with no anomalous state: add
    /// one description with [`PromptSet::with_defect`] to ask about that
    /// defect alone.
    pub fn winclip_normal() -> Self {
        Self {
            anomalous_states: Vec::new(),
            ..Self::winclip()
        }
    }

    /// A set with no template, state or sentence; build it up with the `with_*` methods.
    pub fn empty() -> Self {
        Self {
            templates: Vec::new(),
            normal_states: Vec::new(),
            anomalous_states: Vec::new(),
            normal_sentences: Vec::new(),
            anomalous_sentences: Vec::new(),
        }
    }

    /// Adds a user-typed defect description as an anomalous state.
    ///
    /// `"scratch on the thread"` becomes the state `"{} with scratch on the
    /// thread"`, filled into every template. A description that already holds
    /// a `{}` is used as the state verbatim (`"a cracked {}"`). Underscores
    /// become spaces (`"broken_large"` → `"broken large"`) and whitespace is
    /// collapsed; a blank description is an error.
    pub fn with_defect(mut self, description: &str) -> Result<Self, PromptError> {
        let phrase = object_phrase(description);
        if phrase.is_empty() {
            return Err(PromptError::EmptyDescription);
        }
        let state = if phrase.contains("{}") {
            check_placeholder(&phrase)?;
            phrase
        } else {
            format!("{{}} with {phrase}")
        };
        if !self.anomalous_states.contains(&state) {
            self.anomalous_states.push(state);
        }
        Ok(self)
    }

    /// Adds several defect descriptions; see [`PromptSet::with_defect`].
    pub fn with_defects<S: AsRef<str>>(self, descriptions: &[S]) -> Result<Self, PromptError> {
        descriptions
            .iter()
            .try_fold(self, |set, d| set.with_defect(d.as_ref()))
    }

    /// Adds a normal state phrase; it must hold one `{}` for the object.
    pub fn with_normal_state(mut self, state: &str) -> Result<Self, PromptError> {
        check_placeholder(state)?;
        self.normal_states.push(state.to_owned());
        Ok(self)
    }

    /// Adds an anomalous state phrase; it must hold one `{}` for the object.
    pub fn with_anomalous_state(mut self, state: &str) -> Result<Self, PromptError> {
        check_placeholder(state)?;
        self.anomalous_states.push(state.to_owned());
        Ok(self)
    }

    /// Adds a sentence template; it must hold one `{}` for the state phrase.
    pub fn with_template(mut self, template: &str) -> Result<Self, PromptError> {
        check_placeholder(template)?;
        self.templates.push(template.to_owned());
        Ok(self)
    }

    /// Adds a whole normal sentence, used as is (no template, no object).
    pub fn with_normal_sentence(mut self, sentence: &str) -> Self {
        self.normal_sentences.push(sentence.to_owned());
        self
    }

    /// Adds a whole anomalous sentence, used as is (no template, no object).
    pub fn with_anomalous_sentence(mut self, sentence: &str) -> Self {
        self.anomalous_sentences.push(sentence.to_owned());
        self
    }

    /// The sentence templates.
    pub fn templates(&self) -> &[String] {
        &self.templates
    }

    /// The normal state phrases.
    pub fn normal_states(&self) -> &[String] {
        &self.normal_states
    }

    /// The anomalous state phrases, user defects included.
    pub fn anomalous_states(&self) -> &[String] {
        &self.anomalous_states
    }

    /// All sentences for `object` (an object name such as `"metal_nut"`;
    /// underscores become spaces), grouped by class: every state × every
    /// template, then the extra sentences.
    pub fn sentences(&self, object: &str) -> PromptSentences {
        let object = object_phrase(object);
        let expand = |states: &[String], extra: &[String]| {
            let mut out = Vec::with_capacity(states.len() * self.templates.len() + extra.len());
            for state in states {
                let filled = fill(state, &object);
                for template in &self.templates {
                    out.push(fill(template, &filled));
                }
            }
            out.extend(extra.iter().cloned());
            out
        };
        PromptSentences {
            normal: expand(&self.normal_states, &self.normal_sentences),
            anomalous: expand(&self.anomalous_states, &self.anomalous_sentences),
        }
    }

    /// Checks that every sentence for `object` fits in `limit` tokens as
    /// `count` counts them (start and end tokens included); the error names
    /// the longest sentence over the limit.
    pub fn check_lengths(
        &self,
        object: &str,
        limit: usize,
        count: impl Fn(&str) -> Result<usize, PromptError>,
    ) -> Result<(), PromptError> {
        let sentences = self.sentences(object);
        let mut longest: Option<(usize, &String)> = None;
        for sentence in sentences.normal.iter().chain(&sentences.anomalous) {
            let tokens = count(sentence)?;
            if tokens > limit && longest.is_none_or(|(n, _)| tokens > n) {
                longest = Some((tokens, sentence));
            }
        }
        match longest {
            Some((tokens, sentence)) => Err(PromptError::TooLong {
                sentence: sentence.clone(),
                tokens,
                limit,
            }),
            None => Ok(()),
        }
    }

    /// A stable 64-bit fingerprint of the sentences produced for `object`:
    /// equal sentence lists give equal fingerprints across runs, platforms and
    /// compiler versions (FNV-1a, not `std`'s hasher). Used as a cache key.
    pub fn fingerprint(&self, object: &str) -> u64 {
        let sentences = self.sentences(object);
        let mut hash = Fnv1a::new();
        for (tag, list) in [(b'N', &sentences.normal), (b'A', &sentences.anomalous)] {
            hash.write(&[tag]);
            hash.write(&(list.len() as u64).to_le_bytes());
            for s in list {
                hash.write(&(s.len() as u64).to_le_bytes());
                hash.write(s.as_bytes());
            }
        }
        hash.finish()
    }
}

/// Turns an object or defect name into words: `"metal_nut"` → `"metal nut"`,
/// surrounding and repeated whitespace removed.
pub fn object_phrase(name: &str) -> String {
    name.replace('_', " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_placeholder(pattern: &str) -> Result<(), PromptError> {
    if pattern.matches("{}").count() == 1 {
        Ok(())
    } else {
        Err(PromptError::Placeholder {
            pattern: pattern.to_owned(),
        })
    }
}

fn fill(pattern: &str, value: &str) -> String {
    pattern.replacen("{}", value, 1)
}

pub(crate) struct Fnv1a(u64);

impl Fnv1a {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn winclip_counts() {
        let s = PromptSet::winclip().sentences("metal_nut");
        assert_eq!(s.normal.len(), 7 * 21);
        assert_eq!(s.anomalous.len(), 4 * 21);
        assert_eq!(s.normal[0], "a cropped photo of the metal nut.");
        assert!(
            s.normal
                .contains(&"a photo of a metal nut without defect for visual inspection.".into())
        );
        assert!(
            s.anomalous
                .contains(&"a close-up photo of a damaged metal nut.".into())
        );
    }

    #[test]
    fn blank_descriptions_are_refused() {
        for blank in ["", "   ", "_ _", "\t\n"] {
            assert!(matches!(
                PromptSet::winclip().with_defect(blank),
                Err(PromptError::EmptyDescription)
            ));
        }
    }

    #[test]
    fn long_sentences_are_named_with_their_length() {
        let words = |s: &str| Ok(s.split_whitespace().count() + 2);
        let set = PromptSet::winclip().with_defect("deep scratch").unwrap();
        // The longest sentence: "a photo of the screw with deep scratch for
        // visual inspection." is 11 words + start + end.
        assert!(set.check_lengths("screw", 13, words).is_ok());
        match set.check_lengths("screw", 12, words) {
            Err(PromptError::TooLong {
                sentence,
                tokens,
                limit,
            }) => {
                assert_eq!((tokens, limit), (13, 12));
                assert!(sentence.contains("deep scratch"), "{sentence}");
            }
            other => panic!("expected TooLong, got {other:?}"),
        }
    }

    #[test]
    fn defects_become_anomalous_states() {
        let set = PromptSet::winclip()
            .with_defects(&["scratch on the thread", "a cracked {}", "broken_large"])
            .unwrap();
        let s = set.sentences("screw");
        assert_eq!(s.anomalous.len(), 7 * 21);
        assert!(
            s.anomalous
                .contains(&"a photo of a screw with scratch on the thread.".into())
        );
        assert!(
            s.anomalous
                .contains(&"a photo of the a cracked screw.".into())
        );
        assert!(
            s.anomalous
                .contains(&"a dark photo of a screw with broken large.".into())
        );
        // Adding the same description twice changes nothing.
        let again = set.clone().with_defect("scratch on the thread").unwrap();
        assert_eq!(again, set);
    }

    #[test]
    fn placeholders_are_checked() {
        assert!(
            PromptSet::winclip()
                .with_template("no placeholder")
                .is_err()
        );
        assert!(PromptSet::winclip().with_normal_state("{} and {}").is_err());
        assert!(PromptSet::winclip().with_defect("{} with {}").is_err());
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let a = PromptSet::winclip();
        assert_eq!(
            a.fingerprint("screw"),
            PromptSet::winclip().fingerprint("screw")
        );
        assert_ne!(a.fingerprint("screw"), a.fingerprint("bottle"));
        let b = a.clone().with_defect("rust").unwrap();
        assert_ne!(a.fingerprint("screw"), b.fingerprint("screw"));
        // Pinned value: changing the ensemble or the hash must be deliberate.
        assert_eq!(
            PromptSet::empty()
                .with_normal_sentence("a")
                .with_anomalous_sentence("b")
                .fingerprint("x"),
            PINNED
        );
    }

    const PINNED: u64 = 10_182_726_425_552_913_011;
}
