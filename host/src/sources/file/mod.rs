//! The file source: the lines of a file, or of every file a glob matches,
//! to replay a captured feed through a pipeline (and to feed tests and
//! benchmarks without a broker).
//!
//! Files are read in name order, each from its start. Under `sluice run
//! --until-eof` the pipeline ends once the last file is read to its end;
//! without it the source follows the files as they grow (and picks up new
//! files the glob matches), like `tail -F`, by identity (device and inode):
//! - a file that shrinks was truncated: it is read again from its start;
//! - a path that comes to name another file (a rename over it, a rotation)
//!   has the old file read to its end, then the new one from its start;
//! - a file renamed within the glob is followed under its new name, and a
//!   file reached by several paths (links, a symlink loop under `**`) is
//!   read once;
//! - a file of a glob that cannot be opened or read (EACCES, EIO) is
//!   skipped, named in the log and in `/health`, and tried again at each
//!   look; the others go on.
//!
//! Each line is one record (its newline removed; empty lines skipped), with
//! the file's path (as first read) as its origin's topic and the line's
//! byte offset as its offset. Its partition is the file's fingerprint: a
//! hash of its inode and first line, so that new content at old offsets (a
//! file truncated and written again, or replaced) is never taken for lines
//! already stored. The source keeps no position of its own: a restart reads
//! the files again from their start, and an exactly-once PostgreSQL sink
//! skips the rows it already has (their offsets are stored with them);
//! other sinks get those records again. What the fingerprint cannot tell:
//! a file truncated and written again with the same first line, during a
//! restart, is taken for the old one (its lines up to the stored offset
//! are skipped); a file copied to a new inode (or renamed out of the glob
//! and back during a restart) is read again as new.
//!
//! - [`reader`]: reading lines with a cap on their length.

mod reader;

use super::{Connector, RunOptions, Source};
use crate::connector::{Build, Check};
use crate::record::{Bytes, Origin, Record};
use anyhow::Context;
use async_trait::async_trait;
use reader::{Fate, Line, LineReader};
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tracing::{info, warn};

/// `type = "file"`: the lines of a file or a glob of files, one record per
/// line, to replay a captured feed. `sluice run --until-eof` stops at the
/// end of the input; without it the files are followed as they grow.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// A file, or a glob (`captures/*.jsonl`, `**` for any depth), relative
    /// to the pipeline file. Matching files are read in name order.
    pub path: String,
    /// `lines` (default): each line is a record as it is; `json`: each line
    /// must be one JSON value, and a line that is not is dead-lettered with
    /// its file, line number and the parser's reason.
    #[serde(default)]
    pub format: FileFormat,
    /// Lines longer than this many bytes are dead-lettered (cut to 64 KiB)
    /// instead of transformed; the reader never holds more of a line
    /// (default 1 MiB).
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// Without `--until-eof`: milliseconds between two looks for new lines
    /// and new files once everything has been read (default 200).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Records per batch, at most.
    #[serde(default = "crate::sources::default_batch_max_records")]
    pub batch_max_records: usize,
}

/// How the lines of a file source are read.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// Each line is one record, as it is.
    #[default]
    Lines,
    /// Each line is one JSON value; a line that is not is dead-lettered.
    Json,
}

fn default_max_line_bytes() -> usize {
    1 << 20
}

fn default_poll_ms() -> u64 {
    200
}

/// What a dead-lettered line keeps of itself.
const CUT_BYTES: usize = 64 << 10;

impl FileSourceConfig {
    fn is_glob(&self) -> bool {
        self.path.contains(['*', '?', '['])
    }
}

impl Connector for FileSourceConfig {
    fn check(&mut self, cx: &mut Check<'_>) {
        let path = cx.dir().join(&self.path);
        self.path = path.display().to_string();
        if self.is_glob() {
            if let Err(e) = glob::Pattern::new(&self.path) {
                cx.error_at(&["path"], format!("path {:?} is not a valid glob: {e}", self.path));
            }
        } else if !path.is_file() {
            cx.error_at(&["path"], format!("file {} does not exist", path.display()));
        }
        cx.range("batch_max_records", self.batch_max_records as u64, 1..=crate::connector::MAX_BATCH_RECORDS);
        cx.range("max_line_bytes", self.max_line_bytes as u64, 1..=1 << 30);
        cx.range("poll_ms", self.poll_ms, 1..=3_600_000);
    }

