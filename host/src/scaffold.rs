//! `jobhost new NAME --lang rust|python|js`: a working plugin skeleton and
//! its `jobs.toml` entry.
//!
//! The skeleton is the smallest job that shows the whole contract: it reads
//! its `[job.config]`, runs one query with a parameter in the lent
//! transaction, logs, and reports a summary. Templates live in
//! `host/templates/new`; Python and JavaScript skeletons carry a copy of the
//! WIT package (their toolchains build against it), a Rust one depends on the
//! SDK by path.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The WIT package this host speaks, copied into Python and JS skeletons.
const WIT: &str = include_str!("../../wit/jobhost.wit");

/// A guest language `jobhost new` writes a skeleton for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A crate on the plugin SDK (`cargo build --release`).
    Rust,
    /// An `app.py` for componentize-py.
    Python,
    /// An `app.js` for componentize-js.
    Js,
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
        })
    }
}

/// What `jobhost new` was asked for.
#[derive(Debug, Clone)]
pub struct NewPlugin {
    /// The job's (and the plugin's) name.
    pub name: String,
    /// Its language.
    pub lang: Lang,
    /// The directory the plugin's own directory is created in.
    pub dir: PathBuf,
    /// The `jobs.toml` the entry is appended to (created if missing).
    pub config: PathBuf,
    /// The Rust SDK (`plugins/sdk` of a jobhost checkout); found by looking
    /// up from `dir` when not given.
    pub sdk: Option<PathBuf>,
}

/// What was written.
#[derive(Debug)]
pub struct Written {
    /// The plugin's directory.
    pub dir: PathBuf,
    /// The files written, in order.
    pub files: Vec<PathBuf>,
    /// The command that builds the component (run in `dir`).
    pub build: String,
    /// Where the built component lands, as `jobs.toml` names it.
    pub plugin: PathBuf,
}

/// Names a plugin may have: a job name that is also a crate name and a
/// file name (`retry-worker`, `nightly_sweep`).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.len() <= 64
}

