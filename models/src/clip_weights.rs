//! Where CLIP weights come from.
//!
//! In order:
//! 1. a folder given on the command line (`--clip-weights DIR`),
//! 2. the folder in `FLAWSCOPE_CLIP_WEIGHTS`,
//! 3. the local Hugging Face hub cache
//!    (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
//!    else `~/.cache/huggingface/hub`), at the pinned revision first, then
//!    `refs/main`, then any complete snapshot,
//! 4. a download into that cache through the Hugging Face hub at the preset's
//!    pinned commit (only with the `download` cargo feature, and not when
//!    `HF_HUB_OFFLINE` is set).
//!
//! When all fail, [`ModelError::NoClipWeights`] says what to pass. A folder
//! named explicitly (1 or 2) must be complete: a broken one is an error, not
//! a reason to look elsewhere.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ModelError;

/// Environment variable naming a checkpoint folder.
pub const WEIGHTS_ENV: &str = "FLAWSCOPE_CLIP_WEIGHTS";

/// Files every checkpoint folder needs, besides the weights.
pub const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
/// Accepted weight files, in order of preference.
pub const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// A known CLIP checkpoint on the Hugging Face hub, pinned to one commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipPreset {
    /// Short name, e.g. `ViT-B/16`.
    pub name: &'static str,
    /// Hub repository, e.g. `openai/clip-vit-base-patch16`.
    pub repo: &'static str,
    /// Pinned commit of the repository.
    pub revision: &'static str,
}

/// OpenAI CLIP ViT-B/16 at 224² (the WinCLIP default here; 600 MB).
pub const VIT_B_16: ClipPreset = ClipPreset {
    name: "ViT-B/16",
    repo: "openai/clip-vit-base-patch16",
    revision: "57c216476eefef5ab752ec549e440a49ae4ae5f3",
};

/// OpenAI CLIP ViT-L/14 at 224² (1.7 GB).
pub const VIT_L_14: ClipPreset = ClipPreset {
    name: "ViT-L/14",
    repo: "openai/clip-vit-large-patch14",
    revision: "32bd64288804d66eefd0ccbe215aa642df71cc41",
};

/// OpenAI CLIP ViT-L/14 at 336² (1.7 GB).
pub const VIT_L_14_336: ClipPreset = ClipPreset {
    name: "ViT-L/14@336",
    repo: "openai/clip-vit-large-patch14-336",
    revision: "ce19dc912ca5cd21c8a653c79e251e808ccabcd1",
};

/// Every preset.
pub const PRESETS: [ClipPreset; 3] = [VIT_B_16, VIT_L_14, VIT_L_14_336];

impl ClipPreset {
    /// Finds a preset by name (`ViT-B/16`, `vit-b-16`, `b16`), or hub repository id.
    pub fn find(name: &str) -> Option<Self> {
        let key = normalise(name);
        PRESETS.into_iter().find(|p| {
            let short = normalise(p.name);
            key == short
                || key == normalise(p.repo)
                || key == normalise(p.repo.trim_start_matches("openai/"))
                || Some(key.as_str()) == short.strip_prefix("vit")
        })
    }

    /// Id of these weights for caches: repository and pinned commit.
    pub fn model_id(&self) -> String {
        format!("{}@{}", self.repo, self.revision)
    }

    /// The preset's folder name inside a hub cache.
    pub fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

fn normalise(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// How the weights were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsSource {
    /// The `--clip-weights` folder.
    Flag,
    /// The `FLAWSCOPE_CLIP_WEIGHTS` folder.
    Env,
    /// An existing snapshot in the hub cache.
    HubCache,
    /// Downloaded just now into the hub cache.
    Download,
}

/// A checkpoint folder ready for [`crate::clip::ClipModel::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedWeights {
    /// Folder holding `config.json`, `tokenizer.json` and the weights.
    pub dir: PathBuf,
    /// Where it came from.
    pub source: WeightsSource,
}

