//! The file source: the lines of a file, or of every file a glob matches,
//! to replay a captured feed through a pipeline (and to feed tests and
//! benchmarks without a broker).
//!
//! Files are read in name order, each from its start. Under `sluice run
//! --until-eof` the pipeline ends once the last file is read to its end;
//! without it the source follows the files as they grow (and picks up new
//! files the glob matches), like `tail -F`: a file that shrinks was
//! truncated and is read again from its start.
//!
//! Each line is one record (its newline removed; empty lines skipped), with
//! the file's path as its origin's topic, partition 0, and the line's byte
//! offset as its offset. The source keeps no position of its own: a
//! restart reads the files again from their start, and an exactly-once
//! PostgreSQL sink skips the rows it already has (their offsets are stored
//! with them); other sinks get those records again.
//!
//! - [`reader`]: reading lines with a cap on their length.

mod reader;

use super::{Connector, Source};
use crate::connector::{Build, Check};
use crate::record::{Bytes, Origin, Record};
use anyhow::Context;
use async_trait::async_trait;
use reader::{Line, LineReader};
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
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
        if self.batch_max_records == 0 || self.max_line_bytes == 0 {
            cx.error("`batch_max_records` and `max_line_bytes` must be at least 1");
        }
    }

    fn build(&self, cx: &Build<'_>) -> anyhow::Result<Arc<dyn Source>> {
        Ok(Arc::new(FileSource {
            config: self.clone(),
            until_eof: cx.options.until_eof,
            pipeline: cx.pipeline.to_string(),
            files: Mutex::new(BTreeMap::new()),
        }))
    }
}

/// One file being read.
struct Tail {
    reader: LineReader,
    /// The file's path, shared by its records' origins.
    topic: Arc<str>,
    /// Lines read (for the dead letters' reasons).
    line: u64,
}

pub struct FileSource {
    config: FileSourceConfig,
    until_eof: bool,
    pipeline: String,
    /// Every file matched so far, by path (name order).
    files: Mutex<BTreeMap<PathBuf, Tail>>,
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

    /// Opens the files matched since the last look.
    async fn open_new(&self, files: &mut BTreeMap<PathBuf, Tail>) -> anyhow::Result<()> {
        for path in self.matches()? {
            if files.contains_key(&path) {
                continue;
            }
            let reader = match LineReader::open(&path, self.config.max_line_bytes).await {
                Ok(reader) => reader,
                // Gone between the listing and the open: the next look tells.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.config.is_glob() => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
            };
            info!(pipeline = %self.pipeline, file = %path.display(), "file source: reading");
            files.insert(path.clone(), Tail { reader, topic: path.display().to_string().into(), line: 0 });
        }
        Ok(())
    }

    /// Reads up to the batch's size from `files`, in name order: under
    /// `--until-eof` a file is read to its end before the next one starts.
    async fn read(&self, files: &mut BTreeMap<PathBuf, Tail>, batch: &mut Vec<Record>) -> anyhow::Result<()> {
        let max = self.config.batch_max_records;
        for (path, tail) in files.iter_mut() {
            if tail.reader.truncated().await {
                warn!(pipeline = %self.pipeline, file = %path.display(), "file source: the file shrank (truncated): reading it again from its start");
                tail.reader = LineReader::open(path, self.config.max_line_bytes)
                    .await
                    .with_context(|| format!("cannot open {}", path.display()))?;
                tail.line = 0;
            }
            while batch.len() < max {
                // At the end of the input a last line without a newline counts.
                let line = tail
                    .reader
                    .next(self.until_eof)
                    .await
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let Some(line) = line else { break };
                tail.line += 1;
                if let Some(record) = self.record(tail, line) {
                    batch.push(record);
                }
            }
            if batch.len() >= max {
                break;
            }
        }
        Ok(())
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
            origin: Origin { topic: tail.topic.clone(), partition: 0, offset: offset as i64 },
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
            self.read(&mut files, &mut batch).await?;
            if !batch.is_empty() || self.until_eof {
                // Under --until-eof, nothing left is the end of the input.
                return Ok(batch);
            }
            tokio::time::sleep(Duration::from_millis(self.config.poll_ms.max(1))).await;
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
    use crate::connector::RunOptions;
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
        config.build(&Build { pipeline: "t", dir: Path::new("."), options: &options }).unwrap()
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
}
