//! Splitting a batch between workers: `flawscope score --shard I/N` keeps
//! the images whose key (their path relative to the folder they were found
//! in) hashes to `I` modulo `N`. The hash is SHA-256, so every worker, on
//! any machine, makes the same split, and N workers with I = 0..N cover
//! every image exactly once.

use std::path::Path;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Most shards accepted.
pub const MAX_SHARDS: u64 = 1_000_000;

/// Shard `index` of `count` (0-based, as Kubernetes' `JOB_COMPLETION_INDEX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("a shard is I/N (e.g. 0/4): the shard index, a slash, the number of shards; got {0:?}")]
    Syntax(String),
    #[error("the number of shards must be between 1 and {MAX_SHARDS}; got {0}")]
    Count(u64),
    #[error("the shard index must be below the number of shards (0 to {max}); got {index}", max = .count - 1)]
    Index { index: u64, count: u64 },
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || ShardError::Syntax(text.to_owned());
        let (index, count) = text.split_once('/').ok_or_else(syntax)?;
        let number = |part: &str| {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            part.parse::<u64>().map_err(|_| syntax())
        };
        let (index, count) = (number(index)?, number(count)?);
        if !(1..=MAX_SHARDS).contains(&count) {
            return Err(ShardError::Count(count));
        }
        if index >= count {
            return Err(ShardError::Index { index, count });
        }
        Ok(Self { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The shard an image with this key belongs to: the first 8 bytes of
    /// the SHA-256 of its path text (components joined by '/', so the
    /// split is the same on every platform), modulo the count.
    pub fn of(key: &Path, count: u64) -> u64 {
        let text: Vec<String> = key
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let digest = Sha256::digest(text.join("/").as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first) % count.max(1)
    }

    /// Whether this shard scores the image with this key.
    pub fn contains(&self, key: &Path) -> bool {
        Self::of(key, self.count) == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!("0/4".parse(), Ok(Shard { index: 0, count: 4 }));
        assert_eq!("3/4".parse(), Ok(Shard { index: 3, count: 4 }));
        assert_eq!("0/1".parse(), Ok(Shard { index: 0, count: 1 }));
        for bad in [
            "", "1", "4/4", "5/4", "0/0", "-1/4", "a/4", "1/b", "1/4/2", "+1/4", " / ",
        ] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        assert_eq!(
            "0/2000000".parse::<Shard>(),
            Err(ShardError::Count(2_000_000))
        );
    }

    #[test]
    fn every_key_lands_in_exactly_one_shard_and_the_split_is_stable() {
        let keys: Vec<String> = (0..400).map(|i| format!("good/{i:03}.png")).collect();
        let count = 4;
        let shards: Vec<Shard> = (0..count).map(|index| Shard { index, count }).collect();
        let mut sizes = [0usize; 4];
        for key in &keys {
            let owners: Vec<u64> = shards
                .iter()
                .filter(|s| s.contains(Path::new(key)))
                .map(|s| s.index)
                .collect();
            assert_eq!(owners.len(), 1, "{key}");
            sizes[owners[0] as usize] += 1;
        }
        // Roughly even (a hash, not a round robin).
        assert!(sizes.iter().all(|&n| (60..=140).contains(&n)), "{sizes:?}");
        // Fixed values: the split must not change between versions.
        // (first 8 bytes of SHA-256, big-endian, mod 1000; checked with
        // Python's hashlib.)
        assert_eq!(Shard::of(Path::new("good/000.png"), 1000), 666);
        assert_eq!(Shard::of(Path::new("a/b.png"), 1000), 515);
        assert_eq!(Shard::of(Path::new("a/b.png"), 1), 0);
    }
}