    fn build(&self, cx: &Build<'_>, options: &RunOptions) -> anyhow::Result<Arc<dyn Source>> {
        anyhow::ensure!(options.range.is_none(), "a file source cannot read a range of its input");
        Ok(Arc::new(FileSource {
            config: self.clone(),
            until_eof: options.until_eof,
            pipeline: cx.pipeline.to_string(),
            files: Mutex::new(Files::default()),
        }))
    }
}

/// One file being read.
struct Tail {
    reader: LineReader,
    /// The file's path when first read, shared by its records' origins.
    topic: Arc<str>,
    /// Lines read (for the dead letters' reasons).
    line: u64,
    /// Its records' partition: the file's fingerprint, known once its first
    /// line is read ([`fingerprint`]).
    partition: i32,
}

/// The files being read, by path (name order), and those that cannot be.
#[derive(Default)]
struct Files {
    tails: BTreeMap<PathBuf, Tail>,
    /// Files of a glob that could not be opened or read, with the reason:
    /// skipped, and tried again at each look.
    unreadable: BTreeMap<PathBuf, String>,
}

pub struct FileSource {
    config: FileSourceConfig,
    until_eof: bool,
    pipeline: String,
    files: Mutex<Files>,
}

/// A file's fingerprint, its records' partition: a hash of its inode and
/// its first line (31 bits, never negative). The same file gives the same
/// one after a restart; a file written anew over the same path does not.
fn fingerprint(id: (u64, u64), first_line: &[u8]) -> i32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new().chain_update(id.1.to_le_bytes()).chain_update(first_line).finalize();
    i32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) & i32::MAX
}

impl FileSource {
    /// The files the path matches now, in name order.
    fn matches(&self) -> anyhow::Result<Vec<PathBuf>> {
        if !self.config.is_glob() {
            return Ok(vec![PathBuf::from(&self.config.path)]);
        }
        let mut found: Vec<PathBuf> = glob::glob(&self.config.path)
            .with_context(|| format!("path {:?} is not a valid glob", self.config.path))?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        Ok(found)
    }

    async fn open(&self, path: &Path) -> std::io::Result<Tail> {
        let reader = LineReader::open(path, self.config.max_line_bytes).await?;
        Ok(Tail { reader, topic: path.display().to_string().into(), line: 0, partition: 0 })
    }

