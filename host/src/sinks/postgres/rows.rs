//! Output JSON → typed column values, per the sink's column list, in one
//! pass and without a generic JSON value: the object's keys are matched
//! against the columns' fields, each wanted value is taken as the raw JSON
//! text it is (borrowed from the output), and converted straight into the
//! column's type; strings without escapes stay borrowed. A batch's cells go
//! into one flat vector ([`Rows`]).
//!
//! A value is converted only if PostgreSQL will store it as it is: text,
//! `text[]` and `jsonb` without NUL (`\u0000`, which PostgreSQL refuses) or
//! lone UTF-16 surrogates, integers within `bigint`, timestamps within
//! PostgreSQL's range (4713 BC to 294276 AD) with no wrap anywhere in the
//! conversion. Anything else is that output's rejection, naming the column,
//! the field and an excerpt of the value, so one bad value never fails the
//! batch it is in.

use super::{ColumnConfig, ColumnType};
use bytes::{BufMut, BytesMut};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

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

/// A string as JSON had it: borrowed when it had no escapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Str<'a>(pub Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Str<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl ToSql for Str<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        self.0.as_ref().to_sql(ty, out)
    }
    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty)
    }
    to_sql_checked!();
}

/// One typed column value, borrowing from the output it came from.
#[derive(Debug, Clone)]
pub enum Cell<'a> {
    Null,
    Text(Str<'a>),
    Double(f64),
    BigInt(i64),
    Boolean(bool),
    /// Microseconds since 2000-01-01 00:00 UTC (PostgreSQL's own epoch and
    /// binary form), within PostgreSQL's range.
    Timestamptz(i64),
    TextArray(Vec<Str<'a>>),
    Jsonb(&'a RawValue),
}

impl ToSql for Cell<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Text(s) => s.to_sql(ty, out),
            Cell::Double(v) => v.to_sql(ty, out),
            Cell::BigInt(v) => v.to_sql(ty, out),
            Cell::Boolean(v) => v.to_sql(ty, out),
            Cell::Timestamptz(micros) => {
                out.put_i64(*micros);
                Ok(IsNull::No)
            }
            Cell::TextArray(v) => v.to_sql(ty, out),
            Cell::Jsonb(raw) => tokio_postgres::types::Json(raw).to_sql(ty, out),
        }
    }
    fn accepts(_: &Type) -> bool {
        // Each cell was made for its column's type (`pg_type`).
        true
    }
    to_sql_checked!();
}

/// The rows of one batch: `width` cells per row, in one vector.
pub struct Rows<'a> {
    cells: Vec<Cell<'a>>,
    width: usize,
}

impl<'a> Rows<'a> {
    pub fn with_capacity(rows: usize, width: usize) -> Self {
        Rows { cells: Vec::with_capacity(rows * width), width }
    }

    pub fn len(&self) -> usize {
        self.cells.len().checked_div(self.width).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Row `i`'s cells.
    pub fn row(&self, i: usize) -> &[Cell<'a>] {
        &self.cells[i * self.width..(i + 1) * self.width]
    }

    /// Converts `value` (a JSON object) into a row for `columns` and adds it,
    /// or explains why it cannot.
    pub fn push(&mut self, value: &'a [u8], columns: &[ColumnConfig]) -> Result<(), String> {
        let start = self.cells.len();
        self.cells.resize(start + columns.len(), Cell::Null);
        let seed = RowSeed { columns, cells: &mut self.cells[start..] };
        // One UTF-8 check for the whole value (JSON is UTF-8): serde_json
        // then skips it for every key and string.
        let parsed = std::str::from_utf8(value).map_err(|e| e.to_string()).and_then(|text| {
            let mut de = serde_json::Deserializer::from_str(text);
            seed.deserialize(&mut de).and_then(|r| de.end().map(|()| r)).map_err(|e| e.to_string())
        });
        match parsed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => {
                self.cells.truncate(start);
                Err(reason)
            }
            Err(e) => {
                self.cells.truncate(start);
                Err(format!("postgres sink: output is not a JSON object: {e}"))
            }
        }
    }
}

/// Converts one output value into a row (for tests and single rows).
pub fn to_row<'a>(value: &'a [u8], columns: &[ColumnConfig]) -> Result<Vec<Cell<'a>>, String> {
    let mut rows = Rows::with_capacity(1, columns.len());
    rows.push(value, columns)?;
    Ok(rows.cells)
}

