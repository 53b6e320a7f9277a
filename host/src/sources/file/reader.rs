//! Lines of one file, each at most a given length held in memory, read as
//! the file grows.

use std::io;
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

pub struct LineReader {
    path: PathBuf,
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
        Ok(LineReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(READ_BUFFER, file),
            cap,
            consumed: 0,
            start: 0,
            partial: Vec::new(),
            cut: false,
        })
    }

    /// Whether the file is now shorter than what was read of it.
    pub async fn truncated(&self) -> bool {
        tokio::fs::metadata(&self.path).await.is_ok_and(|m| m.len() < self.consumed)
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