/// Writes the skeleton and appends the job to the configuration. Refuses to
/// overwrite: an existing directory, or a job of that name, is an error.
pub fn new_plugin(req: &NewPlugin) -> anyhow::Result<Written> {
    let name = req.name.as_str();
    if !valid_name(name) {
        bail!(
            "`{name}` is not a usable plugin name: lowercase letters, digits, `-` and `_`, starting with a letter"
        );
    }
    let existing = match std::fs::read_to_string(&req.config) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", req.config.display())),
    };
    if let Some(text) = &existing {
        let doc: toml::Table = text
            .parse()
            .with_context(|| format!("{} is not valid TOML", req.config.display()))?;
        let taken = doc
            .get("job")
            .and_then(|j| j.as_array())
            .is_some_and(|jobs| {
                jobs.iter()
                    .any(|j| j.get("name").and_then(|n| n.as_str()) == Some(name))
            });
        if taken {
            bail!("{} already has a job named `{name}`", req.config.display());
        }
    }
    let dir = req.dir.join(name);
    if dir.exists() {
        bail!(
            "{} already exists; pick another name or directory",
            dir.display()
        );
    }

    let snake = name.replace('-', "_");
    let (files, build, built): (Vec<(PathBuf, String)>, String, PathBuf) = match req.lang {
        Lang::Rust => {
            let sdk = match &req.sdk {
                Some(sdk) => sdk.clone(),
                None => find_sdk(&req.dir)?,
            };
            let sdk = std::fs::canonicalize(&sdk)
                .with_context(|| format!("the plugin SDK {} does not exist", sdk.display()))?;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let abs_dir = std::fs::canonicalize(&dir)?;
            let sdk_rel = pathdiff::diff_paths(&sdk, &abs_dir).unwrap_or(sdk);
            let cargo = include_str!("../templates/new/rust_Cargo.toml")
                .replace("{{sdk}}", &sdk_rel.display().to_string());
            (
                vec![
                    ("Cargo.toml".into(), cargo),
                    (
                        "src/lib.rs".into(),
                        include_str!("../templates/new/rust_lib.rs.txt").into(),
                    ),
                    (
                        ".cargo/config.toml".into(),
                        include_str!("../templates/new/rust_cargo_config.toml").into(),
                    ),
                ],
                "cargo build --release".into(),
                PathBuf::from(format!("target/wasm32-wasip2/release/{snake}.wasm")),
            )
        }
        // Python and JavaScript: one module and a copy of the WIT it builds
        // against; the component lands beside them.
        Lang::Python | Lang::Js => {
            let (module, template, build) = match req.lang {
                Lang::Python => (
                    "app.py",
                    include_str!("../templates/new/python_app.py"),
                    format!(
                        "componentize-py -d wit -w xact-plugin componentize app -o {snake}.wasm"
                    ),
                ),
                _ => (
                    "app.js",
                    include_str!("../templates/new/js_app.js"),
                    format!("componentize-js app.js --wit wit -n xact-plugin -o {snake}.wasm"),
                ),
            };
            (
                vec![
                    (module.into(), template.into()),
                    ("wit/jobhost.wit".into(), WIT.into()),
                ],
                build,
                PathBuf::from(format!("{snake}.wasm")),
            )
        }
    };
    let guide = match req.lang {
        Lang::Rust => "docs/guide-rust.md",
        Lang::Python => "docs/guide-python.md",
        Lang::Js => "docs/guide-js.md",
    };
    let lang_arg = match req.lang {
        Lang::Rust => "rust",
        Lang::Python => "python",
        Lang::Js => "js",
    };
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{lang}}", &req.lang.to_string())
            .replace("{{lang_arg}}", lang_arg)
            .replace("{{build}}", &build)
            .replace("{{guide}}", guide)
    };
    let mut written = Vec::new();
    let readme = include_str!("../templates/new/README.md");
    for (rel, text) in files
        .iter()
        .chain([&("README.md".into(), readme.to_owned())])
    {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        // The WIT copy is verbatim; everything else is a template.
        let text = if rel.ends_with("jobhost.wit") {
            text.clone()
        } else {
            fill(text)
        };
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }

    // The entry names the component relative to jobs.toml, as hosts read it.
    let config_dir = req
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let plugin_abs = std::fs::canonicalize(&dir)?.join(&built);
    let config_abs = std::fs::canonicalize(config_dir)
        .with_context(|| format!("the directory of {} does not exist", req.config.display()))?;
    let plugin = pathdiff::diff_paths(&plugin_abs, &config_abs).unwrap_or(plugin_abs);
    let plugin_dir = pathdiff::diff_paths(std::fs::canonicalize(&dir)?, &config_abs)
        .unwrap_or_else(|| dir.clone());
    let entry = fill(include_str!("../templates/new/job.toml"))
        .replace("{{plugin}}", &plugin.display().to_string())
        .replace("{{dir}}", &plugin_dir.display().to_string());
    let mut text = existing.unwrap_or_else(|| {
        "# Jobs for jobhost; reference: README.md, section \"jobs.toml\".\n".to_owned()
    });
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&entry);
    std::fs::write(&req.config, text)
        .with_context(|| format!("cannot write {}", req.config.display()))?;

    Ok(Written {
        dir,
        files: written,
        build,
        plugin,
    })
}

/// The SDK of the jobhost checkout `from` is in: `plugins/sdk` in `from` or
/// one of its parents.
fn find_sdk(from: &Path) -> anyhow::Result<PathBuf> {
    let start = std::fs::canonicalize(from).unwrap_or_else(|_| from.to_owned());
    for dir in start.ancestors() {
        for candidate in [dir.join("plugins/sdk"), dir.join("sdk")] {
            if candidate.join("Cargo.toml").is_file()
                && std::fs::read_to_string(candidate.join("Cargo.toml"))
                    .is_ok_and(|t| t.contains("name = \"jobhost-plugin-sdk\""))
            {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "no jobhost plugin SDK found above {}: pass --sdk PATH (the `plugins/sdk` directory of a jobhost checkout)",
        start.display()
    )
}

/// What `jobhost new` prints.
pub fn render(written: &Written, req: &NewPlugin) -> String {
    let mut out = format!(
        "created {} plugin `{}` in {}\n",
        req.lang,
        req.name,
        written.dir.display()
    );
    for f in &written.files {
        out.push_str(&format!("  {}\n", f.display()));
    }
    out.push_str(&format!(
        "added job `{}` to {} (plugin = \"{}\")\n\nnext:\n  cd {} && {}\n  jobhost --config {} run-now {}\n",
        req.name,
        req.config.display(),
        written.plugin.display(),
        written.dir.display(),
        written.build,
        req.config.display(),
        req.name
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("retry-worker"));
        assert!(valid_name("sweep_2"));
        assert!(!valid_name("Retry"));
        assert!(!valid_name("2fast"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }
}
