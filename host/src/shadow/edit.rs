//! The pipeline-file edits behind the admin actions. The file says what
//! runs, so an action is an edit of it, and the reload that the edit causes
//! applies it (a restart keeps it too):
//!
//! - **promote**: a transform's candidate becomes its plugin (with the
//!   candidate's `config`, if it has its own) and its `shadow` goes; the
//!   reload is the ordinary hot swap: probation, and a rollback if the new
//!   version fails;
//! - **start**: a transform gets `shadow = "PATH"`;
//! - **stop**: a transform's `shadow` goes.
//!
//! The rest of the file, comments and layout included, stays as written,
//! and the file is replaced whole.

use anyhow::{bail, Context};
use std::path::Path;
use toml_edit::{DocumentMut, Item, Table, Value};

/// Promotes the candidate of transform `stage` (0-based) of the pipeline
/// file `file`; returns the new plugin path, as written in the file.
pub fn promote(file: &Path, stage: usize) -> anyhow::Result<String> {
    edit(file, stage, promote_table)
}

/// Gives transform `stage` of `file` the candidate `plugin` (replacing a
/// shadow it has); returns the path given. The path is written as a
/// literal: a `${…}` in it is never expanded ([`crate::config::env::literal`]).
pub fn start(file: &Path, stage: usize, plugin: &str) -> anyhow::Result<String> {
    edit(file, stage, |table| {
        table.insert("shadow", toml_edit::value(crate::config::env::literal(plugin)));
        Ok(plugin.to_string())
    })
}

/// Puts `text` (the file as it was before an edit) back into `file`.
pub fn restore(file: &Path, text: &str) -> anyhow::Result<()> {
    replace(file, text)
}

/// Removes transform `stage`'s shadow from `file`; returns its candidate.
pub fn stop(file: &Path, stage: usize) -> anyhow::Result<String> {
    edit(file, stage, |table| match table.remove("shadow") {
        Some(Item::Value(Value::String(path))) => Ok(path.value().clone()),
        Some(other) => Ok(candidate_of(&other).unwrap_or_default()),
        None => bail!("it has no shadow"),
    })
}

fn candidate_of(shadow: &Item) -> Option<String> {
    match shadow {
        Item::Value(Value::InlineTable(t)) => t.get("plugin").and_then(Value::as_str).map(str::to_string),
        Item::Table(t) => t.get("plugin").and_then(Item::as_str).map(str::to_string),
        _ => None,
    }
}

/// Applies `change` to transform `stage` of `file` and replaces the file.
fn edit(
    file: &Path,
    stage: usize,
    change: impl FnOnce(&mut Table) -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let (new_text, plugin) =
        edit_text(&text, stage, change).with_context(|| format!("{}: transform {}", file.display(), stage + 1))?;
    replace(file, &new_text)?;
    Ok(plugin)
}

/// Replaces the text of `file` (of the file a symlink points to, which
/// stays a link): written beside it, then renamed over it, so that a reader
/// sees the old file or the new one, never half of it.
fn replace(file: &Path, new_text: &str) -> anyhow::Result<()> {
    let file = &std::fs::canonicalize(file).with_context(|| format!("cannot resolve {}", file.display()))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write beside {} (is its folder writable?)", file.display()))?;
    std::io::Write::write_all(&mut tmp, new_text.as_bytes())?;
    if let Ok(meta) = std::fs::metadata(file) {
        let _ = std::fs::set_permissions(tmp.path(), meta.permissions());
    }
    tmp.persist(file).with_context(|| format!("cannot replace {}", file.display()))?;
    Ok(())
}

/// [`promote`] on the file's text: the new text and the new plugin path.
pub fn promote_text(text: &str, stage: usize) -> anyhow::Result<(String, String)> {
    edit_text(text, stage, promote_table)
}

/// `change` applied to transform `stage` of the text of a pipeline file.
fn edit_text(
    text: &str,
    stage: usize,
    change: impl FnOnce(&mut Table) -> anyhow::Result<String>,
) -> anyhow::Result<(String, String)> {
    let mut doc: DocumentMut = text.parse().context("not a TOML document")?;
    let plugin = match doc.get_mut("transforms") {
        Some(Item::ArrayOfTables(tables)) => match tables.get_mut(stage) {
            Some(table) => change(table)?,
            None => bail!("there is no such transform"),
        },
        Some(Item::Value(Value::Array(array))) => match array.get_mut(stage) {
            Some(Value::InlineTable(inline)) => {
                let mut table = inline.clone().into_table();
                let plugin = change(&mut table)?;
                *inline = table.into_inline_table();
                plugin
            }
            _ => bail!("there is no such transform"),
        },
        _ => bail!("the file has no transforms"),
    };
    Ok((doc.to_string(), plugin))
}