    /// Opens the files matched since the last look; follows a file renamed
    /// within the glob under its new name, and reads a file reached by
    /// several paths once.
    async fn open_new(&self, files: &mut Files) -> anyhow::Result<()> {
        for path in self.matches()? {
            if files.tails.contains_key(&path) {
                continue;
            }
            if let Ok(meta) = tokio::fs::metadata(&path).await {
                use std::os::unix::fs::MetadataExt;
                let id = (meta.dev(), meta.ino());
                let known = files.tails.iter().find(|(_, t)| t.reader.id() == id).map(|(p, _)| p.clone());
                if let Some(old) = known {
                    if files.tails[&old].reader.fate().await == Fate::Gone {
                        info!(pipeline = %self.pipeline, from = %old.display(), to = %path.display(), "file source: the file was renamed: following it");
                        let mut tail = files.tails.remove(&old).expect("found above");
                        tail.reader.renamed(&path);
                        files.tails.insert(path, tail);
                    }
                    // Otherwise another path to a file being read (a link).
                    continue;
                }
            }
            let tail = match self.open(&path).await {
                Ok(tail) => tail,
                // Gone between the listing and the open: the next look tells.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.config.is_glob() => continue,
                Err(e) if self.config.is_glob() => {
                    self.unreadable(files, &path, &format!("cannot open it: {e}"));
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
            };
            if files.unreadable.remove(&path).is_some() {
                info!(pipeline = %self.pipeline, file = %path.display(), "file source: the file can be read again");
                self.report_unreadable(files);
            }
            info!(pipeline = %self.pipeline, file = %path.display(), "file source: reading");
            files.tails.insert(path, tail);
        }
        Ok(())
    }

    /// Skips `path` (of a glob) for now: logged once, named in `/health`.
    fn unreadable(&self, files: &mut Files, path: &Path, reason: &str) {
        if files.unreadable.insert(path.to_path_buf(), reason.to_string()).is_none() {
            warn!(pipeline = %self.pipeline, file = %path.display(), %reason, "file source: skipping a file it cannot read (tried again at each look; the others go on)");
        }
        self.report_unreadable(files);
    }

    fn report_unreadable(&self, files: &Files) {
        match files.unreadable.iter().next() {
            None => crate::telemetry::telemetry().source_ok(&self.pipeline),
            Some((path, reason)) => crate::telemetry::telemetry().source_failed(
                &self.pipeline,
                &format!(
                    "file source: {} file(s) cannot be read, e.g. {}: {reason}",
                    files.unreadable.len(),
                    path.display()
                ),
            ),
        }
    }

    /// Reads up to the batch's size from `files`, in name order: under
    /// `--until-eof` a file is read to its end before the next one starts.
    /// Returns whether a file was let go (replaced: its path is to be
    /// looked at again).
    async fn read(&self, files: &mut Files, batch: &mut Vec<Record>) -> anyhow::Result<bool> {
        let max = self.config.batch_max_records;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for (path, tail) in files.tails.iter_mut() {
            let fate = tail.reader.fate().await;
            if fate == Fate::Truncated {
                warn!(pipeline = %self.pipeline, file = %path.display(), "file source: the file shrank (truncated): reading it again from its start");
                match self.open(path).await {
                    Ok(new) => *tail = new,
                    Err(e) => {
                        failed.push((path.clone(), format!("cannot open it again: {e}")));
                        continue;
                    }
                }
            }
            // The old file of a path that names another now, or none, will
            // not grow: a last line without its newline counts.
            let ended = self.until_eof || matches!(fate, Fate::Replaced | Fate::Gone);
            let mut drained = false;
            while batch.len() < max {
                let line = match tail.reader.next(ended).await {
                    Ok(line) => line,
                    Err(e) => {
                        failed.push((path.clone(), format!("cannot read it: {e}")));
                        break;
                    }
                };
                let Some(line) = line else {
                    drained = true;
                    break;
                };
                tail.line += 1;
                if line.offset == 0 {
                    tail.partition = fingerprint(tail.reader.id(), &line.bytes);
                }
                if let Some(record) = self.record(tail, line) {
                    batch.push(record);
                }
            }
            // A single file's path gone stays followed: it may come back.
            if drained && (fate == Fate::Replaced || (fate == Fate::Gone && self.config.is_glob())) {
                done.push((path.clone(), fate));
            }
            if batch.len() >= max {
                break;
            }
        }
        let let_go = !done.is_empty();
        for (path, fate) in done {
            files.tails.remove(&path);
            if fate == Fate::Replaced {
                // The path names a new file: the next look opens it.
                info!(pipeline = %self.pipeline, file = %path.display(), "file source: the file was replaced (another inode): read the old one to its end; reading the new one from its start");
            }
        }
        for (path, reason) in failed {
            anyhow::ensure!(self.config.is_glob(), "cannot read {}: {reason}", path.display());
            files.tails.remove(&path);
            self.unreadable(files, &path, &reason);
        }
        Ok(let_go)
    }

    /// The record of one line, or none for an empty line.
    fn record(&self, tail: &Tail, line: Line) -> Option<Record> {
        let Line { bytes, offset, cut } = line;
        if bytes.is_empty() && !cut {
            return None;
        }
        // The place is written only for a line that is dead-lettered.
        let place = || format!("line {} of {}", tail.line, tail.topic);
        let rejected = if cut {
            Some(format!("{} is over max_line_bytes ({} bytes)", place(), self.config.max_line_bytes))
        } else if self.config.format == FileFormat::Json {
            serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
                .err()
                .map(|e| format!("{} is not JSON: {e}", place()))
        } else {
            None
        };
        let mut value = bytes;
        if rejected.is_some() {
            value.truncate(CUT_BYTES);
        }
        Some(Record {
            value: Bytes::from(value),
            origin: Origin { topic: tail.topic.clone(), partition: tail.partition, offset: offset as i64 },
            rejected,
            ..Record::default()
        })
    }
}

#[async_trait]
impl Source for FileSource {
    async fn next_batch(&self) -> anyhow::Result<Vec<Record>> {
        let mut files = self.files.lock().await;
        let mut batch = Vec::new();
        loop {
            self.open_new(&mut files).await?;
            let let_go = self.read(&mut files, &mut batch).await?;
            if !batch.is_empty() || (self.until_eof && !let_go) {
                // Under --until-eof, nothing left is the end of the input.
                return Ok(batch);
            }
            if !let_go {
                tokio::time::sleep(Duration::from_millis(self.config.poll_ms.max(1))).await;
            }
        }
    }

