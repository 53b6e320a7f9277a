//! What changes between the running pipeline set and the wanted one. Starting
//! is the diff from nothing; a reload is the diff from what runs.

use super::Pipeline;
use std::collections::BTreeMap;

#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    /// Pipelines to stop: removed, or changed (they are then also in `start`).
    pub stop: Vec<String>,
    /// Pipelines to start: new, or changed.
    pub start: Vec<Pipeline>,
    /// Pipelines left as they are.
    pub keep: Vec<String>,
}

pub fn diff(running: &BTreeMap<String, Pipeline>, wanted: &[Pipeline]) -> Diff {
    let mut d = Diff::default();
    for name in running.keys() {
        if !wanted.iter().any(|w| &w.name == name) {
            d.stop.push(name.clone());
        }
    }
    for w in wanted {
        match running.get(&w.name) {
            Some(current) if current == w => d.keep.push(w.name.clone()),
            Some(_) => {
                d.stop.push(w.name.clone());
                d.start.push(w.clone());
            }
            None => d.start.push(w.clone()),
        }
    }
    d
}
