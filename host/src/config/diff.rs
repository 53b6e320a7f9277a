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
    /// Pipelines whose only change is their transforms (a plugin file or a
    /// plugin's config): the new chain replaces the old one between two
    /// batches, without restarting the source or the sinks.
    pub swap: Vec<Pipeline>,
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
            Some(current) if Pipeline { transforms: w.transforms.clone(), ..current.clone() } == *w => {
                d.swap.push(w.clone())
            }
            Some(_) => {
                d.stop.push(w.name.clone());
                d.start.push(w.clone());
            }
            None => d.start.push(w.clone()),
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pipeline `name`, reading `topic`.
    fn pipeline(name: &str, topic: &str) -> Pipeline {
        let text = format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"b\"\ntopics = [\"{topic}\"]\n[sinks.out]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n"
        );
        crate::config::parse_pipeline(&text, std::path::Path::new(&format!("/nonexistent/{name}.toml")), None).unwrap()
    }

    #[test]
    fn starting_is_the_diff_from_nothing() {
        let d = diff(&BTreeMap::new(), &[pipeline("a", "x"), pipeline("b", "y")]);
        assert_eq!(d.start.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(d.stop.is_empty() && d.keep.is_empty());
    }

    #[test]
    fn a_reload_stops_removed_restarts_changed_and_keeps_the_rest() {
        let running: BTreeMap<String, Pipeline> =
            [pipeline("keep", "x"), pipeline("change", "x"), pipeline("gone", "x")]
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect();
        let mut swapped = pipeline("keep", "x");
        swapped.transforms.push(crate::config::TransformSpec {
            path: "p.wasm".into(),
            config: vec![],
            limits: Default::default(),
            grants: Default::default(),
            hash: "abc".into(),
            shadow: None,
            event_time: None,
        });
        let d = diff(&running, &[pipeline("keep", "x"), pipeline("change", "other"), pipeline("new", "x")]);
        assert_eq!(d.keep, ["keep"]);
        let s = diff(&running, &[swapped, pipeline("change", "x"), pipeline("gone", "x")]);
        assert_eq!(s.swap.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["keep"]);
        assert_eq!(s.keep, ["change", "gone"]);
        assert!(s.stop.is_empty() && s.start.is_empty());
        assert_eq!(d.stop, ["gone", "change"]);
        assert_eq!(d.start.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["change", "new"]);
    }
}
