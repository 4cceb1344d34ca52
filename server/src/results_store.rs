//! The results store a server shares with the TUI (`serve --db`): where
//! the page's OK / NG decisions go, and how each served model is known in
//! it.

use std::collections::BTreeMap;
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
}

impl ResultsStore {
    /// `models`: served name → store entry, for every served model.
    pub fn new(store: Store, models: BTreeMap<String, StoredModel>) -> Self {
        Self {
            store: Mutex::new(store),
            models,
        }
    }
}

/// The results store handle kept in the state.
pub type SharedResults = Arc<ResultsStore>;
