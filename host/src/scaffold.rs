//! `sluice plugin new`: writes a ready-to-build plugin skeleton in Rust,
//! Python or JavaScript.
//!
//! A skeleton is self-contained: the WIT contract, the language's SDK (the
//! same files as `plugins/sluice-plugin*`, embedded at compile time), a sample
//! transform with native unit tests, `sample.jsonl` for `sluice plugin test`
//! with its golden outputs, and `build.sh`, which installs the language's
//! toolchain from its registry (rustup target, PyPI, npm), runs the unit
//! tests, writes `NAME.wasm` and runs the golden test.

use std::path::{Path, PathBuf};

/// The componentize-py version skeletons and `scripts/build-plugins.sh` pin.
pub const COMPONENTIZE_PY_VERSION: &str = "0.25.1";

/// A plugin language `sluice plugin new` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

impl Lang {
    fn describe(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python, built with componentize-py",
            Lang::Js => "JavaScript, built with jco / componentize-js",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("plugin name {0:?}: use lower-case letters, digits, '-' and '_', starting with a letter")]
    BadName(String),
    #[error("{0} already exists and is not empty")]
    NotEmpty(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// One file of a skeleton: where it goes, what it says, whether it runs.
struct File {
    path: &'static str,
    text: &'static str,
    role: &'static str,
    executable: bool,
}

const fn file(path: &'static str, text: &'static str, role: &'static str) -> File {
    File { path, text, role, executable: false }
}

const fn script(path: &'static str, text: &'static str, role: &'static str) -> File {
    File { path, text, role, executable: true }
}

macro_rules! template {
    ($path:literal) => {
        include_str!(concat!("../templates/plugin/", $path))
    };
}

/// Contract 0.2, which every SDK builds.
const WIT: &str = include_str!("../../wit/transform.wit");
/// Contract 0.1, for the Rust SDK's `contract-0-1` feature.
const WIT_V01: &str = include_str!("../../wit/0.1/transform.wit");

fn files(lang: Lang) -> Vec<File> {
    let mut files = match lang {
        Lang::Rust => vec![
            file("src/lib.rs", template!("rust/src/lib.rs"), "your transform and its unit tests"),
            file("Cargo.toml", template!("rust/Cargo.toml"), "the crate (a `cdylib`, its own workspace)"),
            script("build.sh", template!("rust/build.sh"), "`cargo test`, then the component"),
            file(
                "sdk/sluice-plugin/src/lib.rs",
                include_str!("../../plugins/sluice-plugin/src/lib.rs"),
                "the Rust SDK",
            ),
            file(
                "sdk/sluice-plugin/src/abi.rs",
                include_str!("../../plugins/sluice-plugin/src/abi.rs"),
                "the SDK's side of the batch layout (contract 0.2)",
            ),
            file(
                "sdk/sluice-abi/src/lib.rs",
                include_str!("../../plugins/sluice-abi/src/lib.rs"),
                "the batch layout of contract 0.2, shared with the host",
            ),
            file(
                "sdk/sluice-abi/src/batch.rs",
                include_str!("../../plugins/sluice-abi/src/batch.rs"),
                "the batch buffer",
            ),
            file(
                "sdk/sluice-abi/src/results.rs",
                include_str!("../../plugins/sluice-abi/src/results.rs"),
                "the results buffer",
            ),
            file(
                "sdk/sluice-abi/src/testing.rs",
                include_str!("../../plugins/sluice-abi/src/testing.rs"),
                "buffers for tests",
            ),
            file("sdk/sluice-abi/Cargo.toml", template!("rust/sdk-abi-Cargo.toml"), "the layout crate's manifest"),
            file("wit/transform.wit", WIT, "the contract between Sluice and the plugin (0.2)"),
            file("wit/0.1/transform.wit", WIT_V01, "contract 0.1, for the SDK's `contract-0-1` feature"),
            file("sdk/sluice-plugin/Cargo.toml", template!("rust/sdk-Cargo.toml"), "the Rust SDK's manifest"),
            file(".gitignore", template!("rust/gitignore"), "build outputs"),
        ],
        Lang::Python => vec![
            file("app.py", template!("python/app.py"), "your transform (`Transform = sluice_plugin.export(...)`)"),
            file("test_app.py", template!("python/test_app.py"), "its unit tests (`python3 -m unittest`)"),
            script(
                "build.sh",
                template!("python/build.sh"),
                "componentize-py into `.venv`, unit tests, then the component",
            ),
            file(
                "sdk/sluice_plugin.py",
                include_str!("../../plugins/sluice-plugin-py/sluice_plugin.py"),
                "the Python SDK",
            ),
            file(".gitignore", template!("python/gitignore"), "build outputs"),
            file("wit/transform.wit", WIT, "the contract between Sluice and the plugin (0.2)"),
        ],
        Lang::Js => vec![
            file("transform.js", template!("js/transform.js"), "your transform"),
            file("transform.test.js", template!("js/transform.test.js"), "its unit tests (`npm test`)"),
            file("index.js", template!("js/index.js"), "the component's entry point (wires your class to the WIT)"),
            file(
                "package.json",
                template!("js/package.json"),
                "`npm run build` / `npm test`; jco, componentize-js, esbuild",
            ),
            script("build.sh", template!("js/build.sh"), "`npm install`, unit tests, then the component"),
            file(
                "sdk/sluice-plugin.js",
                include_str!("../../plugins/sluice-plugin-js/sluice-plugin.js"),
                "the JavaScript SDK",
            ),
            file(
                "sdk/package.json",
                include_str!("../../plugins/sluice-plugin-js/package.json"),
                "the SDK's package manifest",
            ),
            file(".gitignore", template!("js/gitignore"), "build outputs"),
            file("wit/transform.wit", WIT, "the contract between Sluice and the plugin (0.2)"),
        ],
    };
    files.extend([
        file("sample.jsonl", template!("common/sample.jsonl"), "input for `sluice plugin test`"),
        file(
            "sample.expected.jsonl",
            template!("common/sample.expected.jsonl"),
            "the sample's golden outputs (`--expect`), checked by `build.sh`",
        ),
    ]);
    files
}

/// Writes the skeleton of plugin `name` in `lang` into `dir` (created; it
/// must not exist or be empty). Returns the files written.
pub fn new_plugin(dir: &Path, name: &str, lang: Lang) -> Result<Vec<PathBuf>, ScaffoldError> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        return Err(ScaffoldError::BadName(name.to_string()));
    }
    if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(ScaffoldError::NotEmpty(dir.to_path_buf()));
    }

    let files = files(lang);
    let table: Vec<String> = files
        .iter()
        .map(|f| format!("`{}` | {}", f.path, f.role))
        .chain(["`README.md` | this file".to_string()])
        .collect();
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"))
            .replace("{{componentize_py_version}}", COMPONENTIZE_PY_VERSION)
            .replace("{{language}}", lang.describe())
            .replace("{{lang}}", lang.flag())
            .replace("{{files}}", &table.join(" |\n| "))
    };

    let mut written = Vec::new();
    let readme = File { path: "README.md", text: template!("common/README.md"), role: "", executable: false };
    for f in files.iter().chain([&readme]) {
        let path = dir.join(f.path);
        let write = || -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // The SDKs and the WIT are copied verbatim; only templates are filled in.
            let text = if f.path.starts_with("sdk/") || f.path.starts_with("wit/") {
                f.text.to_string()
            } else {
                fill(f.text)
            };
            std::fs::write(&path, text)?;
            if f.executable {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            }
            Ok(())
        };
        write().map_err(|source| ScaffoldError::Write { path: path.clone(), source })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_file_with_the_name_filled_in() {
        for lang in [Lang::Rust, Lang::Python, Lang::Js] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("my-plugin");
            let written = new_plugin(&root, "my-plugin", lang).unwrap();
            assert!(written.iter().all(|p| p.is_file()), "{written:?}");
            let build = std::fs::read_to_string(root.join("build.sh")).unwrap();
            assert!(build.contains("my-plugin.wasm") && !build.contains("{{"), "{build}");
            let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
            assert!(readme.contains("`sample.jsonl` | input for") && !readme.contains("{{"), "{readme}");
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(root.join("build.sh")).unwrap().permissions().mode() & 0o111, 0o111);
        }
    }

    #[test]
    fn refuses_bad_names_and_non_empty_folders() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(new_plugin(dir.path(), "My Plugin", Lang::Rust), Err(ScaffoldError::BadName(_))));
        assert!(matches!(new_plugin(dir.path(), "", Lang::Rust), Err(ScaffoldError::BadName(_))));
        std::fs::write(dir.path().join("x"), "").unwrap();
        let error = new_plugin(dir.path(), "ok", Lang::Js).unwrap_err();
        assert!(error.to_string().contains("already exists and is not empty"), "{error}");
    }

    /// The skeletons pin the same toolchain versions the repository's own
    /// plugins are built and tested with.
    #[test]
    fn toolchain_versions_match_the_repository_plugins() {
        let script = include_str!("../../scripts/build-plugins.sh");
        assert!(script.contains(&format!("componentize_py_version={COMPONENTIZE_PY_VERSION}")));
        let template: serde_json::Value = serde_json::from_str(template!("js/package.json")).unwrap();
        let repo: serde_json::Value =
            serde_json::from_str(include_str!("../../plugins/js-router/package.json")).unwrap();
        assert_eq!(template["devDependencies"], repo["devDependencies"]);
        let sdk: &str = template!("rust/sdk-Cargo.toml");
        let workspace = include_str!("../../Cargo.toml");
        let pin = |text: &str| text.lines().find(|l| l.starts_with("wit-bindgen")).map(str::to_string);
        assert_eq!(pin(sdk), pin(workspace));
    }
}
