// {{name}}: a Sluice transform plugin.
//
// Adds `"label": <config label>` to every JSON object it receives; anything
// that is not a JSON object goes to the pipeline's dead letters.
// Config: `label` (default "{{name}}").

export default class Plugin {
  constructor(config) {
    config.rejectUnknown("label");
    this.label = config.get("label") ?? "{{name}}";
  }

  process(record) {
    let value;
    try {
      value = record.json();
    } catch (error) {
      throw new Error(`expected a JSON object: ${error.message}`);
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new Error(`expected a JSON object, got ${JSON.stringify(value)}`);
    }
    value.label = this.label;
    return { value: JSON.stringify(value), key: record.key, headers: record.headers, timestamp: record.timestamp };
  }
}
