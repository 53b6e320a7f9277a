//! `sluice backfill`: recomputes a past range of a pipeline's input into a
//! side table (or topic), beside the live pipeline.
//!
//! The pipeline file is loaded as `sluice run` would load it; then its
//! sinks are pointed at the targets given with `--into`, its plugin may be
//! replaced by another version (`--plugin`), and it runs under its own name,
//! `<name>.backfill.<targets>.<from>..<to>`, over the range of its Kafka
//! source's offsets (see [`crate::sources::kafka::range`]), until the end
//! of the range. The live pipeline's consumer group is never touched. Into
//! PostgreSQL, the rows and the offsets they came from commit together
//! under the backfill's name, so running the same backfill again, or after
//! it was killed, completes it without writing a row twice.

use super::{print_config_errors, tokio_runtime};
use crate::config::Pipeline;
use crate::runtime::Runtime;
use crate::sources::{Position, Range, RunOptions};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// The pipeline file whose input is recomputed (its source must be Kafka).
    pub pipeline: PathBuf,
    /// The start of the range: the first record, per partition, whose
    /// timestamp is at or after this (RFC 3339 like 2019-12-05T06:18:00Z, or
    /// epoch milliseconds), `earliest`, or an offset per partition
    /// (`0:1200,1:1180`; the partitions it leaves out are not read).
    #[arg(long, value_parser = parse_position)]
    pub from: Position,
    /// The end of the range (exclusive): a time as for --from, `latest` (the
    /// end offsets when the backfill starts), or an offset per partition
    /// (the partitions it leaves out are read to `latest`).
    #[arg(long, value_parser = parse_position, default_value = "latest")]
    pub to: Position,
    /// Where a sink writes instead: its PostgreSQL table (created when
    /// missing) or its Kafka topic. `TARGET` for a pipeline with one sink,
    /// `SINK=TARGET` for each sink otherwise (stdout sinks stay as they are).
    #[arg(long, required = true)]
    pub into: Vec<String>,
    /// Another version of a plugin to recompute with (a .wasm component),
    /// with the configuration, limits and grants of the transform it replaces.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// The transform (1-based) --plugin replaces, when the pipeline has several.
    #[arg(long, requires = "plugin")]
    pub stage: Option<usize>,
    /// At most this many records a second, to spare the brokers the live
    /// pipelines read from.
    #[arg(long)]
    pub max_rate: Option<u64>,
    /// Seconds between progress lines (records read, rate, records left as
    /// `lag`, and the ETA); 0 disables them.
    #[arg(long, default_value_t = 5)]
    pub progress_secs: u64,
}

fn parse_position(raw: &str) -> Result<Position, String> {
    raw.parse()
}

pub fn backfill(runtime: Runtime, args: &BackfillArgs) -> anyhow::Result<ExitCode> {
    if let Some(why) = Position::empty_range(&args.from, &args.to) {
        anyhow::bail!("the range is empty: {why}");
    }
    let live = match crate::config::load_pipeline(&args.pipeline, Some(&runtime)) {
        Ok(p) => p,
        Err(errors) => {
            print_config_errors(&errors);
            return Ok(ExitCode::FAILURE);
        }
    };
    let pipeline = side_pipeline(&runtime, live.clone(), args)?;
    let options = RunOptions {
        until_eof: true,
        range: Some(Range { from: args.from.clone(), to: args.to.clone(), max_rate: args.max_rate }),
    };
    tracing::info!(pipeline = %pipeline.name, from = %args.from, to = %args.to, "backfill starting");
    let started = Instant::now();
    tokio_runtime()?.block_on(async move {
        not_into_live_tables(&live, &pipeline).await?;
        let mut topology = crate::topology::Topology::with_options(runtime, options);
        let name = pipeline.name.clone();
        topology.apply(vec![pipeline]).await?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut progress = super::run::Progress::new(args.progress_secs);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!(pipeline = %name, "interrupted: finishing the batch in hand (run the same command again to go on)");
                    topology.shutdown().await;
                    return Ok(ExitCode::FAILURE);
                }
                _ = tick.tick() => {}
            }
            progress.maybe_log(&topology);
            let failed = topology.reap().await;
            if topology.is_empty() {
                let s = crate::telemetry::telemetry().state(&name);
                let secs = started.elapsed().as_secs_f64();
                if failed > 0 {
                    tracing::error!(pipeline = %name, "backfill failed (run the same command again to go on)");
                    return Ok(ExitCode::FAILURE);
                }
                tracing::info!(
                    pipeline = %name,
                    records_in = s.records_in,
                    records_out = s.records_out,
                    dead_lettered = s.dead_lettered,
                    secs = format!("{secs:.1}"),
                    "backfill done"
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
    })
}

