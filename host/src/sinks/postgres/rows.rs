//! Output JSON → typed column values, per the sink's column list.

use crate::config::{ColumnConfig, ColumnType};
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_postgres::types::{ToSql, Type};

/// One typed column value; `None` is SQL NULL.
pub type Cell = Box<dyn ToSql + Sync + Send>;

/// The PostgreSQL wire type of a column.
pub fn pg_type(kind: ColumnType) -> Type {
    match kind {
        ColumnType::Text => Type::TEXT,
        ColumnType::Double => Type::FLOAT8,
        ColumnType::BigInt => Type::INT8,
        ColumnType::Boolean => Type::BOOL,
        ColumnType::Timestamptz => Type::TIMESTAMPTZ,
        ColumnType::TextArray => Type::TEXT_ARRAY,
        ColumnType::Jsonb => Type::JSONB,
    }
}

/// Converts one output value (a JSON object) into a row, or explains why it cannot.
pub fn to_row(value: &[u8], columns: &[ColumnConfig]) -> Result<Vec<Cell>, String> {
    let object: serde_json::Map<String, Value> =
        serde_json::from_slice(value).map_err(|e| format!("postgres sink: output is not a JSON object: {e}"))?;
    columns
        .iter()
        .map(|c| {
            let field = c.field.as_deref().unwrap_or(&c.name);
            let v = object.get(field).filter(|v| !v.is_null());
            cell(v, c.kind).map_err(|expected| {
                format!("postgres sink: column {:?} needs {expected} from field {field:?}, got {}", c.name, v.map_or("nothing".into(), |v| v.to_string()))
            })
        })
        .collect()
}

fn cell(v: Option<&Value>, kind: ColumnType) -> Result<Cell, &'static str> {
    Ok(match kind {
        ColumnType::Text => Box::new(v.map(|v| v.as_str().map(str::to_string).ok_or("a string")).transpose()?),
        ColumnType::Double => Box::new(v.map(|v| v.as_f64().ok_or("a number")).transpose()?),
        ColumnType::BigInt => Box::new(v.map(|v| v.as_i64().ok_or("an integer")).transpose()?),
        ColumnType::Boolean => Box::new(v.map(|v| v.as_bool().ok_or("a boolean")).transpose()?),
        ColumnType::Timestamptz => Box::new(v.map(|v| v.as_i64().and_then(millis_to_time).ok_or("integer milliseconds since 1970")).transpose()?),
        ColumnType::TextArray => Box::new(
            v.map(|v| {
                v.as_array()
                    .and_then(|items| items.iter().map(|i| i.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
                    .ok_or("an array of strings")
            })
            .transpose()?,
        ),
        ColumnType::Jsonb => Box::new(v.cloned()),
    })
}

fn millis_to_time(ms: i64) -> Option<SystemTime> {
    if ms >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_millis(ms as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_millis(ms.unsigned_abs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, kind: ColumnType, field: Option<&str>) -> ColumnConfig {
        ColumnConfig { name: name.into(), kind, field: field.map(str::to_string) }
    }

    #[test]
    fn converts_each_type_and_reports_mismatches() {
        let cols = vec![
            col("symbol", ColumnType::Text, None),
            col("price", ColumnType::Double, None),
            col("traded_at", ColumnType::Timestamptz, Some("ts")),
            col("conditions", ColumnType::TextArray, None),
            col("n", ColumnType::BigInt, None),
        ];
        let row = to_row(br#"{"symbol":"A","price":1,"ts":5,"conditions":[]}"#, &cols).unwrap();
        assert_eq!(row.len(), 5);
        let err = to_row(br#"{"symbol":"A","price":"x","ts":5}"#, &cols).err().unwrap();
        assert_eq!(err, "postgres sink: column \"price\" needs a number from field \"price\", got \"x\"");
        let err = to_row(br#"[1]"#, &cols).err().unwrap();
        assert!(err.starts_with("postgres sink: output is not a JSON object"), "{err}");
    }
}