/// Fills `cells` from one JSON object; the inner `Err` is a column whose
/// value has the wrong type.
struct RowSeed<'c, 'a> {
    columns: &'c [ColumnConfig],
    cells: &'c mut [Cell<'a>],
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for RowSeed<'_, 'a> {
    type Value = Result<(), String>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for RowSeed<'_, 'a> {
    type Value = Result<(), String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut failed = None;
        while let Some(key) = map.next_key::<Str<'de>>()? {
            // The columns this field fills (no vector per field: one row has few columns).
            let columns = self.columns;
            let wanted = |i: &usize| columns[*i].field.as_deref().unwrap_or(&columns[*i].name) == key.0;
            let Some(first) = (0..columns.len()).position(|i| wanted(&i)) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let raw: &'de RawValue = map.next_value()?;
            for i in (first..columns.len()).filter(wanted) {
                match cell(raw, self.columns[i].kind) {
                    Ok(c) => self.cells[i] = c,
                    Err(expected) => {
                        failed.get_or_insert_with(|| {
                            let c = &self.columns[i];
                            let field = c.field.as_deref().unwrap_or(&c.name);
                            format!(
                                "postgres sink: column {:?} needs {expected} from field {field:?}, got {}",
                                c.name,
                                excerpt(raw.get(), 120)
                            )
                        });
                    }
                }
            }
        }
        Ok(failed.map_or(Ok(()), Err))
    }
}

/// The JSON text `raw` as a value of `kind` (`null`: NULL), or what was expected.
fn cell(raw: &RawValue, kind: ColumnType) -> Result<Cell<'_>, &'static str> {
    let text = raw.get();
    if text == "null" {
        return Ok(Cell::Null);
    }
    let number = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
    Ok(match kind {
        ColumnType::Text => Cell::Text(string(text)?),
        ColumnType::Double if number => {
            Cell::Double(text.parse::<f64>().ok().filter(|v| v.is_finite()).ok_or("a number within double precision")?)
        }
        ColumnType::Double => return Err("a number"),
        ColumnType::BigInt if number => Cell::BigInt(
            text.parse().map_err(|_| "an integer within bigint (-9223372036854775808 to 9223372036854775807)")?,
        ),
        ColumnType::BigInt => return Err("an integer"),
        ColumnType::Boolean => match text {
            "true" => Cell::Boolean(true),
            "false" => Cell::Boolean(false),
            _ => return Err("a boolean"),
        },
        ColumnType::Timestamptz => {
            let ms: i64 = if number {
                text.parse().map_err(|_| "integer milliseconds since 1970")?
            } else {
                return Err("integer milliseconds since 1970");
            };
            Cell::Timestamptz(
                millis_to_pg_micros(ms)
                    .ok_or("milliseconds since 1970 within PostgreSQL's timestamp range (4713 BC to 294276 AD)")?,
            )
        }
        ColumnType::TextArray => {
            let items = serde_json::from_str::<Vec<Str<'_>>>(text)
                .map_err(|_| "an array of strings (without lone UTF-16 surrogates)")?;
            // Only a decoded string (it had escapes) can hold a NUL.
            if items.iter().any(|s| matches!(&s.0, Cow::Owned(o) if o.contains('\0'))) {
                return Err("strings without NUL (\\u0000, which PostgreSQL refuses in text)");
            }
            Cell::TextArray(items)
        }
        ColumnType::Jsonb => {
            // Escapes are rare: only a value with one is decoded and looked through.
            if text.contains("\\u") {
                let value: serde_json::Value = serde_json::from_str(text)
                    .map_err(|_| "JSON without lone UTF-16 surrogates (PostgreSQL refuses them in jsonb)")?;
                if has_nul(&value) {
                    return Err("JSON without NUL (\\u0000, which PostgreSQL refuses in jsonb)");
                }
            }
            Cell::Jsonb(raw)
        }
    })
}

/// Whether a NUL character stands in any string or key of `value`.
fn has_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// A JSON string's text, borrowed when it has no escapes, if PostgreSQL can
/// store it as text.
fn string(text: &str) -> Result<Str<'_>, &'static str> {
    let inner = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).ok_or("a string")?;
    if !inner.contains('\\') {
        // JSON has no raw control characters in strings: no NUL here.
        return Ok(Str(Cow::Borrowed(inner)));
    }
    let decoded = serde_json::from_str::<String>(text).map_err(|_| "a string without lone UTF-16 surrogates")?;
    if decoded.contains('\0') {
        return Err("a string without NUL (\\u0000, which PostgreSQL refuses in text)");
    }
    Ok(Str(Cow::Owned(decoded)))
}

/// Milliseconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_MS: i64 = 946_684_800_000;
/// PostgreSQL's first timestamp, 4714-11-24 00:00 UTC BC (Julian day 0), in
/// milliseconds since 1970.
pub const PG_MIN_MS: i64 = -210_866_803_200_000;
/// The first timestamp past PostgreSQL's range, 294277-01-01 00:00 UTC, in
/// milliseconds since 1970.
pub const PG_END_MS: i64 = 9_224_318_016_000_000;

/// Milliseconds since 1970 as PostgreSQL's microseconds since 2000, when
/// PostgreSQL's timestamps reach that far (none of the arithmetic can wrap).
pub fn millis_to_pg_micros(ms: i64) -> Option<i64> {
    (PG_MIN_MS..PG_END_MS).contains(&ms).then(|| (ms - PG_EPOCH_MS) * 1000)
}

