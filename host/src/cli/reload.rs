//! The one reload path: re-read the pipeline files and apply them to the
//! topology (startup is the same apply, from nothing).

use crate::runtime::Runtime;
use std::path::PathBuf;

/// Re-reads the pipeline files and applies them. Anything invalid (a file
/// `sluice check` would reject, a plugin that does not compile or rejects its
/// config) is logged and leaves the running pipelines as they were.
/// Returns a one-line summary, or the reasons for the rejection.
pub async fn reload(
    runtime: &Runtime,
    paths: &[PathBuf],
    topology: &mut crate::topology::Topology,
    watcher: &mut crate::config::watcher::Watcher,
    reason: &str,
) -> Result<String, String> {
    use tracing::{info, warn};
    let started = std::time::Instant::now();
    let wanted = match tokio::task::block_in_place(|| crate::config::load_dir_or_files(paths, Some(runtime))) {
        Ok(wanted) => wanted,
        Err(errors) => {
            for error in &errors {
                warn!(%reason, %error, "reload rejected: invalid pipeline; running pipelines unchanged");
            }
            return Err(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"));
        }
    };
    match topology.apply(wanted).await {
        Ok(applied) => {
            watcher.follow(topology.pipelines());
            let ms = started.elapsed().as_secs_f64() * 1e3;
            info!(
                %reason,
                started = ?applied.started,
                stopped = ?applied.stopped,
                swapped = ?applied.swapped,
                unchanged = ?applied.kept,
                ms,
                "reload applied"
            );
            Ok(format!(
                "reload applied in {ms:.0} ms: started {:?}, stopped {:?}, swapped {:?}, unchanged {:?}",
                applied.started, applied.stopped, applied.swapped, applied.kept
            ))
        }
        Err(error) => {
            let error = format!("{error:#}");
            warn!(%reason, %error, "reload rejected; running pipelines unchanged");
            Err(error)
        }
    }
}
