//! `${VAR}` and `${VAR:-default}` expansion in pipeline files, so that secrets
//! and addresses come from the environment. `$` not followed by `{` is kept.

/// An unset variable without a default, at 1-based `line` and `column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingVar {
    pub name: String,
    pub line: usize,
    pub column: usize,
}

/// Expands every `${NAME}` / `${NAME:-default}` in `text`, line by line so
/// that line numbers of later errors still match the file. Reports every
/// unset variable that has no default.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, Vec<MissingVar>> {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            let Some(len) = rest[start..].find('}') else { break };
            out.push_str(&rest[..start]);
            let inner = &rest[start + 2..start + len];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            match lookup(name).filter(|v| !v.is_empty()).or_else(|| default.map(str::to_string)) {
                Some(value) => out.push_str(&value),
                None => missing.push(MissingVar {
                    name: name.to_string(),
                    line: index + 1,
                    column: line.len() - rest.len() + start + 1,
                }),
            }
            rest = &rest[start + len + 1..];
        }
        out.push_str(rest);
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "SET").then(|| "value".to_string())
    }

    #[test]
    fn expands_set_variables_and_defaults() {
        assert_eq!(expand("a = \"${SET}\"\nb = \"${UNSET:-127.0.0.1:9092}\"\nc = \"$HOME ${SET:-x}\"\n", env).unwrap(),
            "a = \"value\"\nb = \"127.0.0.1:9092\"\nc = \"$HOME value\"\n");
    }

    #[test]
    fn reports_every_missing_variable_with_its_place() {
        let err = expand("x = 1\ny = \"${A}\" # ${B}\n", env).unwrap_err();
        assert_eq!(err, vec![
            MissingVar { name: "A".into(), line: 2, column: 6 },
            MissingVar { name: "B".into(), line: 2, column: 14 },
        ]);
    }
}