/// The live pipeline made into its backfill: sinks redirected, plugin
/// replaced, shadows left out, its own name.
fn side_pipeline(runtime: &Runtime, mut pipeline: Pipeline, args: &BackfillArgs) -> anyhow::Result<Pipeline> {
    let file = pipeline.file.display().to_string();
    anyhow::ensure!(
        pipeline.source.connector().reads_ranges(),
        "{file}: a backfill reads a past range of the source's input; a `{}` source cannot",
        pipeline.source.kind()
    );
    let targets = redirect(&mut pipeline, &args.into).with_context(|| format!("{file}: --into"))?;
    // A shadow run compares live traffic; a backfill runs the chain alone.
    for t in &mut pipeline.transforms {
        t.shadow = None;
    }
    if let Some(path) = &args.plugin {
        let stage = match (args.stage, pipeline.transforms.len()) {
            (Some(n), len) if (1..=len).contains(&n) => n - 1,
            (Some(n), len) => anyhow::bail!("{file}: --stage {n}: the pipeline has {len} transform(s)"),
            (None, 1) => 0,
            (None, len) => {
                anyhow::bail!("{file}: the pipeline has {len} transforms: say which --plugin replaces with --stage")
            }
        };
        let spec = &mut pipeline.transforms[stage];
        spec.path = path.clone();
        spec.load(runtime, &pipeline.name).map_err(|e| {
            anyhow::anyhow!("--plugin {}: with the config of transform {}: {e}", path.display(), stage + 1)
        })?;
    }
    pipeline.name = format!("{}.backfill.{}.{}..{}", pipeline.name, targets.join("+"), args.from, args.to);
    Ok(pipeline)
}

/// Refuses a backfill whose postgres sink would write into its live table
/// under another spelling (`public.t` for `t`): the names are resolved as
/// PostgreSQL does, in the sink's database.
async fn not_into_live_tables(live: &Pipeline, side: &Pipeline) -> anyhow::Result<()> {
    let dir = live.file.parent().unwrap_or(std::path::Path::new("."));
    for (name, sink) in &side.sinks {
        let Some(live_sink) = live.sinks.get(name) else { continue };
        let (Some(live_target), Some(side_target)) = (live_sink.connector().target(), sink.connector().target()) else {
            continue;
        };
        let same = live_sink
            .connector()
            .same_target(live_target, side_target, dir)
            .await
            .with_context(|| format!("sink {name:?}: cannot tell whether {side_target:?} is the live target"))?;
        anyhow::ensure!(
            !same,
            "{}: --into: sink {name:?}: {side_target:?} is the live target {live_target:?}; a backfill writes beside it",
            live.file.display()
        );
    }
    Ok(())
}

/// Points each sink at its `--into` target; returns the targets.
fn redirect(pipeline: &mut Pipeline, into: &[String]) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> =
        pipeline.sinks.iter().filter(|(_, s)| s.connector().target().is_some()).map(|(n, _)| n.clone()).collect();
    let mut given = std::collections::BTreeMap::new();
    for raw in into {
        let (sink, target) = match raw.split_once('=') {
            Some((sink, target)) => (sink.to_string(), target.to_string()),
            None if names.len() == 1 && into.len() == 1 => (names[0].clone(), raw.clone()),
            None => anyhow::bail!("{raw:?}: the pipeline has sinks {names:?}: give SINK=TARGET for each"),
        };
        anyhow::ensure!(names.contains(&sink), "{raw:?}: no sink {sink:?} to redirect (sinks: {names:?})");
        anyhow::ensure!(!target.is_empty(), "{raw:?}: the target is empty");
        if given.insert(sink.clone(), target).is_some() {
            anyhow::bail!("sink {sink:?} is given twice");
        }
    }
    let missing: Vec<&String> = names.iter().filter(|n| !given.contains_key(*n)).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "sink(s) {missing:?} would write into the live targets: give each a side target (SINK=TARGET)"
    );
    for (sink, target) in &given {
        let Some(live) = pipeline.sinks.get_mut(sink).and_then(|s| s.connector_mut().redirect(target)) else {
            continue;
        };
        anyhow::ensure!(live != *target, "sink {sink:?}: {target:?} is the live target; a backfill writes beside it");
    }
    Ok(given.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(sinks: &str) -> Pipeline {
        let top = if sinks.contains("[sinks.out]") && sinks.contains("[sinks.rows]") {
            "default_sink = \"rows\"\n"
        } else {
            ""
        };
        let text = format!(
            "name = \"trades\"\n{top}[source]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9\"\ntopics = [\"in\"]\n{sinks}\n[dead_letter]\ntype = \"stdout\"\n"
        );
        crate::config::parse_pipeline(&text, std::path::Path::new("/tmp/p.toml"), None).expect("a valid pipeline")
    }

    const PG: &str = "[sinks.rows]\ntype = \"postgres\"\nurl = \"postgres://localhost/db\"\ntable = \"trades\"\ncolumns = [{ name = \"v\", type = \"text\" }]\n";
    const KAFKA: &str = "[sinks.out]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:9\"\ntopic = \"out\"\n";

    #[test]
    fn one_sink_takes_the_target_and_creates_its_side_table() {
        let mut p = pipeline(PG);
        assert_eq!(redirect(&mut p, &["trades_fixed".into()]).unwrap(), vec!["trades_fixed"]);
        assert_eq!(p.sinks["rows"].connector().target(), Some("trades_fixed"));
    }

    #[test]
    fn every_sink_is_redirected_and_never_into_its_live_target() {
        let mut p = pipeline(&format!("{PG}{KAFKA}"));
        let error = redirect(&mut p, &["x".into()]).unwrap_err().to_string();
        assert!(error.contains("SINK=TARGET"), "{error}");
        let error = redirect(&mut p, &["rows=x".into()]).unwrap_err().to_string();
        assert!(error.contains("\"out\""), "the Kafka sink is left: {error}");
        let error = redirect(&mut pipeline(PG), &["trades".into()]).unwrap_err().to_string();
        assert!(error.contains("live target"), "{error}");
        let mut p = pipeline(&format!("{PG}{KAFKA}"));
        assert_eq!(redirect(&mut p, &["rows=t2".into(), "out=o2".into()]).unwrap(), vec!["o2", "t2"]);
        assert_eq!(p.sinks["out"].connector().target(), Some("o2"));
    }
}
