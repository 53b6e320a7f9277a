//! {{name}}: a Sluice transform plugin.
//!
//! Adds `"label": <config label>` to every JSON object it receives; anything
//! that is not a JSON object goes to the pipeline's dead letters.
//! Config: `label` (default "{{name}}").

use serde_json::{Map, Value};
use sluice_plugin::{export_transform, Config, Output, Record, Transform};

pub struct Plugin {
    label: String,
}

impl Transform for Plugin {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&["label"])?;
        let label = config.get("label").unwrap_or("{{name}}").to_string();
        Ok(Plugin { label })
    }

    fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
        let mut object: Map<String, Value> =
            serde_json::from_slice(&record.value).map_err(|e| format!("expected a JSON object: {e}"))?;
        object.insert("label".into(), Value::String(self.label.clone()));
        let value = serde_json::to_vec(&object).map_err(|e| e.to_string())?;
        let mut output = Output::new(value);
        output.key = record.key;
        output.headers = record.headers;
        output.timestamp = record.timestamp;
        Ok(vec![output])
    }
}

export_transform!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_json_objects() {
        let config: Config = [("label", "demo")].into_iter().collect();
        let mut plugin = Plugin::init(&config).unwrap();
        let out = plugin.process(Record::from_value(r#"{"price":1.5}"#)).unwrap();
        let value: Value = serde_json::from_slice(&out[0].value).unwrap();
        assert_eq!(value, serde_json::json!({"price": 1.5, "label": "demo"}));
    }

    #[test]
    fn rejects_what_is_not_an_object() {
        let mut plugin = Plugin::init(&Config::default()).unwrap();
        let error = plugin.process(Record::from_value("[1]")).unwrap_err();
        assert!(error.starts_with("expected a JSON object"), "{error}");
    }

    #[test]
    fn rejects_unknown_config() {
        assert!(Plugin::init(&[("lable", "x")].into_iter().collect()).is_err());
    }
}
