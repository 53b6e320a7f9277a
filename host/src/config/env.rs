//! `${VAR}`, `${VAR:-default}` and `${file:/path}` expansion in pipeline
//! files, so that secrets and addresses come from the environment or from
//! mounted secret files (Docker, Kubernetes). `$` not followed by `{` is kept,
//! and so is a `${…}` in a comment: only values are expanded, so a
//! commented-out line reads no file and needs no variable. `$${` is a
//! literal `${` (what Sluice writes for a value given to it, such as a
//! shadow's path from the admin API: it is never expanded).
//!
//! A value is written into the TOML text as the place it stands in needs: in
//! a `"…"` string its quotes and backslashes are escaped, so a password with
//! a `"` is still that password. Values read from files, and those of
//! variables whose names say they hold secrets (`…PASSWORD`, `…SECRET`,
//! `…TOKEN`), are remembered by [`crate::secrets`] and never shown.

use std::path::PathBuf;

/// An expansion that failed, at 1-based `line` and `column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// The expanded text and the secret files it read (a reload follows them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    pub text: String,
    pub files: Vec<PathBuf>,
}

/// Where in the TOML text a `${…}` stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Bare,
    /// `"…"` or `"""…"""`.
    Basic {
        multiline: bool,
    },
    /// `'…'` or `'''…'''`.
    Literal {
        multiline: bool,
    },
    /// After a `#` outside a string, to the end of the line.
    Comment,
}

/// Moves `place` over `text` (which contains no `${`).
fn advance(mut place: Place, text: &str) -> Place {
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        let triple = |quote: &str| text[i..].starts_with(quote);
        match (place, c) {
            (Place::Bare, '#') => place = Place::Comment,
            (Place::Bare, '"') if triple("\"\"\"") => {
                place = Place::Basic { multiline: true };
                chars.nth(1);
            }
            (Place::Bare, '\'') if triple("'''") => {
                place = Place::Literal { multiline: true };
                chars.nth(1);
            }
            (Place::Bare, '"') => place = Place::Basic { multiline: false },
            (Place::Bare, '\'') => place = Place::Literal { multiline: false },
            (Place::Basic { .. }, '\\') => {
                chars.next(); // the escaped character
            }
            (Place::Basic { multiline: true }, '"') if triple("\"\"\"") => {
                place = Place::Bare;
                chars.nth(1);
            }
            (Place::Basic { multiline: false }, '"') => place = Place::Bare,
            (Place::Literal { multiline: true }, '\'') if triple("'''") => {
                place = Place::Bare;
                chars.nth(1);
            }
            (Place::Literal { multiline: false }, '\'') => place = Place::Bare,
            _ => {}
        }
    }
    if text.ends_with('\n') {
        // Comments and single-line strings end with their line (an unclosed
        // string is TOML's error to report).
        if let Place::Comment | Place::Basic { multiline: false } | Place::Literal { multiline: false } = place {
            place = Place::Bare;
        }
    }
    place
}

/// `value` written for `place`, or why it cannot be.
fn encode(value: &str, place: Place) -> Result<String, String> {
    match place {
        Place::Bare | Place::Comment => Ok(value.to_string()),
        Place::Basic { .. } => {
            let mut out = String::with_capacity(value.len());
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    '\r' => out.push_str("\\r"),
                    c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                    c => out.push(c),
                }
            }
            Ok(out)
        }
        Place::Literal { multiline } => {
            if value.contains('\'') || (!multiline && value.contains('\n')) {
                Err("its value contains a quote or a line break, which a '…' string cannot hold: write \"…\" instead"
                    .into())
            } else {
                Ok(value.to_string())
            }
        }
    }
}

/// The most a secret file may hold: a secret, not a data set.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;

/// `text` with every `${` written as `$${`: a value Sluice writes into a
/// pipeline file that must stay as given (never expanded).
pub fn literal(text: &str) -> String {
    text.replace("${", "$${")
}

