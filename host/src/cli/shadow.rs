//! `sluice shadow start|report|promote|stop PIPELINE`: a running instance's
//! shadow runs, through its admin listener (with its token, if it has one).

use crate::shadow::report::render;
use crate::shadow::ShadowReport;
use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum ShadowCommand {
    /// Start a shadow run: the pipeline file gets `shadow = "PLUGIN"` on
    /// the transform, and the reload starts the candidate beside it.
    Start(StartArgs),
    /// Print a pipeline's shadow runs: the counts by outcome (identical,
    /// different, only live, only candidate, errors), the diff ratio, the
    /// candidate's CPU, and the sampled differences field by field.
    Report(ReportArgs),
    /// Promote a pipeline's shadow candidate: the pipeline file is
    /// rewritten with the candidate as the transform's plugin, then
    /// reloaded: the ordinary hot swap, with probation and rollback.
    Promote(StageArgs),
    /// Stop a shadow run: its `shadow` is removed from the pipeline file.
    Stop(StageArgs),
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The pipeline's name.
    pub pipeline: String,
    /// The candidate component (a .wasm file; its absolute path is written
    /// into the pipeline file).
    pub plugin: PathBuf,
    /// The transform to shadow (1-based); needed only when there are several.
    #[arg(long)]
    pub stage: Option<usize>,
    #[command(flatten)]
    pub instance: Instance,
}

#[derive(Debug, Args)]
pub struct Instance {
    /// The admin listener of the running instance.
    #[arg(long, default_value = "127.0.0.1:8686")]
    pub addr: String,
    /// The file holding the instance's admin token (its `--admin-token-file`).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The pipeline's name.
    pub pipeline: String,
    /// Print the report as JSON (as `GET /pipelines/NAME/shadow` gives it).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub instance: Instance,
}

#[derive(Debug, Args)]
pub struct StageArgs {
    /// The pipeline's name.
    pub pipeline: String,
    /// The transform whose shadow it is (1-based); needed only when several
    /// transforms have one.
    #[arg(long)]
    pub stage: Option<usize>,
    #[command(flatten)]
    pub instance: Instance,
}

/// The token in `path`, if given.
pub(crate) fn read_token(path: Option<&PathBuf>) -> anyhow::Result<Option<String>> {
    path.map(|path| {
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_string())
            .with_context(|| format!("cannot read --token-file {}", path.display()))
    })
    .transpose()
}

/// `GET path` on the instance, or `POST path` with a JSON `body`: its
/// status code and body.
fn call(instance: &Instance, path: &str, post: Option<serde_json::Value>) -> anyhow::Result<(u16, String)> {
    let token = read_token(instance.token_file.as_ref())?;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("http://{}{path}", instance.addr);
    let auth = token.map(|t| format!("Bearer {t}"));
    let method = if post.is_some() { "POST" } else { "GET" };
    let response = match post {
        Some(body) => {
            let mut request = agent.post(&url).header("Content-Type", "application/json");
            if let Some(auth) = &auth {
                request = request.header("Authorization", auth);
            }
            request.send(body.to_string())
        }
        None => {
            let mut request = agent.get(&url);
            if let Some(auth) = &auth {
                request = request.header("Authorization", auth);
            }
            request.call()
        }
    };
    let mut response = response.with_context(|| format!("{method} {url}: is `sluice run` listening there?"))?;
    let code = response.status().as_u16();
    let body = response.body_mut().read_to_string().with_context(|| format!("reading the answer to {method} {url}"))?;
    Ok((code, body))
}

pub fn shadow(command: &ShadowCommand) -> anyhow::Result<ExitCode> {
    match command {
        ShadowCommand::Report(args) => {
            let (code, body) = call(&args.instance, &format!("/pipelines/{}/shadow", args.pipeline), None)?;
            anyhow::ensure!(code == 200, "{}", body.trim_end());
            if args.json {
                println!("{body}");
                return Ok(ExitCode::SUCCESS);
            }
            let reports: Vec<ShadowReport> = serde_json::from_str(&body).context("the shadow report is not JSON")?;
            if reports.is_empty() {
                println!("pipeline {} has no shadow run", args.pipeline);
            }
            for report in &reports {
                print!("{}", render(report));
            }
            Ok(ExitCode::SUCCESS)
        }
        ShadowCommand::Start(args) => {
            let plugin = std::path::absolute(&args.plugin)
                .with_context(|| format!("{}: cannot make the path absolute", args.plugin.display()))?;
            anyhow::ensure!(plugin.is_file(), "{}: no such file", plugin.display());
            let body = serde_json::json!({ "plugin": plugin.display().to_string(), "stage": args.stage });
            answer(call(&args.instance, &format!("/pipelines/{}/shadow/start", args.pipeline), Some(body))?)
        }
        ShadowCommand::Promote(args) => answer(call(&args.instance, &stage_path(args, "promote"), Some(().into()))?),
        ShadowCommand::Stop(args) => answer(call(&args.instance, &stage_path(args, "stop"), Some(().into()))?),
    }
}

/// `…/shadow/ACTION`, or `…/shadow/STAGE/ACTION` with `--stage`.
fn stage_path(args: &StageArgs, action: &str) -> String {
    match args.stage {
        Some(stage) => format!("/pipelines/{}/shadow/{stage}/{action}", args.pipeline),
        None => format!("/pipelines/{}/shadow/{action}", args.pipeline),
    }
}

/// Prints an action's answer; an error unless it is 200.
fn answer((code, body): (u16, String)) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(code == 200, "{}", body.trim_end());
    println!("{}", body.trim_end());
    Ok(ExitCode::SUCCESS)
}
