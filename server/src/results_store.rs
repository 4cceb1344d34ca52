//! The results store a server shares with the TUI (`serve --db`): where
//! the page's OK / NG decisions go, and how each served model is known in
//! it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use flawscope_results::store::Store;

/// A served model as the results store knows it.
#[derive(Debug, Clone)]
pub struct StoredModel {
    /// The name rows are filed under (the model file's path, as `score
    /// --db` files them).
    pub name: String,
    /// `sha256:<hex>` of the model file, as `score --db` and the TUI key it.
    pub identity: String,
}

/// The results store shared with the TUI, and how each served model is
/// known in it.
#[derive(Debug)]
pub struct ResultsStore {
    pub(crate) store: Mutex<Store>,
    pub(crate) models: BTreeMap<String, StoredModel>,
    /// Results the server scored lately, so a decision can name one
    /// (`result_id`) instead of sending the image to be scored again.
    pub(crate) recent: Mutex<Recent>,
}

impl ResultsStore {
    /// `models`: served name → store entry, for every served model.
    pub fn new(store: Store, models: BTreeMap<String, StoredModel>) -> Self {
        Self {
            store: Mutex::new(store),
            models,
            recent: Mutex::new(Recent::default()),
        }
    }

    /// Keeps `result` and returns its id.
    pub(crate) fn remember(&self, result: RecentResult) -> String {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(result)
    }

    /// The result scored under `id`, while it is still kept.
    pub(crate) fn recall(&self, id: &str) -> Option<RecentResult> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
    }
}

/// Results kept for decisions at most; the oldest go first. Each is a few
/// kilobytes (core's answer as JSON, no map, at most `MAX_REGIONS`
/// regions), so a shift's worth of images stays within tens of megabytes.
pub const RECENT_RESULTS: usize = 4_096;

/// One scored image, as the store will file it when a person decides.
#[derive(Debug, Clone)]
pub struct RecentResult {
    /// The served model's name.
    pub model: String,
    /// The image file's content hash.
    pub content_hash: String,
    pub score: f32,
    pub raw_score: f32,
    pub threshold: f32,
    /// Core's answer as JSON.
    pub inspection: Option<String>,
}

/// A bounded map of recent results by id.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    next: u64,
    order: VecDeque<String>,
    by_id: HashMap<String, RecentResult>,
}

impl Recent {
    fn insert(&mut self, result: RecentResult) -> String {
        self.next += 1;
        // The hash's head keeps ids unguessable across restarts' counters.
        let head: String = result
            .content_hash
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect();
        let id = format!("r{}-{head}", self.next);
        while self.order.len() >= RECENT_RESULTS {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.by_id.insert(id.clone(), result);
        id
    }

    fn get(&self, id: &str) -> Option<RecentResult> {
        self.by_id.get(id).cloned()
    }
}

/// The results store handle kept in the state.
pub type SharedResults = Arc<ResultsStore>;

#[cfg(test)]
mod tests {
    use super::*;

    fn result(n: usize) -> RecentResult {
        RecentResult {
            model: "m".into(),
            content_hash: format!("sha256:{n:064}"),
            score: 0.1,
            raw_score: 0.1,
            threshold: 0.5,
            inspection: None,
        }
    }

    #[test]
    fn recent_results_are_bounded_and_the_oldest_go_first() {
        let mut recent = Recent::default();
        let first = recent.insert(result(0));
        let mut last = String::new();
        for n in 1..=RECENT_RESULTS {
            last = recent.insert(result(n));
        }
        assert_eq!(recent.by_id.len(), RECENT_RESULTS);
        assert!(recent.get(&first).is_none());
        assert_eq!(
            recent.get(&last).unwrap().content_hash,
            result(RECENT_RESULTS).content_hash
        );
        assert!(recent.get("r1-nothing").is_none());
    }
}