    /// Nothing to commit: the source keeps no position (a restart reads the
    /// files again; an exactly-once sink skips what it has).
    async fn commit(&self, _batch: &[Record]) -> anyhow::Result<()> {
        Ok(())
    }

    async fn flush_commits(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn source(path: &Path, format: FileFormat, until_eof: bool) -> Arc<dyn Source> {
        let config = FileSourceConfig {
            path: path.display().to_string(),
            format,
            max_line_bytes: 16,
            poll_ms: 10,
            batch_max_records: 3,
        };
        let options = RunOptions { until_eof, range: None };
        config.build(&Build { pipeline: "t", dir: Path::new(".") }, &options).unwrap()
    }

    fn values(batch: &[Record]) -> Vec<String> {
        batch.iter().map(|r| String::from_utf8_lossy(&r.value).into_owned()).collect()
    }

    #[tokio::test]
    async fn reads_every_line_in_batches_then_ends_under_until_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, "{\"n\":1}\n\n{\"n\":2}\r\nnot json\n{\"n\":3}\n0123456789abcdefXYZ\n{\"n\":4}").unwrap();
        let source = source(&path, FileFormat::Json, true);
        let first = source.next_batch().await.unwrap();
        assert_eq!(values(&first), ["{\"n\":1}", "{\"n\":2}", "not json"]);
        assert_eq!(first.iter().map(|r| r.origin.offset).collect::<Vec<_>>(), [0, 9, 18]);
        assert!(first[..2].iter().all(|r| r.rejected.is_none()));
        let reason = first[2].rejected.as_deref().unwrap();
        assert!(reason.starts_with("line 4 of ") && reason.contains("a.jsonl is not JSON"), "{reason}");
        let second = source.next_batch().await.unwrap();
        assert_eq!(values(&second), ["{\"n\":3}", "0123456789abcdef", "{\"n\":4}"], "cut at max_line_bytes");
        assert!(second[1].rejected.as_deref().unwrap().contains("over max_line_bytes (16 bytes)"));
        assert_eq!(second[2].origin.offset, 55, "the last line, without a newline, counts at the end");
        assert!(source.next_batch().await.unwrap().is_empty(), "the end of the input");
    }

