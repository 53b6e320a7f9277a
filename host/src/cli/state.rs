//! `sluice state PIPELINE`: the keyed state a pipeline's stateful plugins
//! keep in `sluice_state` (beside its exactly-once PostgreSQL sink's rows,
//! or in its `[state.postgres]` database), read from the store (the
//! pipeline need not run): per stage and partition its keys, its
//! timers and its clock, or with `--key` one key's value. State stored for
//! a transform that keeps none now is listed as orphaned; `--move` gives it
//! to the transform it belongs to now, `--drop` deletes it (with the
//! pipeline stopped).

use crate::state::stored;
use crate::state::{Filter, Stored};
use crate::topology::keeper::Keeper;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct StateArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// Only this transform (1-based, as `shadow` and `backfill` count).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub stage: Option<u32>,
    /// Only this source partition.
    #[arg(long)]
    pub partition: Option<i32>,
    /// Only this key (as UTF-8): its value and its timers.
    #[arg(long)]
    pub key: Option<String>,
    /// Moves the state stored for this transform (1-based) to `--to`: for
    /// a stateful stage whose place in the chain changed. Stop the pipeline first.
    #[arg(long = "move", value_name = "FROM", requires = "to", conflicts_with = "drop", value_parser = clap::value_parser!(u32).range(1..))]
    pub move_from: Option<u32>,
    /// Where `--move` puts the state (1-based).
    #[arg(long, value_name = "TO", requires = "move_from", value_parser = clap::value_parser!(u32).range(1..))]
    pub to: Option<u32>,
    /// Deletes the state stored for this transform (1-based). Stop the pipeline first.
    #[arg(long, value_name = "STAGE", value_parser = clap::value_parser!(u32).range(1..))]
    pub drop: Option<u32>,
}

