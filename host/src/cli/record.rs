//! `sluice record PIPELINE --stage N --out FILE`: records a stage of a
//! running instance (through its admin listener, with its token) into a
//! capture file, for `sluice replay` ([`crate::capture`]).

use super::shadow::{read_token, Instance};
use crate::capture::Capture;
use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The pipeline's name.
    pub pipeline: String,
    /// The transform to record (1-based); needed only when there are several.
    #[arg(long)]
    pub stage: Option<usize>,
    /// The capture file to write (written as the capture comes: a capture
    /// cut short is readable up to its last whole entry).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Stop after this long (`60s`, `5m`, `500ms`).
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Stop after this many input records.
    #[arg(long)]
    pub records: Option<u64>,
    /// Stop after this many MiB of capture.
    #[arg(long, default_value_t = 64)]
    pub max_mib: u64,
    #[command(flatten)]
    pub instance: Instance,
}

pub fn record(args: &RecordArgs) -> anyhow::Result<ExitCode> {
    let token = read_token(args.instance.token_file.as_ref())?;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("http://{}/pipelines/{}/record", args.instance.addr, args.pipeline);
    let body = serde_json::json!({
        "stage": args.stage,
        "records": args.records,
        "for_ms": args.duration.map(|d| d.as_millis() as u64),
        "max_mib": args.max_mib,
    });
    let mut request = agent.post(&url).header("Content-Type", "application/json");
    if let Some(token) = &token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response =
        request.send(body.to_string()).with_context(|| format!("POST {url}: is `sluice run` listening there?"))?;
    if response.status().as_u16() != 200 {
        // Refused (no such pipeline or stage, one already recorded): exit 2.
        let text = response.body_mut().read_to_string().unwrap_or_default();
        anyhow::bail!("{}", text.trim_end());
    }
    let mut file = std::fs::File::create(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut reader = response.body_mut().as_reader();
    let mut buf = vec![0; 64 << 10];
    // A connection cut (the instance stopped or killed) ends the capture
    // where it is: what came is kept, and read up to its last whole entry.
    let mut cut = None;
    loop {
        let n = match std::io::Read::read(&mut reader, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                cut = Some(e);
                break;
            }
        };
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).with_context(|| format!("cannot write {}", args.out.display()))?;
    }
    file.sync_all().with_context(|| format!("cannot write {}", args.out.display()))?;
    if std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0) == 0 {
        eprintln!("sluice: the recording ended before the stage ran a batch: nothing was recorded");
        return Ok(ExitCode::FAILURE);
    }
    if let Some(e) = &cut {
        eprintln!("sluice: the connection to {} was cut ({e}): the capture ends there", args.instance.addr);
    }
    let capture = Capture::read(&args.out)?;
    if let Some((at, len)) = capture.truncated {
        eprintln!(
            "sluice: {}: its last {len} bytes (from byte {at}) are a partial entry, left out on reading",
            args.out.display()
        );
    }
    let h = &capture.header;
    let records: usize = capture.calls().map(|c| c.inputs.len()).sum();
    let end = capture.end().map_or("the connection ended before the recording's end", |e| e.reason.as_str());
    println!(
        "recorded {} call(s), {records} record(s) of transform {} of {} ({} {}) into {}: {end}",
        capture.calls().count(),
        h.stage,
        h.pipeline,
        h.plugin.name,
        h.plugin.hash.get(..12).unwrap_or(&h.plugin.hash),
        args.out.display(),
    );
    Ok(ExitCode::SUCCESS)
}