fn promote_table(table: &mut Table) -> anyhow::Result<String> {
    let (plugin, config) = match table.remove("shadow") {
        None => bail!("it has no shadow to promote"),
        Some(Item::Value(Value::String(path))) => (path.value().clone(), None),
        Some(Item::Value(Value::InlineTable(shadow))) => {
            let plugin = shadow.get("plugin").and_then(Value::as_str).map(str::to_string);
            (plugin.context("its shadow has no plugin")?, shadow.get("config").cloned().map(Item::Value))
        }
        Some(Item::Table(shadow)) => {
            let plugin = shadow.get("plugin").and_then(Item::as_str).map(str::to_string);
            (plugin.context("its shadow has no plugin")?, shadow.get("config").cloned())
        }
        Some(_) => bail!("its shadow is neither a path nor a table"),
    };
    match table.get_mut("plugin") {
        Some(item) => *item = toml_edit::value(plugin.as_str()),
        None => bail!("it has no plugin"),
    }
    if let Some(config) = config {
        table.insert("config", config);
    }
    Ok(plugin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_candidate_becomes_the_plugin_and_the_rest_of_the_file_stays() {
        let text = "# trades\n[source]\ntype = \"kafka\" # the feed\n\n[[transforms]]\nplugin = \"live.wasm\"\nshadow = \"round.wasm\"\n\n[[transforms]]\nplugin = \"router.wasm\"\nconfig = { a = \"1\" }\n[transforms.shadow]\nplugin = \"router2.wasm\"\nconfig = { a = \"2\" }\nsample = 0.5\n";
        let (first, plugin) = promote_text(text, 0).unwrap();
        assert_eq!(plugin, "round.wasm");
        assert!(first.starts_with("# trades\n[source]\ntype = \"kafka\" # the feed\n"), "{first}");
        assert!(first.contains("[[transforms]]\nplugin = \"round.wasm\"\n\n[[transforms]]"), "{first}");
        let (second, plugin) = promote_text(text, 1).unwrap();
        assert_eq!(plugin, "router2.wasm");
        let doc: toml::Table = toml::from_str(&second).unwrap();
        let stage = &doc["transforms"].as_array().unwrap()[1];
        assert_eq!(stage["plugin"].as_str(), Some("router2.wasm"));
        assert_eq!(stage["config"]["a"].as_str(), Some("2"));
        assert!(stage.get("shadow").is_none());

        let inline = "transforms = [{ plugin = \"a.wasm\", shadow = { plugin = \"b.wasm\" } }]\n";
        let (text, _) = promote_text(inline, 0).unwrap();
        assert_eq!(text, "transforms = [{ plugin = \"b.wasm\" }]\n");

        let error = |text: &str, stage| format!("{:#}", promote_text(text, stage).unwrap_err());
        assert!(error("[[transforms]]\nplugin = \"a.wasm\"\n", 0).contains("no shadow"));
        assert!(error("[[transforms]]\nplugin = \"a.wasm\"\n", 3).contains("no such transform"));
        assert!(error("name = \"x\"\n", 0).contains("no transforms"));
    }

    #[test]
    fn a_shadow_is_started_and_stopped_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        let text = "[[transforms]]\nplugin = \"a.wasm\" # live\n";
        std::fs::write(&file, text).unwrap();
        assert_eq!(start(&file, 0, "/x/b.wasm").unwrap(), "/x/b.wasm");
        let started = std::fs::read_to_string(&file).unwrap();
        assert_eq!(started, "[[transforms]]\nplugin = \"a.wasm\" # live\nshadow = \"/x/b.wasm\"\n");
        assert_eq!(stop(&file, 0).unwrap(), "/x/b.wasm");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
        assert!(format!("{:#}", stop(&file, 0).unwrap_err()).contains("no shadow"));
        assert!(start(&file, 1, "b.wasm").is_err());
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "[[transforms]]\nplugin = \"a.wasm\"\nshadow = \"b.wasm\"\n").unwrap();
        assert_eq!(promote(&file, 0).unwrap(), "b.wasm");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "[[transforms]]\nplugin = \"b.wasm\"\n");
        assert!(promote(&file, 0).is_err(), "nothing left to promote");
    }
}
