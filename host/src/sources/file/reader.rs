//! Lines of one file, each at most a given length held in memory, read as
//! the file grows.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, BufReader};

/// One line: its bytes without the newline (and a `\r` before it), where
/// it starts in the file, and whether it was longer than the cap (then
/// `bytes` holds its start).
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    pub bytes: Vec<u8>,
    pub offset: u64,
    pub cut: bool,
}

/// What became of the file a path named when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The path names it still, at least as long as what was read.
    Same,
    /// It is shorter than what was read: truncated (and maybe written again).
    Truncated,
    /// The path names another file now (a rename over it, a rotation).
    Replaced,
    /// The path names nothing now (deleted, or renamed away).
    Gone,
}

pub struct LineReader {
    path: PathBuf,
    /// The file's identity (device, inode), as opened: the path may come
    /// to name another file (replaced by a rename), this one stays open.
    id: (u64, u64),
    reader: BufReader<tokio::fs::File>,
    cap: usize,
    /// Bytes of the file consumed so far.
    consumed: u64,
    /// The line being read: where it starts, what is kept of it, whether
    /// some of it was dropped.
    start: u64,
    partial: Vec<u8>,
    cut: bool,
}

/// Reads in large steps: a replay is mostly a sequential scan.
const READ_BUFFER: usize = 256 << 10;

impl LineReader {
    pub async fn open(path: &Path, cap: usize) -> io::Result<LineReader> {
        let file = tokio::fs::File::open(path).await?;
        let meta = file.metadata().await?;
        Ok(LineReader {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
            reader: BufReader::with_capacity(READ_BUFFER, file),
            cap,
            consumed: 0,
            start: 0,
            partial: Vec::new(),
            cut: false,
        })
    }

    /// The path the file is followed by (it was renamed to `path`).
    pub fn renamed(&mut self, path: &Path) {
        self.path = path.to_path_buf();
    }

    /// The open file's identity: (device, inode).
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// What became of the file behind the path since it was opened.
    pub async fn fate(&self) -> Fate {
        match tokio::fs::metadata(&self.path).await {
            Ok(m) if (m.dev(), m.ino()) != self.id => Fate::Replaced,
            Ok(m) if m.len() < self.consumed => Fate::Truncated,
            Ok(_) => Fate::Same,
            Err(_) => Fate::Gone,
        }
    }

    /// The next whole line, or none when the file has no more yet. With
    /// `at_end` (nothing more will be written) a last line without a
    /// newline counts; otherwise it waits for its newline.
    pub async fn next(&mut self, at_end: bool) -> io::Result<Option<Line>> {
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                if at_end && (!self.partial.is_empty() || self.cut) {
                    return Ok(Some(self.take()));
                }
                return Ok(None);
            }
            let (used, ended) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            let room = self.cap.saturating_sub(self.partial.len());
            self.cut |= used > room;
            self.partial.extend_from_slice(&buf[..used.min(room)]);
            let step = used + usize::from(ended);
            self.reader.consume(step);
            self.consumed += step as u64;
            if ended {
                return Ok(Some(self.take()));
            }
        }
    }

    fn take(&mut self) -> Line {
        let mut bytes = std::mem::take(&mut self.partial);
        if !self.cut && bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let line = Line { bytes, offset: self.start, cut: self.cut };
        self.start = self.consumed;
        self.cut = false;
        line
    }
}