    #[tokio::test]
    async fn follows_files_as_they_grow_and_new_files_of_the_glob() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1.log"), "a\nb").unwrap();
        let source = source(&dir.path().join("*.log"), FileFormat::Lines, false);
        assert_eq!(values(&source.next_batch().await.unwrap()), ["a"], "a line without its newline waits");
        let more = tokio::spawn({
            let dir = dir.path().to_path_buf();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut one = std::fs::OpenOptions::new().append(true).open(dir.join("1.log")).unwrap();
                std::io::Write::write_all(&mut one, b"c\n").unwrap();
                std::fs::write(dir.join("2.log"), "d\n").unwrap();
            }
        });
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(values(&source.next_batch().await.unwrap()));
        }
        more.await.unwrap();
        assert_eq!(got, ["bc", "d"]);
        std::fs::write(dir.path().join("1.log"), "e\n").unwrap();
        assert_eq!(values(&source.next_batch().await.unwrap()), ["e"], "a truncated file is read again");
    }

    fn partitions(batch: &[Record]) -> Vec<i32> {
        batch.iter().map(|r| r.origin.partition).collect()
    }

    /// New content at old offsets is never taken for the old lines: a file
    /// truncated and written again is read from its start under another
    /// partition, and so is a file renamed over the path (after the old
    /// one's last lines).
    #[tokio::test]
    async fn a_truncated_or_replaced_file_is_new_content_under_a_new_partition() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        let source = source(&path, FileFormat::Lines, false);
        let first = source.next_batch().await.unwrap();
        assert_eq!(values(&first), ["a", "b", "c"]);
        let old = first[0].origin.partition;
        assert!(partitions(&first).iter().all(|p| *p == old && *p >= 0));
        // Truncated, then two lines: read from the start, as new.
        std::fs::write(&path, "d\ne\n").unwrap();
        let second = source.next_batch().await.unwrap();
        assert_eq!(values(&second), ["d", "e"]);
        assert_eq!(second[0].origin.offset, 0);
        let truncated = second[0].origin.partition;
        assert_ne!(truncated, old, "another partition: the sink cannot skip them as stored");
        // A line more, then another file renamed over the path: the old
        // file's last line (without its newline), then the new file.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, b"tail").unwrap();
        let other = dir.path().join("g.tmp");
        std::fs::write(&other, "x\n").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(source.next_batch().await.unwrap());
        }
        assert_eq!(values(&got), ["tail", "x"]);
        assert_eq!(got[0].origin.partition, truncated);
        assert_ne!(got[1].origin.partition, truncated, "the new file's own partition");
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, b"y\n").unwrap();
        assert_eq!(values(&source.next_batch().await.unwrap()), ["y"], "the new file is followed as it grows");
        // The same file gives the same partitions to a new reader (a restart).
        let again = super::tests::source(&path, FileFormat::Lines, true).next_batch().await.unwrap();
        assert_eq!(partitions(&again), [got[1].origin.partition; 2]);
    }

    /// A file reached by many paths (a symlink loop under `**`) is read once.
    #[tokio::test]
    async fn a_file_reached_by_many_paths_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.log"), "a\nb\n").unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("loop")).unwrap();
        let source = source(&dir.path().join("**/*.log"), FileFormat::Lines, true);
        let mut got = Vec::new();
        loop {
            let batch = source.next_batch().await.unwrap();
            if batch.is_empty() {
                break;
            }
            got.extend(values(&batch));
        }
        assert_eq!(got, ["a", "b"]);
    }

    /// A file of a glob that cannot be read (EIO: /proc/self/mem at offset
    /// 0) is skipped and named in the pipeline's health; the others flow.
    #[tokio::test]
    async fn an_unreadable_file_of_a_glob_is_skipped_and_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.log"), "1\n").unwrap();
        std::os::unix::fs::symlink("/proc/self/mem", dir.path().join("b.log")).unwrap();
        std::fs::write(dir.path().join("c.log"), "2\n").unwrap();
        let config = FileSourceConfig {
            path: dir.path().join("*.log").display().to_string(),
            format: FileFormat::Lines,
            max_line_bytes: 16,
            poll_ms: 10,
            batch_max_records: 10,
        };
        let options = RunOptions { until_eof: false, range: None };
        let source = config.build(&Build { pipeline: "unreadable", dir: Path::new(".") }, &options).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(values(&source.next_batch().await.unwrap()));
        }
        assert_eq!(got, ["1", "2"]);
        let failing = crate::telemetry::telemetry().state("unreadable").failing_source.unwrap_or_default();
        assert!(failing.contains("b.log") && failing.contains("cannot read it"), "{failing}");
    }
}
