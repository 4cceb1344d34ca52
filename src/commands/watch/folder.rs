//! Which files in the watched folder are ready to score: told by folder
//! events (a file closed after writing, or renamed in) and, because events
//! can be missed (network mounts, a full event queue, files already there
//! at start-up), by a periodic rescan that takes a file once its size and
//! time stamp have stood still for the settle time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime};

use flawscope_core::images::has_image_extension;
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};

use super::metrics::Metrics;

/// How the folder is watched.
#[derive(Debug, Clone)]
pub struct FolderOptions {
    pub dir: PathBuf,
    pub recursive: bool,
    /// Folders inside `dir` never read (the `--move-to` folders).
    pub skip: Vec<PathBuf>,
    /// How long a file found by a rescan must stand still.
    pub settle: Duration,
    /// How long a file being written (an event seen, no close yet) may
    /// stand still before it is taken anyway.
    pub stalled: Duration,
    pub rescan: Duration,
}

/// A file's size and time stamp: when either changes, it is another file.
type Signature = (u64, Option<SystemTime>);

fn signature(path: &Path) -> Option<Signature> {
    let meta = std::fs::metadata(path).ok()?;
    meta.is_file().then(|| (meta.len(), meta.modified().ok()))
}

/// A file seen changing, not yet ready.
struct Candidate {
    signature: Option<Signature>,
    /// Since when the signature has not changed.
    still_since: Instant,
    /// How long it must stay still.
    wait: Duration,
}

struct Folder {
    options: FolderOptions,
    candidates: HashMap<PathBuf, Candidate>,
    /// Files handed to the scorer, with the signature they had: handed again
    /// only when it changes.
    sent: HashMap<PathBuf, Signature>,
    ready: SyncSender<PathBuf>,
    metrics: Arc<Metrics>,
}

impl Folder {
    fn wanted(&self, path: &Path) -> bool {
        if !has_image_extension(path) || self.options.skip.iter().any(|s| path.starts_with(s)) {
            return false;
        }
        let Ok(relative) = path.strip_prefix(&self.options.dir) else {
            return false;
        };
        let parts: Vec<_> = relative.components().collect();
        if !self.options.recursive && parts.len() != 1 {
            return false;
        }
        // Hidden files and folders (a camera's temporary `.name.part`).
        !parts
            .iter()
            .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
    }