impl ResolvedWeights {
    /// An id of these exact weights for caches of derived data (text
    /// embeddings): the canonical folder plus the weight file's size and
    /// modification time, so replacing the weights in place changes it.
    pub fn model_id(&self) -> String {
        let dir = self.dir.canonicalize().unwrap_or_else(|_| self.dir.clone());
        let stamp = WEIGHT_FILES
            .iter()
            .find_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| {
                let secs = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                format!("{}-{secs}", m.len())
            })
            .unwrap_or_default();
        format!("{}#{stamp}", dir.display())
    }
}

/// Everything resolution looks at, so it can be set without touching the
/// process environment (see [`WeightsLookup::from_env`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsLookup {
    /// `--clip-weights DIR`.
    pub flag_dir: Option<PathBuf>,
    /// `FLAWSCOPE_CLIP_WEIGHTS`.
    pub env_dir: Option<PathBuf>,
    /// Hugging Face hub cache folder.
    pub hub_cache: Option<PathBuf>,
    /// Never touch the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Hub address (`HF_ENDPOINT`); `None` is huggingface.co.
    pub endpoint: Option<String>,
    /// Longest wait for a connection to the hub.
    pub connect_timeout: Duration,
}

impl WeightsLookup {
    /// Reads `FLAWSCOPE_CLIP_WEIGHTS`, `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`,
    /// `HF_HOME`, `XDG_CACHE_HOME`, `HOME`, `HF_HUB_OFFLINE` and `HF_ENDPOINT`.
    pub fn from_env(flag_dir: Option<PathBuf>) -> Self {
        Self::from_vars(flag_dir, |name| std::env::var_os(name))
    }

    /// As [`WeightsLookup::from_env`], with variables from `var`.
    pub fn from_vars(flag_dir: Option<PathBuf>, var: impl Fn(&str) -> Option<OsString>) -> Self {
        let non_empty = |name: &str| var(name).filter(|v| !v.is_empty());
        let hub_cache = non_empty("HF_HUB_CACHE")
            .or_else(|| non_empty("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .or_else(|| non_empty("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| {
                non_empty("XDG_CACHE_HOME")
                    .map(|x| PathBuf::from(x).join("huggingface").join("hub"))
            })
            .or_else(|| {
                non_empty("HOME").map(|h| {
                    PathBuf::from(h)
                        .join(".cache")
                        .join("huggingface")
                        .join("hub")
                })
            });
        let offline = non_empty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.to_string_lossy().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        });
        Self {
            flag_dir,
            env_dir: non_empty(WEIGHTS_ENV).map(PathBuf::from),
            hub_cache,
            offline,
            endpoint: non_empty("HF_ENDPOINT").map(|v| v.to_string_lossy().into_owned()),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Finds (or downloads) the checkpoint folder of `preset`.
    pub fn resolve(&self, preset: &ClipPreset) -> Result<ResolvedWeights, ModelError> {
        if let Some(dir) = &self.flag_dir {
            check_checkpoint_dir(dir)?;
            return Ok(ResolvedWeights {
                dir: dir.clone(),
                source: WeightsSource::Flag,
            });
        }
        if let Some(dir) = &self.env_dir {
            check_checkpoint_dir(dir)?;
            return Ok(ResolvedWeights {
                dir: dir.clone(),
                source: WeightsSource::Env,
            });
        }
        let mut searched = vec![
            "--clip-weights (not given)".to_owned(),
            format!("{WEIGHTS_ENV} (unset)"),
        ];
        if let Some(cache) = &self.hub_cache {
            let repo = cache.join(preset.cache_folder());
            if let Some(dir) = cached_snapshot(&repo, preset.revision) {
                return Ok(ResolvedWeights {
                    dir,
                    source: WeightsSource::HubCache,
                });
            }
            searched.push(format!("{} (no complete snapshot)", repo.display()));
        } else {
            searched.push("the hub cache (HOME unset)".into());
        }
        let reason = match self.download(preset) {
            Ok(dir) => {
                check_checkpoint_dir(&dir)?;
                return Ok(ResolvedWeights {
                    dir,
                    source: WeightsSource::Download,
                });
            }
            Err(reason) => reason,
        };
        Err(ModelError::NoClipWeights {
            model: format!("{} ({})", preset.name, preset.repo),
            searched: searched.join(", "),
            reason,
        })
    }

    #[cfg(not(feature = "download"))]
    fn download(&self, _preset: &ClipPreset) -> Result<PathBuf, String> {
        Err("this build cannot download (built without the `download` feature)".into())
    }

    #[cfg(feature = "download")]
    fn download(&self, preset: &ClipPreset) -> Result<PathBuf, String> {
        if self.offline {
            return Err("HF_HUB_OFFLINE is set, so nothing was downloaded".into());
        }
        let Some(cache) = &self.hub_cache else {
            return Err("no hub cache folder to download into (HOME unset)".into());
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!("downloading {what} from the Hugging Face hub failed: {e}")
        };
        let http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("flawscope/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| fail("anything", &e))?;
        let mut builder = hf_hub::HFClient::builder()
            .client(http)
            .cache_dir(cache.clone())
            .retry_max_attempts(1);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint(endpoint.clone());
        }
        let client = builder.build_sync().map_err(|e| fail("anything", &e))?;
        let (owner, name) = preset.repo.split_once('/').unwrap_or(("", preset.repo));
        let repo = client.model(owner, name);
        let get = |file: &str| {
            repo.download_file()
                .filename(file)
                .revision(preset.revision)
                .send()
        };
        let mut dir = None;
        for file in REQUIRED_FILES {
            let path = get(file).map_err(|e| fail(file, &e))?;
            dir = path.parent().map(Path::to_path_buf);
        }
        match get(WEIGHT_FILES[0]) {
            Ok(_) => {}
            Err(hf_hub::HFError::EntryNotFound { .. }) => {
                get(WEIGHT_FILES[1]).map_err(|e| fail(WEIGHT_FILES[1], &e))?;
            }
            Err(e) => return Err(fail(WEIGHT_FILES[0], &e)),
        }
        dir.ok_or_else(|| "the hub returned no file path".into())
    }
}

/// Checks that `dir` holds a usable checkpoint, naming the first missing file.
pub fn check_checkpoint_dir(dir: &Path) -> Result<(), ModelError> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFile {
            dir: dir.to_owned(),
            what: "the checkpoint folder itself".into(),
        });
    }
    for file in REQUIRED_FILES {
        if !dir.join(file).is_file() {
            return Err(ModelError::MissingFile {
                dir: dir.to_owned(),
                what: file.into(),
            });
        }
    }
    if !WEIGHT_FILES.iter().any(|f| dir.join(f).is_file()) {
        return Err(ModelError::MissingFile {
            dir: dir.to_owned(),
            what: "model.safetensors (or pytorch_model.bin)".into(),
        });
    }
    Ok(())
}

