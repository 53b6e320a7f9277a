//! `sluice check`: validates pipeline files without running them.

use super::{print_config_errors, PipelineArgs};
use crate::runtime::Runtime;
use std::process::ExitCode;

pub fn check(runtime: &Runtime, args: &PipelineArgs) -> anyhow::Result<ExitCode> {
    match crate::config::load_dir_or_files(&args.paths, Some(runtime)) {
        Ok(pipelines) => {
            for p in &pipelines {
                let plugins: Vec<String> = p
                    .transforms
                    .iter()
                    .map(|t| t.path.file_stem().unwrap_or_default().to_string_lossy().into_owned())
                    .collect();
                let sinks: Vec<&str> = p.sinks.keys().map(String::as_str).collect();
                println!(
                    "{}: ok: pipeline {} [{}] -> sinks [{}] (default {})",
                    p.file.display(),
                    p.name,
                    plugins.join(" -> "),
                    sinks.join(", "),
                    p.default_sink
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            print_config_errors(&errors);
            Ok(ExitCode::FAILURE)
        }
    }
}