/// At most `max` bytes of `text`, cut at a character, with `…` when cut.
pub fn excerpt(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &text[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn col(name: &str, kind: ColumnType, field: Option<&str>) -> ColumnConfig {
        ColumnConfig { name: name.into(), kind, field: field.map(str::to_string), merge: Default::default(), by: None }
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
        let err = to_row(br#"{"symbol":"A"} trailing"#, &cols).err().unwrap();
        assert!(err.starts_with("postgres sink: output is not a JSON object"), "{err}");
        // Not UTF-8 (in a field no column takes, too): not JSON; the rows after it are unaffected.
        let mut rows = Rows::with_capacity(2, cols.len());
        let err = rows.push(b"{\"other\":\"\xff\"}", &cols).err().unwrap();
        assert!(err.starts_with("postgres sink: output is not a JSON object: invalid utf-8"), "{err}");
        rows.push(br#"{"symbol":"B","n":2}"#, &cols).unwrap();
        assert_eq!((rows.len(), format!("{:?}", rows.row(0)[4])), (1, "BigInt(2)".to_string()));
    }

    /// What the sink wrote before this module: a generic JSON value per row.
    fn via_value(value: &[u8], columns: &[ColumnConfig]) -> Result<Vec<String>, ()> {
        let object: serde_json::Map<String, Value> = serde_json::from_slice(value).map_err(|_| ())?;
        columns
            .iter()
            .map(|c| {
                let v = object.get(c.field.as_deref().unwrap_or(&c.name)).filter(|v| !v.is_null());
                Ok(match (c.kind, v) {
                    (_, None) => "NULL".to_string(),
                    (ColumnType::Text, Some(v)) => v.as_str().ok_or(())?.to_string(),
                    (ColumnType::Double, Some(v)) => v.as_f64().ok_or(())?.to_string(),
                    (ColumnType::BigInt, Some(v)) => v.as_i64().ok_or(())?.to_string(),
                    (ColumnType::Boolean, Some(v)) => v.as_bool().ok_or(())?.to_string(),
                    (ColumnType::Timestamptz, Some(v)) => {
                        format!("{:?}", v.as_i64().and_then(millis_to_pg_micros).ok_or(())?)
                    }
                    (ColumnType::TextArray, Some(v)) => v
                        .as_array()
                        .ok_or(())?
                        .iter()
                        .map(|i| i.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or(())?
                        .join("|"),
                    (ColumnType::Jsonb, Some(v)) => v.to_string(),
                })
            })
            .collect()
    }

    fn shown(cell: &Cell) -> String {
        match cell {
            Cell::Null => "NULL".into(),
            Cell::Text(s) => s.0.to_string(),
            Cell::Double(v) => v.to_string(),
            Cell::BigInt(v) => v.to_string(),
            Cell::Boolean(v) => v.to_string(),
            Cell::Timestamptz(v) => format!("{v:?}"),
            Cell::TextArray(v) => v.iter().map(|s| s.0.as_ref()).collect::<Vec<_>>().join("|"),
            Cell::Jsonb(raw) => serde_json::from_str::<Value>(raw.get()).unwrap().to_string(),
        }
    }

    #[test]
    fn gets_the_same_rows_as_a_generic_json_value() {
        let cols = vec![
            col("symbol", ColumnType::Text, None),
            col("price", ColumnType::Double, None),
            col("n", ColumnType::BigInt, None),
            col("ok", ColumnType::Boolean, None),
            col("ts", ColumnType::Timestamptz, None),
            col("c", ColumnType::TextArray, None),
            col("doc", ColumnType::Jsonb, None),
            col("again", ColumnType::Text, Some("symbol")),
        ];
        for value in [
            r#"{"symbol":"BINANCE:BTCUSDT","price":7296.89,"n":3,"ok":true,"ts":1575526691134,"c":["1","12"],"doc":{"a":[1,2]}}"#,
            r#"{"symbol":"caf\u00e9 \"q\"","price":189,"n":-9223372036854775808,"ts":-5,"c":["\n"],"doc":null}"#,
            r#"{"symbol":null,"price":null}"#,
            r#"{}"#,
            r#"{"n":18446744073709551615}"#,
            r#"{"n":1.5}"#,
            r#"{"price":1e400}"#,
            r#"{"price":1e308,"extra":{"deep":[{"x":"\ud83d\ude00"}]},"symbol":"later"}"#,
            r#"{"symbol":"a","symbol":"b"}"#,
            r#"{"c":[1]}"#,
            r#"{"ok":"true"}"#,
            r#"{"ts":1.5}"#,
        ] {
            let new = to_row(value.as_bytes(), &cols).map(|r| r.iter().map(shown).collect::<Vec<_>>()).map_err(|_| ());
            assert_eq!(new, via_value(value.as_bytes(), &cols), "{value}");
        }
    }

    #[test]
    fn strings_without_escapes_are_borrowed() {
        let cols = vec![col("s", ColumnType::Text, None), col("c", ColumnType::TextArray, None)];
        let row = to_row(br#"{"s":"plain","c":["1","12"]}"#, &cols).unwrap();
        assert!(matches!(&row[0], Cell::Text(Str(Cow::Borrowed("plain")))));
        assert!(matches!(&row[1], Cell::TextArray(v) if v.iter().all(|s| matches!(s.0, Cow::Borrowed(_)))));
    }
}