/// A complete CLIP snapshot of a cached repository (see [`find_cached`]).
fn cached_snapshot(repo: &Path, revision: &str) -> Option<PathBuf> {
    snapshot_where(repo, Some(revision), |dir| {
        check_checkpoint_dir(dir).is_ok()
    })
}

/// The folder of hub repository `repo_id` (`owner/name`) in the hub cache
/// `cache` that holds every file of `required` (any of `weight_files` too,
/// unless it is empty): `revision` first where given, then the one
/// `refs/main` points at, then the most recently modified other one.
/// Nothing is downloaded.
pub fn find_cached(
    cache: &Path,
    repo_id: &str,
    revision: Option<&str>,
    required: &[&str],
    weight_files: &[&str],
) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    snapshot_where(&repo, revision, |dir| {
        required.iter().all(|f| dir.join(f).is_file())
            && (weight_files.is_empty() || weight_files.iter().any(|f| dir.join(f).is_file()))
    })
}

fn snapshot_where(
    repo: &Path,
    revision: Option<&str>,
    complete: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Some(revision) = revision.filter(|r| !r.is_empty()) {
        let pinned = snapshots.join(revision);
        if complete(&pinned) {
            return Some(pinned);
        }
    }
    if let Ok(main) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let main = snapshots.join(main.trim());
        if !main.as_os_str().is_empty() && complete(&main) {
            return Some(main);
        }
    }
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| complete(p))
        .map(|p| {
            let modified = p
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (modified, p)
        })
        .collect();
    others.sort();
    others.pop().map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_found_by_any_name() {
        assert_eq!(ClipPreset::find("ViT-B/16"), Some(VIT_B_16));
        assert_eq!(ClipPreset::find("vit-b-16"), Some(VIT_B_16));
        assert_eq!(ClipPreset::find("b16"), Some(VIT_B_16));
        assert_eq!(
            ClipPreset::find("openai/clip-vit-large-patch14"),
            Some(VIT_L_14)
        );
        assert_eq!(ClipPreset::find("ViT-L/14@336"), Some(VIT_L_14_336));
        assert_eq!(
            ClipPreset::find("clip-vit-large-patch14-336"),
            Some(VIT_L_14_336)
        );
        assert_eq!(ClipPreset::find("resnet50"), None);
        assert_eq!(
            VIT_B_16.cache_folder(),
            "models--openai--clip-vit-base-patch16"
        );
        for p in PRESETS {
            assert_eq!(p.revision.len(), 40);
            assert!(p.revision.chars().all(|c| c.is_ascii_hexdigit()));
        }
    }

    #[cfg(feature = "download")]
    #[test]
    fn unreachable_hub_fails_fast() {
        // Port 1 on loopback refuses at once: the download path runs without
        // leaving the machine.
        let cache = tempfile::tempdir().unwrap();
        let lookup = WeightsLookup {
            flag_dir: None,
            env_dir: None,
            hub_cache: Some(cache.path().to_owned()),
            offline: false,
            endpoint: Some("http://127.0.0.1:1".into()),
            connect_timeout: Duration::from_secs(1),
        };
        let start = std::time::Instant::now();
        let err = lookup.resolve(&VIT_B_16).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "took {:?}",
            start.elapsed()
        );
        assert!(matches!(err, ModelError::NoClipWeights { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("downloading config.json"), "{msg}");
        assert!(msg.contains("--clip-weights DIR"), "{msg}");
        println!("{msg}");
    }

    #[cfg(not(feature = "download"))]
    #[test]
    fn without_download_feature_the_error_says_so() {
        let cache = tempfile::tempdir().unwrap();
        let lookup = WeightsLookup::from_vars(None, |name| {
            (name == "HF_HUB_CACHE").then(|| cache.path().as_os_str().to_owned())
        });
        let err = lookup.resolve(&VIT_L_14).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("FLAWSCOPE_CLIP_WEIGHTS"), "{msg}");
        assert!(msg.contains("without the `download` feature"), "{msg}");
        assert!(
            msg.contains("models--openai--clip-vit-large-patch14"),
            "{msg}"
        );
    }

    #[test]
    fn environment_is_read() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let l = WeightsLookup::from_vars(None, vars(&[("HOME", "/h")]));
        assert_eq!(
            l.hub_cache,
            Some(PathBuf::from("/h/.cache/huggingface/hub"))
        );
        assert!(!l.offline);
        let l = WeightsLookup::from_vars(
            None,
            vars(&[
                ("HOME", "/h"),
                ("XDG_CACHE_HOME", "/x"),
                ("HF_HOME", "/hf"),
                ("HF_HUB_OFFLINE", "True"),
                (WEIGHTS_ENV, "/w"),
                ("HF_ENDPOINT", "http://mirror"),
            ]),
        );
        assert_eq!(l.hub_cache, Some(PathBuf::from("/hf/hub")));
        assert!(l.offline);
        assert_eq!(l.env_dir, Some(PathBuf::from("/w")));
        assert_eq!(l.endpoint.as_deref(), Some("http://mirror"));
        let l = WeightsLookup::from_vars(
            None,
            vars(&[
                ("HF_HOME", "/hf"),
                ("HF_HUB_CACHE", "/c"),
                (WEIGHTS_ENV, ""),
            ]),
        );
        assert_eq!(l.hub_cache, Some(PathBuf::from("/c")));
        assert_eq!(l.env_dir, None);
        let l = WeightsLookup::from_vars(None, vars(&[("XDG_CACHE_HOME", "/x")]));
        assert_eq!(l.hub_cache, Some(PathBuf::from("/x/huggingface/hub")));
    }
}
