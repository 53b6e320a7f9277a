//! `sluice plugin test` (run a plugin over input lines) and `sluice plugin
//! new` (write a plugin skeleton).

use super::parse_key_value;
use crate::record::{Origin, Record};
use crate::runtime::{Grants, Limits, Plugin, PluginInstance, Runtime};
use anyhow::Context;
use clap::{Args, Subcommand};
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Run a plugin over input values, one per line, and print its outputs.
    ///
    /// Each output value is printed on its own line on stdout; each failing
    /// input is reported on stderr as `line N: <error>`. Exit status: 0 when
    /// no input failed, 1 when some did, 2 when the plugin could not run.
    Test(PluginTestArgs),
    /// Write a ready-to-build plugin skeleton in Rust, Python or JavaScript.
    ///
    /// The folder gets the WIT contract, the language's SDK, a sample
    /// transform with unit tests, sample input, a README and `build.sh`, which
    /// installs the toolchain, runs the unit tests and writes NAME.wasm.
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

#[derive(Debug, Args)]
pub struct PluginTestArgs {
    /// The plugin component (.wasm).
    pub plugin: PathBuf,
    /// A plugin configuration entry, KEY=VALUE (repeatable).
    #[arg(long = "config", short = 'c', value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,
    /// Read input values from this file instead of stdin.
    #[arg(long, short = 'i')]
    pub input: Option<PathBuf>,
    /// Print each output as a JSON object with its key, route, timestamp and
    /// headers (value: embedded when it is JSON, else a string).
    #[arg(long)]
    pub json: bool,
    /// Records per call into the plugin.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// CPU limit per call, in milliseconds.
    #[arg(long, default_value_t = Limits::default().cpu_ms)]
    pub cpu_ms: u64,
    /// Memory limit of the instance, in MiB.
    #[arg(long, default_value_t = Limits::default().memory_bytes >> 20)]
    pub memory_mib: usize,
    /// Write every log line of the plugin (no rate limit): for debugging.
    #[arg(long)]
    pub no_log_limit: bool,
}

pub fn test(runtime: &Runtime, args: PluginTestArgs) -> anyhow::Result<ExitCode> {
    let plugin = Plugin::load(runtime, &args.plugin)?;
    let mut limits = Limits { cpu_ms: args.cpu_ms, memory_bytes: args.memory_mib << 20, ..Limits::default() };
    if args.no_log_limit {
        limits.log_lines_per_s = 0;
    }
    let mut instance = PluginInstance::new(plugin, args.config, limits, Grants::default(), "plugin-test")?;

    let (topic, mut input): (std::sync::Arc<str>, Box<dyn BufRead>) = match &args.input {
        Some(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
            (path.display().to_string().into(), Box::new(std::io::BufReader::new(file)))
        }
        None => ("stdin".into(), Box::new(std::io::stdin().lock())),
    };
    let mut stdout = BufWriter::new(std::io::stdout().lock());
    let mut failed = 0u64;
    let mut line_no = 0i64;
    let mut batch = Vec::with_capacity(args.batch_size as usize);
    loop {
        let mut value = Vec::new();
        let read = input.read_until(b'\n', &mut value).context("cannot read input")?;
        if read > 0 {
            if value.last() == Some(&b'\n') {
                value.pop();
                if value.last() == Some(&b'\r') {
                    value.pop();
                }
            }
            line_no += 1;
            let origin = Origin { topic: topic.clone(), partition: 0, offset: line_no };
            batch.push(Record { value: value.into(), origin, ..Record::default() });
        }
        if batch.len() == args.batch_size as usize || (read == 0 && !batch.is_empty()) {
            let results = instance.process(&batch);
            if let Some(reason) = instance.take_failing() {
                eprintln!(
                    "sluice: the plugin version is failing: {reason}; the batch's remaining records were not run"
                );
            }
            for (record, result) in batch.iter().zip(results) {
                match result {
                    Ok(outputs) => {
                        for output in outputs {
                            if args.json {
                                serde_json::to_writer(&mut stdout, &OutputJson::new(record.origin.offset, &output))?;
                            } else {
                                stdout.write_all(&output.value)?;
                            }
                            stdout.write_all(b"\n")?;
                        }
                    }
                    Err(error) => {
                        failed += 1;
                        stdout.flush()?;
                        eprintln!("line {}: {error}", record.origin.offset);
                    }
                }
            }
            batch.clear();
        }
        if read == 0 {
            break;
        }
    }
    stdout.flush()?;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// One output of `sluice plugin test --json`.
#[derive(serde::Serialize)]
struct OutputJson<'a> {
    line: i64,
    route: Option<&'a str>,
    key: Option<std::borrow::Cow<'a, str>>,
    timestamp: Option<i64>,
    headers: Vec<(&'a str, std::borrow::Cow<'a, str>)>,
    value: JsonOrText<'a>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum JsonOrText<'a> {
    Json(&'a serde_json::value::RawValue),
    Text(std::borrow::Cow<'a, str>),
}

impl<'a> OutputJson<'a> {
    fn new(line: i64, output: &'a crate::record::Output) -> Self {
        let value = match serde_json::from_slice::<&serde_json::value::RawValue>(&output.value) {
            Ok(raw) => JsonOrText::Json(raw),
            Err(_) => JsonOrText::Text(String::from_utf8_lossy(&output.value)),
        };
        OutputJson {
            line,
            route: output.route.as_deref(),
            key: output.key.as_deref().map(String::from_utf8_lossy),
            timestamp: output.timestamp,
            headers: output.headers.iter().map(|h| (h.name.as_str(), String::from_utf8_lossy(&h.value))).collect(),
            value,
        }
    }
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