pub fn state(runtime: &crate::runtime::Runtime, args: &StateArgs) -> anyhow::Result<ExitCode> {
    let spec = match crate::config::load_pipeline(&args.pipeline, None) {
        Ok(spec) => spec,
        Err(errors) => {
            super::print_config_errors(&errors);
            return Ok(ExitCode::from(1));
        }
    };
    let dir = spec.file.parent().unwrap_or(std::path::Path::new(".")).to_path_buf();
    let stage = args.stage.map(|n| n - 1);
    let filter = Filter { stage, partition: args.partition, key: args.key.clone().map(String::into_bytes) };
    let (rows, changed) = super::tokio_runtime()?.block_on(async {
        let mut sinks = std::collections::BTreeMap::new();
        for (name, config) in &spec.sinks {
            sinks.insert(name.clone(), crate::sinks::build(name, config, &spec.name, &dir).await?);
        }
        let keeper = Keeper::of(&spec, &sinks, &dir)?;
        let store = keeper.store(&sinks)?;
        let changed = match (args.move_from, args.to, args.drop) {
            (Some(from), Some(to), _) => {
                let rows = store.move_stage(from - 1, to - 1).await?;
                Some(format!("moved {rows} stored rows of transform {from}'s state to transform {to}"))
            }
            (_, _, Some(stage)) => {
                let rows = store.drop_stage(stage - 1).await?;
                Some(format!("dropped {rows} stored rows of transform {stage}'s state"))
            }
            _ => None,
        };
        Ok::<_, anyhow::Error>((store.scan(&filter).await?, changed))
    })?;
    if let Some(changed) = changed {
        println!("{changed}");
        return Ok(ExitCode::SUCCESS);
    }
    let stateful = stateful_transforms(runtime, &spec);
    print!("{}", render(&rows, args.key.is_some()));
    let mut orphaned: Vec<u32> = rows.iter().map(|r| r.stage).filter(|s| !stateful.contains(s)).collect();
    orphaned.dedup();
    for stage in orphaned {
        println!(
            "transform {n}'s state is orphaned: transform {n} keeps no state now (`--move {n} --to N` gives it to the transform that does, `--drop {n}` deletes it)",
            n = stage + 1
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The transforms (indices from 0) of `spec` whose plugins keep state
/// (contract 0.3); a plugin that cannot be loaded counts as stateful (its
/// state is not called orphaned on a guess).
fn stateful_transforms(runtime: &crate::runtime::Runtime, spec: &crate::config::Pipeline) -> Vec<u32> {
    spec.transforms
        .iter()
        .enumerate()
        .filter(|(_, t)| {
            let loaded = crate::runtime::Plugin::load(runtime, &t.path);
            !matches!(loaded, Ok(plugin) if !plugin.contract.has_state())
        })
        .map(|(i, _)| i as u32)
        .collect()
}

/// The stored keys as text: one line per entry, timer and clock, a summary
/// line per stage and partition; with `values`, each entry's value too.
pub fn render(rows: &[Stored], values: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut at = 0;
    while at < rows.len() {
        let (stage, partition) = (rows[at].stage, &rows[at].partition);
        let end = rows[at..]
            .iter()
            .position(|r| r.stage != stage || &r.partition != partition)
            .map_or(rows.len(), |n| at + n);
        let group = &rows[at..end];
        let entries: Vec<&Stored> = group.iter().filter(|r| r.key.first() == Some(&stored::ENTRY)).collect();
        let timers = group.iter().filter(|r| r.key.first() == Some(&stored::TIMER)).count();
        let bytes: usize = entries.iter().map(|r| r.key.len() - 1 + r.value.len()).sum();
        let clock = group.iter().find(|r| r.key.first() == Some(&stored::CLOCK)).map(|r| stored::parse_clock(&r.value));
        let _ = write!(
            out,
            "transform {} {}/{}: {} keys ({bytes} bytes), {timers} timers",
            stage + 1,
            partition.0,
            partition.1,
            entries.len()
        );
        if let Some(version) = group.iter().find(|r| r.key.first() == Some(&stored::VERSION)) {
            let _ = write!(out, ", state version {}", stored::parse_version(&version.value));
        }
        match clock {
            Some((watermark, newest)) => {
                let _ = writeln!(out, ", watermark {}, newest timestamp {}", time(watermark), time(newest));
            }
            None => out.push('\n'),
        }
        for r in group {
            match r.key.first() {
                Some(&stored::ENTRY) if values => {
                    let _ = writeln!(out, "  {} = {}", show(&r.key[1..]), show(&r.value));
                }
                Some(&stored::ENTRY) => {
                    let _ = writeln!(out, "  {} ({} bytes)", show(&r.key[1..]), r.value.len());
                }
                Some(&stored::TIMER) => {
                    if let Some((at, key)) = stored::parse_timer(&r.key) {
                        let _ = writeln!(out, "  timer {} at {}", show(&key), time(Some(at)));
                    }
                }
                _ => {}
            }
        }
        at = end;
    }
    if rows.is_empty() {
        out.push_str("no state stored\n");
    }
    out
}

/// Bytes as text: UTF-8 with NUL and other control characters escaped.
fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() })
        .collect()
}

/// Milliseconds since the Unix epoch as RFC 3339 (`-` for none).
fn time(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "-".to_string() };
    let at = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms.max(0) as u64));
    at.map_or_else(|| ms.to_string(), |t| humantime::format_rfc3339_millis(t).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_timers_and_the_clock_are_shown_per_partition() {
        let p = ("raw".into(), 0);
        let row = |key: Vec<u8>, value: &[u8]| Stored { stage: 1, partition: p.clone(), key, value: value.to_vec() };
        let rows = [
            row(stored::entry(b"A\x0060000"), br#"{"trades":2}"#),
            row(stored::timer(120_000, b"A\x0060000"), b""),
            row(vec![stored::CLOCK], &stored::clock(Some(61_000), Some(62_000))),
        ];
        let text = render(&rows, true);
        assert!(
            text.starts_with("transform 2 raw/0: 1 keys (19 bytes), 1 timers, watermark 1970-01-01T00:01:01.000Z"),
            "{text}"
        );
        assert!(text.contains("  A\\060000 = {\"trades\":2}"), "{text}");
        assert!(text.contains("timer A\\060000 at 1970-01-01T00:02:00.000Z"), "{text}");
        assert_eq!(render(&[], false), "no state stored\n");
    }
}