    /// Hands `path` to the scorer unless it went already as it is now.
    /// False when the scorer is gone.
    fn send(&mut self, path: PathBuf) -> bool {
        self.candidates.remove(&path);
        let Some(sig) = signature(&path) else {
            return true;
        };
        if self.sent.get(&path) == Some(&sig) {
            return true;
        }
        self.sent.insert(path.clone(), sig);
        self.metrics.seen();
        let mut item = path;
        loop {
            match self.ready.try_send(item) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                // The scorer is behind: wait (the queue is bounded).
                Err(TrySendError::Full(back)) => {
                    item = back;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn watch_for(&mut self, path: PathBuf, wait: Duration) {
        let sig = signature(&path);
        if sig.is_some() && self.sent.get(&path) == sig.as_ref() {
            return;
        }
        let now = Instant::now();
        let entry = self.candidates.entry(path).or_insert(Candidate {
            signature: sig,
            still_since: now,
            wait,
        });
        if entry.signature != sig {
            entry.signature = sig;
            entry.still_since = now;
        }
        entry.wait = entry.wait.max(wait);
    }

    fn on_event(&mut self, event: notify::Event) -> bool {
        let writing = self.options.stalled;
        for path in event.paths {
            if !self.wanted(&path) {
                continue;
            }
            let go = match event.kind {
                // Closed after writing, or moved in whole: ready now.
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => {
                    self.send(path)
                }
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                    self.sent.remove(&path);
                    self.candidates.remove(&path);
                    true
                }
                EventKind::Create(CreateKind::Folder) => true,
                EventKind::Create(_) | EventKind::Modify(_) => {
                    self.watch_for(path, writing);
                    true
                }
                _ => true,
            };
            if !go {
                return false;
            }
        }
        true
    }

    /// Every image in the folder now, sorted (unreadable entries skipped).
    fn list(&self) -> Vec<PathBuf> {
        let depth = if self.options.recursive {
            usize::MAX
        } else {
            1
        };
        let mut found: Vec<PathBuf> = walkdir::WalkDir::new(&self.options.dir)
            .max_depth(depth)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| {
                e.depth() == 0
                    || !(e.file_name().to_string_lossy().starts_with('.')
                        || self.options.skip.iter().any(|s| e.path() == s))
            })
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .map(walkdir::DirEntry::into_path)
            .filter(|p| self.wanted(p))
            .collect();
        found.sort();
        found
    }

    fn rescan(&mut self) {
        let files = self.list();
        let present: std::collections::HashSet<&PathBuf> = files.iter().collect();
        // Files gone (moved to OK/NG, deleted) are forgotten.
        self.sent.retain(|p, _| present.contains(p));
        self.candidates.retain(|p, _| present.contains(p));
        for path in files {
            if !self.candidates.contains_key(&path) {
                self.watch_for(path, self.options.settle);
            }
        }
    }

    /// Hands over every candidate that has stood still long enough.
    fn settle(&mut self) -> bool {
        let now = Instant::now();
        let mut due = Vec::new();
        for (path, candidate) in &mut self.candidates {
            let sig = signature(path);
            if sig != candidate.signature {
                candidate.signature = sig;
                candidate.still_since = now;
            } else if now.duration_since(candidate.still_since) >= candidate.wait {
                due.push(path.clone());
            }
        }
        due.sort();
        for path in due {
            if !self.send(path) {
                return false;
            }
        }
        self.metrics.set_waiting(self.candidates.len());
        true
    }
}

/// Watches `options.dir` until `stop` is set or the scorer hangs up,
/// handing ready files to `ready`. The images already there are handed
/// first (those standing still for the settle time; the others when they
/// do).
pub fn watch(
    options: FolderOptions,
    ready: SyncSender<PathBuf>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let (tx, events): (_, Receiver<notify::Result<notify::Event>>) = std::sync::mpsc::channel();
    let mode = if options.recursive {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    // Without events (an unsupported file system) the rescan still finds
    // every file, only later.
    let watcher = notify::recommended_watcher(tx).and_then(|mut w| {
        w.watch(&options.dir, mode)?;
        Ok(w)
    });
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(err) => {
            tracing::warn!(
                "no folder events for {} ({err}); finding new files by rescanning every {:?}",
                options.dir.display(),
                options.rescan
            );
            None
        }
    };
    let mut folder = Folder {
        candidates: HashMap::new(),
        sent: HashMap::new(),
        ready,
        metrics,
        options,
    };
    // Catch up: what is there already, oldest name first, once it is still.
    let now = SystemTime::now();
    for path in folder.list() {
        let old = signature(&path)
            .and_then(|(_, modified)| modified)
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= folder.options.settle);
        if old {
            if !folder.send(path) {
                return Ok(());
            }
        } else {
            folder.watch_for(path, folder.options.settle);
        }
    }
    let tick = Duration::from_millis(50);
    let mut last_scan = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match events.recv_timeout(tick) {
            Ok(Ok(event)) => {
                if !folder.on_event(event) {
                    return Ok(());
                }
            }
            Ok(Err(err)) => {
                // A lost event queue: the next rescan finds what was missed.
                tracing::warn!("folder events: {err}; rescanning");
                last_scan = Instant::now() - folder.options.rescan;
            }
            Err(RecvTimeoutError::Timeout) => {}
            // No watcher: only the rescan and the settle checks run.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(tick),
        }
        if last_scan.elapsed() >= folder.options.rescan {
            folder.rescan();
            last_scan = Instant::now();
        }
        if !folder.settle() {
            return Ok(());
        }
    }
    Ok(())
}
