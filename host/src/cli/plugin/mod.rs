//! `sluice plugin test` (run a plugin over input lines: [`test`]) and
//! `sluice plugin new` (write a plugin skeleton).
//!
//! - [`test`]: the command, stateless and stateful;
//! - [`input`]: its input lines, and the source a stateful run reads them from;
//! - [`golden`]: `--expect` (a golden file compared by the shadow's diff) and `--update`;
//! - [`trace`]: `--trace`, what a stateful plugin did to some of its keys, batch by batch.

pub mod golden;
pub mod input;
pub mod test;
pub mod trace;

use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

pub use test::{test, PluginTestArgs};

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Run a plugin over input values, one per line, and print its outputs.
    ///
    /// Each output value is printed on its own line on stdout; each failing
    /// input is reported on stderr as `line N: <error>`. A stateful plugin
    /// (contract 0.3) runs through the pipeline's own transform step, with
    /// its state in memory: event time from `--event-time`, partitions from
    /// `--partition-by`, timers fired as the watermark passes and every one
    /// at the end of the input. With `--expect FILE` the outputs are
    /// compared with a golden file instead of printed. Exit status: 0 when
    /// no input failed (and the outputs match), 1 when some did (or they
    /// differ), 2 when the plugin could not run.
    Test(Box<PluginTestArgs>),
    /// Write a ready-to-build plugin skeleton in Rust, Python or JavaScript.
    ///
    /// The folder gets the WIT contract, the language's SDK, a sample
    /// transform with unit tests, sample input with its golden outputs, a
    /// README and `build.sh`, which installs the toolchain, runs the unit
    /// tests, writes NAME.wasm and checks it against the golden file.
    New(PluginNewArgs),
}

#[derive(Debug, Args)]
pub struct PluginNewArgs {
    /// The plugin's name (lower case, digits, '-' or '_'); also its folder.
    pub name: String,
    /// The language to write it in.
    #[arg(long, value_enum, default_value_t = crate::scaffold::Lang::Rust)]
    pub lang: crate::scaffold::Lang,
    /// Where to create it (default: ./NAME). Must not exist or be empty.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Writes `path` with `write`: beside it, then renamed over it, so that a
/// kill leaves the old file or the new one, never half of either.
pub(crate) fn write_replacing(
    path: &std::path::Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    let tmp =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write beside {}", path.display()))?;
    let mut out = std::io::BufWriter::new(tmp);
    write(&mut out)?;
    let tmp =
        out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub fn new(args: PluginNewArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let written = crate::scaffold::new_plugin(&dir, &args.name, args.lang)?;
    for path in &written {
        println!("created {}", path.display());
    }
    println!(
        "\nnext: build it (installs the toolchain, runs the unit tests) and try it on the sample input:\n  cd {} && ./build.sh && sluice plugin test {}.wasm -i sample.jsonl",
        dir.display(),
        args.name
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    /// A write that stops halfway (as a kill would) leaves the old file whole.
    #[test]
    fn a_replacing_write_that_stops_halfway_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("expected.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        let stopped = super::write_replacing(&path, |out| {
            out.write_all(b"half")?;
            anyhow::bail!("stopped")
        });
        assert!(stopped.is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\n");
        super::write_replacing(&path, |out| Ok(out.write_all(b"new\n")?)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }
}
