//! A plugin's stderr: kept in memory (the last few KiB), never on the host's
//! terminal. When the plugin traps, the panic message found there becomes the
//! fault's reason, so a dead-letter header says *why* in the plugin's words.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// How much of the plugin's most recent stderr output is kept.
const KEEP: usize = 4096;

#[derive(Clone, Default)]
pub struct PluginStderr(Arc<Mutex<Vec<u8>>>);

impl PluginStderr {
    pub fn clear(&self) {
        if let Ok(mut buf) = self.0.lock() {
            buf.clear();
        }
    }

    /// `panicked at LOCATION: MESSAGE` from a Rust guest's panic output, if any.
    pub fn panic_message(&self) -> Option<String> {
        let buf = self.0.lock().ok()?;
        let text = String::from_utf8_lossy(&buf);
        let start = text.rfind("panicked at ")?;
        let rest = &text[start + "panicked at ".len()..];
        let (location, message) = rest.split_once(":\n")?;
        let message = message.split("\nnote:").next().unwrap_or(message).trim();
        Some(format!("panicked at {location}: {}", message.replace('\n', " ")))
    }
}

impl IsTerminal for PluginStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginStderr {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for PluginStderr {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if let Ok(mut buf) = self.0.lock() {
            buf.extend_from_slice(data);
            if buf.len() > KEEP {
                let excess = buf.len() - KEEP;
                buf.drain(..excess);
            }
        }
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn finds_the_last_panic_and_keeps_only_the_tail() {
        let stderr = PluginStderr::default();
        assert_eq!(stderr.panic_message(), None);
        let mut w = stderr.clone();
        w.write_all(&vec![b'x'; 10_000]).await.unwrap();
        w.write_all(b"\nthread '<unnamed>' panicked at src/lib.rs:7:9:\nbad frame\nsecond line\nnote: run with `RUST_BACKTRACE=1`\n")
            .await
            .unwrap();
        assert_eq!(stderr.panic_message().as_deref(), Some("panicked at src/lib.rs:7:9: bad frame second line"));
        assert!(stderr.0.lock().unwrap().len() <= KEEP);
        stderr.clear();
        assert_eq!(stderr.panic_message(), None);
    }
}