/// Reads a secret file: its content without one trailing line break. Only
/// a regular file is read, and at most [`MAX_SECRET_FILE_BYTES`].
fn read_secret_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read secret file {path}: {e}");
    // Looked at before it is opened: opening a FIFO would wait for a writer.
    if !std::fs::metadata(path).map_err(cannot)?.is_file() {
        return Err(format!("secret file {path} is not a regular file"));
    }
    let file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!("secret file {path} is not a regular file"));
    }
    if meta.len() > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "secret file {path} holds {} bytes, more than a secret's {MAX_SECRET_FILE_BYTES}",
            meta.len()
        ));
    }
    let mut raw = String::new();
    file.take(MAX_SECRET_FILE_BYTES + 1).read_to_string(&mut raw).map_err(cannot)?;
    if raw.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!("secret file {path} holds more than a secret's {MAX_SECRET_FILE_BYTES} bytes"));
    }
    let value = raw.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&raw);
    if value.is_empty() {
        return Err(format!("secret file {path} is empty"));
    }
    Ok(value.to_string())
}

/// Expands every `${NAME}`, `${NAME:-default}` and `${file:/path}` in
/// `text`, line by line so that line numbers of later errors still match the
/// file. Reports every unset variable without a default and every unreadable
/// or empty secret file.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Expanded, Vec<ExpandError>> {
    let mut out = String::with_capacity(text.len());
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let mut place = Place::Bare;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            if rest[..start].ends_with('$') {
                // `$${`: a literal `${`, expanded never.
                out.push_str(&rest[..start - 1]);
                out.push_str("${");
                place = advance(place, &rest[..start]);
                rest = &rest[start + 2..];
                continue;
            }
            let Some(len) = rest[start..].find('}') else { break };
            out.push_str(&rest[..start]);
            place = advance(place, &rest[..start]);
            if place == Place::Comment {
                out.push_str(&rest[start..start + len + 1]);
                rest = &rest[start + len + 1..];
                continue;
            }
            let inner = &rest[start + 2..start + len];
            let column = line.len() - rest.len() + start + 1;
            let mut fail = |message: String| errors.push(ExpandError { line: index + 1, column, message });
            let value = if let Some(path) = inner.strip_prefix("file:") {
                files.push(PathBuf::from(path));
                read_secret_file(path).inspect(|v| crate::secrets::register(v)).map_err(&mut fail).ok()
            } else {
                let (name, default) = match inner.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (inner, None),
                };
                match lookup(name).filter(|v| !v.is_empty()) {
                    Some(value) => {
                        if crate::secrets::is_secret_var(name) {
                            crate::secrets::register(&value);
                        }
                        Some(value)
                    }
                    None if default.is_some() => default.map(str::to_string),
                    None => {
                        fail(format!(
                            "environment variable `{name}` is not set (write `${{{name}:-default}}` for a default)"
                        ));
                        None
                    }
                }
            };
            if let Some(value) = value {
                match encode(&value, place) {
                    Ok(encoded) => out.push_str(&encoded),
                    Err(why) => {
                        errors.push(ExpandError { line: index + 1, column, message: format!("`${{{inner}}}`: {why}") })
                    }
                }
            }
            rest = &rest[start + len + 1..];
        }
        place = advance(place, rest);
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(Expanded { text: out, files })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "QUOTED" => Some(r#"pa"ss\word"#.into()),
            "APOS" => Some("it's".into()),
            _ => None,
        }
    }

    fn text(raw: &str) -> String {
        expand(raw, env).unwrap().text
    }

    #[test]
    fn expands_set_variables_and_defaults() {
        assert_eq!(
            text("a = \"${SET}\"\nb = \"${UNSET:-127.0.0.1:9092}\"\nc = \"$HOME ${SET:-x}\"\n"),
            "a = \"value\"\nb = \"127.0.0.1:9092\"\nc = \"$HOME value\"\n"
        );
    }

    #[test]
    fn reports_every_missing_variable_with_its_place() {
        let err = expand("x = 1\ny = \"${A}\"\nz = [\"${SET}\", \"${B}\"]\n", env).unwrap_err();
        assert_eq!(err.iter().map(|e| (e.line, e.column)).collect::<Vec<_>>(), vec![(2, 6), (3, 17)]);
        assert!(err[0].message.contains("`A` is not set"), "{}", err[0].message);
    }

    #[test]
    fn leaves_comments_as_they_are() {
        let raw = "# headers = { Authorization = \"${file:/run/secrets/old}\" }\ny = \"${SET}\" # was ${UNSET} # \"${A}\"\nz = \"#${SET}\" #${B}\n  # ${C}\nw = '''\n# ${SET}\n'''\n";
        assert_eq!(
            text(raw),
            "# headers = { Authorization = \"${file:/run/secrets/old}\" }\ny = \"value\" # was ${UNSET} # \"${A}\"\nz = \"#value\" #${B}\n  # ${C}\nw = '''\n# value\n'''\n"
        );
        assert!(expand(raw, env).unwrap().files.is_empty(), "a commented-out secret file is not read");
    }

    #[test]
    fn escapes_values_for_the_string_they_stand_in() {
        let expanded =
            text("a = \"${QUOTED}\"\nb = ${UNSET:-1}\nc = \"\"\"\n${QUOTED}\"\"\"\nd = 'x'\ne = \"${QUOTED}\"\n");
        let parsed: toml::Table = toml::from_str(&expanded).unwrap();
        assert_eq!(parsed["a"].as_str(), Some(r#"pa"ss\word"#));
        assert_eq!(parsed["c"].as_str(), Some(r#"pa"ss\word"#));
        assert_eq!(parsed["e"].as_str(), Some(r#"pa"ss\word"#));
        assert_eq!(parsed["b"].as_integer(), Some(1));
        assert_eq!(text("a = '${QUOTED}'\n"), "a = 'pa\"ss\\word'\n");
        let err = expand("a = '${APOS}'\n", env).unwrap_err();
        assert!(err[0].message.contains("'…' string cannot hold"), "{}", err[0].message);
    }

    #[test]
    fn reads_secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let with_newline = dir.path().join("pw");
        std::fs::write(&with_newline, "hunter2-file\n").unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "").unwrap();
        let missing = dir.path().join("missing");

        let ok = expand(&format!("p = \"${{file:{}}}\"\n", with_newline.display()), env).unwrap();
        assert_eq!(ok.text, "p = \"hunter2-file\"\n");
        assert_eq!(ok.files, vec![with_newline.clone()]);
        assert_eq!(crate::secrets::redact("x hunter2-file y"), "x *** y");

        let err =
            expand(&format!("a = \"${{file:{}}}\"\nb = \"${{file:{}}}\"\n", missing.display(), empty.display()), env)
                .unwrap_err();
        assert_eq!((err[0].line, err[1].line), (1, 2));
        assert!(
            err[0].message.starts_with("cannot read secret file") && err[0].message.contains("No such file"),
            "{}",
            err[0].message
        );
        assert!(err[1].message.ends_with("is empty"), "{}", err[1].message);
    }

    #[test]
    fn a_doubled_dollar_is_a_literal_and_secret_files_are_bounded_regular_files() {
        let env = |name: &str| (name == "SECRET").then(|| "s3cr3t".to_string());
        let text = format!("p = \"{}\"\n", literal("/opt/${SECRET}.wasm"));
        assert_eq!(text, "p = \"/opt/$${SECRET}.wasm\"\n");
        assert_eq!(expand(&text, env).unwrap().text, "p = \"/opt/${SECRET}.wasm\"\n", "written as given, not expanded");
        assert_eq!(expand("p = \"${SECRET}\"\n", env).unwrap().text, "p = \"s3cr3t\"\n");
        let errors = expand("p = \"${file:/dev/zero}\"\n", env).unwrap_err();
        assert!(errors[0].message.contains("not a regular file"), "{errors:?}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_SECRET_FILE_BYTES as usize + 1]).unwrap();
        let errors = expand(&format!("p = \"${{file:{}}}\"\n", big.display()), env).unwrap_err();
        assert!(errors[0].message.contains("more than a secret's"), "{errors:?}");
    }
}
