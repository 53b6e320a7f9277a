//! Watches the pipeline files (and folders) `sluice run` was given, the
//! plugin files their pipelines use and the secret files they read, and reports changes on a channel. The
//! parent folders are watched, not the files, so editors' atomic renames and
//! cargo's re-linking are seen; callers debounce.
//!
//! A secret file, and a pipeline file, may be a symbolic link that is
//! swapped rather than written: Kubernetes mounts a ConfigMap or a Secret
//! as `p.toml -> ..data/p.toml` and rotates by pointing `..data` at a new
//! folder. So any change in such a file's folder makes the watcher resolve
//! it again (and list a pipeline folder's `*.toml` again), and a new target
//! is the file's change.

use super::Pipeline;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

#[derive(Default)]
struct Interest {
    /// Exact files: pipeline files given by name, plugin files, secret files.
    files: BTreeSet<PathBuf>,
    /// Folders given to `sluice run`: any `*.toml` in them.
    pipeline_dirs: BTreeSet<PathBuf>,
    /// Secret and pipeline files, with the file each resolves to (through
    /// symbolic links), and what it held then (a rotation may leave the
    /// target's path as it was and change what it points through).
    resolved: BTreeMap<PathBuf, Option<(PathBuf, std::time::SystemTime)>>,
}

/// Where `path` leads through symbolic links, and when that was modified.
fn resolve(path: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let target = path.canonicalize().ok()?;
    let modified = std::fs::metadata(&target).and_then(|m| m.modified()).ok()?;
    Some((target, modified))
}

impl Interest {
    /// The watched files that a change of `path` changes.
    fn changed(&mut self, path: &Path) -> Vec<PathBuf> {
        let mut changed = Vec::new();
        if self.files.contains(path)
            || (path.extension().is_some_and(|e| e == "toml")
                && path.parent().is_some_and(|d| self.pipeline_dirs.contains(d)))
        {
            changed.push(path.to_path_buf());
        }
        // A pipeline folder's `*.toml` files may be links into a folder swapped under them.
        if let Some(dir) = path.parent().filter(|d| self.pipeline_dirs.contains(*d)) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let file = entry.path();
                    if file.extension().is_some_and(|e| e == "toml") {
                        self.resolved.entry(file).or_insert(None);
                    }
                }
            }
        }
        for (file, target) in &mut self.resolved {
            if file.parent() == path.parent() && file != path {
                let now = resolve(file);
                if now != *target {
                    *target = now;
                    if !changed.contains(file) {
                        changed.push(file.clone());
                    }
                }
            }
        }
        changed
    }
}

pub struct Watcher {
    inner: RecommendedWatcher,
    watched: BTreeSet<PathBuf>,
    interest: Arc<Mutex<Interest>>,
    paths: Vec<PathBuf>,
}

/// `path` with its folder resolved (the file itself may not exist yet).
fn normalize(path: &Path) -> PathBuf {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match (parent.canonicalize(), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

impl Watcher {
    /// Watches `paths` (the arguments of `sluice run`) and the plugins of
    /// `pipelines`; each relevant change sends the changed path on `changes`.
    pub fn new(paths: &[PathBuf], pipelines: &[Pipeline], changes: UnboundedSender<PathBuf>) -> notify::Result<Self> {
        let interest = Arc::new(Mutex::new(Interest::default()));
        let seen = interest.clone();
        let inner = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if !matches!(event.kind, EventKind::Access(_)) => {
                let Ok(mut interest) = seen.lock() else { return };
                for path in event.paths.iter().flat_map(|p| interest.changed(p)) {
                    let _ = changes.send(path);
                }
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "file watcher error"),
        })?;
        let mut watcher = Watcher { inner, watched: BTreeSet::new(), interest, paths: paths.to_vec() };
        watcher.follow(pipelines);
        Ok(watcher)
    }

    /// Follows the plugin files of `pipelines` (after a reload changed them).
    pub fn follow<'a>(&mut self, pipelines: impl IntoIterator<Item = &'a Pipeline>) {
        let mut interest = Interest::default();
        for path in &self.paths {
            if path.is_dir() {
                if let Ok(dir) = path.canonicalize() {
                    if let Ok(entries) = std::fs::read_dir(&dir) {
                        for file in entries.flatten().map(|e| e.path()) {
                            if file.extension().is_some_and(|e| e == "toml") {
                                let target = resolve(&file);
                                interest.resolved.insert(file, target);
                            }
                        }
                    }
                    interest.pipeline_dirs.insert(dir);
                }
            } else {
                interest.files.insert(normalize(path));
            }
        }
        for p in pipelines {
            let file = normalize(&p.file);
            interest.resolved.insert(file.clone(), resolve(&file));
            interest.files.insert(file);
            interest.files.extend(p.transforms.iter().map(|t| normalize(&t.path)));
            interest.files.extend(p.transforms.iter().filter_map(|t| t.shadow.as_ref()).map(|s| normalize(&s.path)));
            for secret in p.secret_files.iter().map(|f| normalize(f)) {
                interest.resolved.insert(secret.clone(), resolve(&secret));
                interest.files.insert(secret);
            }
        }
        let dirs: BTreeSet<PathBuf> = interest
            .files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .chain(interest.pipeline_dirs.iter().cloned())
            .collect();
        for dir in dirs.difference(&self.watched.clone()) {
            match self.inner.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(dir.clone());
                }
                Err(error) => warn!(dir = %dir.display(), %error, "cannot watch folder"),
            }
        }
        if let Ok(mut current) = self.interest.lock() {
            *current = interest;
        }
    }
}
