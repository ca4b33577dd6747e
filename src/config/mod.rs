//! Configuration: TOML files become validated `AgentConfig` / `BotConfig`.
//!
//! Raw input is read once here, key by key, from toml's spanned document so
//! that every error in a file is reported at once with its file, line and key
//! (linkerd2-proxy's habit), not just the first serde error. Code past this
//! module only sees validated values. This module does no I/O besides reading
//! the file it is given and the `*_file` secrets it names.

pub mod agent;
#[cfg(feature = "bot")]
pub mod bot;
#[cfg(feature = "bot")]
pub mod lifecycle;
#[cfg(feature = "bot")]
pub mod paging;
#[cfg(feature = "bot")]
mod people;
#[cfg(feature = "bot")]
pub mod reports;
#[cfg(feature = "bot")]
pub mod routing;
#[cfg(feature = "bot")]
pub mod store;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

pub use crate::secret::{load_secret_file, Secret};
pub use agent::AgentConfig;
#[cfg(feature = "bot")]
pub use bot::BotConfig;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.file.display(),
                self.line,
                self.key,
                self.message
            )
        }
    }
}

/// Every problem found in a file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads a config file into a string, or a one-line error naming it.
pub fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })
}

/// A table of the document being read, with the keys consumed so far.
pub struct Section<'i> {
    path: String,
    line: usize,
    table: DeTable<'i>,
    read: Vec<&'static str>,
}

impl<'i> Section<'i> {
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn line(&self) -> usize {
        self.line
    }

    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    fn entry(&self, key: &str) -> Option<&Spanned<DeValue<'i>>> {
        self.table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)
            .map(|(_, v)| v)
    }

    /// All keys of this table in file order (for free-form maps).
    pub fn keys(&self) -> Vec<String> {
        self.table.keys().map(|k| k.get_ref().to_string()).collect()
    }
}

/// Walks one document, collecting errors instead of stopping at the first.
pub struct Reader<'i> {
    file: PathBuf,
    src: &'i str,
    errors: Vec<ConfigError>,
    /// The text is that of `file` on disk (`from_file`): inline secrets are
    /// refused when others can read it ([`check_inline_secret`]).
    on_disk: bool,
}

impl<'i> Reader<'i> {
    /// Parses `src` (the text of `file`). Syntax errors are fatal: the walk
    /// cannot go on without a document.
    pub fn parse(file: &Path, src: &'i str) -> Result<(Reader<'i>, Section<'i>), ConfigErrors> {
        let reader = Reader {
            file: file.to_path_buf(),
            src,
            errors: Vec::new(),
            on_disk: false,
        };
        let (doc, errors) = DeTable::parse_recoverable(src);
        if !errors.is_empty() {
            let errs = errors
                .iter()
                .map(|e| ConfigError {
                    file: file.to_path_buf(),
                    line: e.span().map(|s| reader.line_of(s.start)).unwrap_or(0),
                    key: String::new(),
                    message: e.message().trim().to_string(),
                })
                .collect();
            return Err(ConfigErrors(errs));
        }
        let root = Section {
            path: String::new(),
            line: 1,
            table: doc.into_inner(),
            read: Vec::new(),
        };
        Ok((reader, root))
    }

    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.src.len());
        self.src.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// Records an error about `key` of `section` (or the section itself if `key` is empty).
    pub fn error(&mut self, section: &Section<'_>, key: &str, message: impl Into<String>) {
        let line = section
            .entry(key)
            .map(|v| self.line_of(v.span().start))
            .unwrap_or(section.line);
        let key = if key.is_empty() {
            section.path.clone()
        } else {
            section.key_path(key)
        };
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            key,
            message: message.into(),
        });
    }

    /// Reads `key` as any serde type; a wrong type is an error naming the key.
    pub fn get<T: DeserializeOwned>(
        &mut self,
        section: &mut Section<'i>,
        key: &'static str,
    ) -> Option<T> {
        section.read.push(key);
        let value = section.entry(key)?.clone();
        let line = self.line_of(value.span().start);
        match T::deserialize(ValueDeserializer::from(value)) {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.push(ConfigError {
                    file: self.file.clone(),
                    line,
                    key: section.key_path(key),
                    message: e.message().trim().to_string(),
                });
                None
            }
        }
    }

    /// Reads `key` and converts it with `convert`; its `Err` is reported against the key.
    pub fn get_with<T: DeserializeOwned, U>(
        &mut self,
        section: &mut Section<'i>,
        key: &'static str,
        convert: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        let raw: T = self.get(section, key)?;
        match convert(raw) {
            Ok(v) => Some(v),
            Err(msg) => {
                self.error(section, key, msg);
                None
            }
        }
    }

    /// A sub-table `[parent.key]`; absent gives `None`, a non-table is an error.
    pub fn table(&mut self, section: &mut Section<'i>, key: &'static str) -> Option<Section<'i>> {
        section.read.push(key);
        let value = section.entry(key)?.clone();
        let line = self.line_of(value.span().start);
        let path = section.key_path(key);
        match value.into_inner() {
            DeValue::Table(table) => Some(Section {
                path,
                line,
                table,
                read: Vec::new(),
            }),
            _ => {
                self.error(section, key, "expected a table");
                None
            }
        }
    }

    /// An array of tables `[[parent.key]]`.
    pub fn tables(&mut self, section: &mut Section<'i>, key: &'static str) -> Vec<Section<'i>> {
        section.read.push(key);
        let Some(value) = section.entry(key).cloned() else {
            return Vec::new();
        };
        let path = section.key_path(key);
        match value.into_inner() {
            DeValue::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    let line = self.line_of(item.span().start);
                    match item.into_inner() {
                        DeValue::Table(table) => out.push(Section {
                            path: format!("{path}[{i}]"),
                            line,
                            table,
                            read: Vec::new(),
                        }),
                        _ => self.errors.push(ConfigError {
                            file: self.file.clone(),
                            line,
                            key: format!("{path}[{i}]"),
                            message: "expected a table".into(),
                        }),
                    }
                }
                out
            }
            _ => {
                self.error(section, key, "expected an array of tables");
                Vec::new()
            }
        }
    }

    /// Reports every key of `section` that was never asked for.
    pub fn finish(&mut self, section: Section<'i>) {
        for (k, v) in section.table.iter() {
            let name = k.get_ref().as_ref();
            if !section.read.contains(&name) {
                self.errors.push(ConfigError {
                    file: self.file.clone(),
                    line: self.line_of(v.span().start.min(k.span().start)),
                    key: section.key_path(name),
                    message: "unknown key".into(),
                });
            }
        }
    }

    /// Ends the walk: `Ok(())` when nothing was wrong.
    pub fn into_result(mut self) -> Result<(), ConfigErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            self.errors.sort_by_key(|e| e.line);
            Err(ConfigErrors(self.errors))
        }
    }

    /// Marks the text as read from `file` on disk (see [`check_inline_secret`]).
    pub fn set_on_disk(&mut self, on_disk: bool) {
        self.on_disk = on_disk;
    }

    /// The file being read.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

/// A secret given inline (`key`) or by file (`key_file`). Relative `*_file`
/// paths are looked up in `$CREDENTIALS_DIRECTORY` first (systemd's
/// `LoadCredential=`), then relative to the current directory.
pub fn read_secret<'i>(
    reader: &mut Reader<'i>,
    section: &mut Section<'i>,
    key: &'static str,
    file_key: &'static str,
) -> Option<Secret> {
    let inline: Option<String> = reader.get(section, key);
    let file: Option<PathBuf> = reader.get(section, file_key);
    match (inline, file) {
        (Some(_), Some(_)) => {
            reader.error(
                section,
                file_key,
                format!("set either {key} or {file_key}, not both"),
            );
            None
        }
        (Some(s), None) if s.trim().is_empty() => {
            reader.error(section, key, "must not be empty");
            None
        }
        (Some(s), None) => {
            check_inline_secret(reader, section, key, file_key);
            Some(Secret::new(s))
        }
        (None, Some(path)) => match load_secret_file(&path) {
            Ok(s) => Some(s),
            Err(msg) => {
                reader.error(section, file_key, msg);
                None
            }
        },
        (None, None) => None,
    }
}

/// An inline secret (`key`) is refused in a file other users can read
/// (read from disk: `from_file`, so `gpuops bot` and `check-config`): the
/// error names the file, the key, its mode and both ways out.
pub fn check_inline_secret<'i>(
    reader: &mut Reader<'i>,
    section: &Section<'i>,
    key: &str,
    file_key: &str,
) {
    if !reader.on_disk {
        return;
    }
    if let Some(mode) = crate::secret::readable_by_others(reader.file()) {
        let file = reader.file().display().to_string();
        reader.error(
            section,
            key,
            format!(
                "a secret inline in {file}, which other users can read (mode {mode:04o}): chmod 600 {file}, or move the secret to a file of its own ({file_key}, loaded with systemd's LoadCredential=)"
            ),
        );
    }
}

/// Reads a `[log]` section (`format = "text"|"json"`, `level` = a tracing filter);
/// shared by both roles.
pub fn read_log_section<'i>(r: &mut Reader<'i>, mut s: Section<'i>) -> agent::LogConfig {
    let mut log = agent::LogConfig::default();
    if let Some(v) = r.get_with(&mut s, "format", |f: String| match f.as_str() {
        "text" => Ok(false),
        "json" => Ok(true),
        _ => Err(format!("must be \"text\" or \"json\", got {f:?}")),
    }) {
        log.json = v;
    }
    if let Some(v) = r.get_with(&mut s, "level", |l: String| {
        tracing_subscriber::EnvFilter::try_new(&l)
            .map(|_| l.clone())
            .map_err(|e| format!("invalid level {l:?}: {e}"))
    }) {
        log.level = v;
    }
    r.finish(s);
    log
}

/// Parses a positive number of seconds into a `Duration`.
pub fn positive_secs(v: f64) -> Result<std::time::Duration, String> {
    if v.is_finite() && v > 0.0 && v < 86_400.0 * 365.0 {
        Ok(std::time::Duration::from_secs_f64(v))
    } else {
        Err(format!("must be a positive number of seconds, got {v}"))
    }
}

/// Compiles a regular expression, anchored the way Prometheus matchers are.
pub fn anchored_regex(pattern: String) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        let text = e.to_string();
        let reason = text
            .lines()
            .last()
            .unwrap_or("")
            .trim_start_matches("error: ");
        format!("invalid regex {pattern:?}: {reason}")
    })
}

/// Limits of an HTTP server (both roles; see `src/web`). The defaults keep a
/// scraper or AlertManager on a slow network well inside them while an idle
/// or trickling peer is dropped long before it can pile up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebLimits {
    /// Connections open at once; beyond it a new one is accepted and closed
    /// at once (`gpuops_http_connections_refused_total`).
    pub max_connections: usize,
    /// From accept (or the first byte after an idle keep-alive wait) to the
    /// end of the request head, TLS handshake included.
    pub header_timeout: std::time::Duration,
    /// From the end of the head to the end of the request body; a body still
    /// trickling then is cut off with 408.
    pub body_timeout: std::time::Duration,
    /// A keep-alive connection with no request and no bytes moving is closed
    /// after this long.
    pub idle_timeout: std::time::Duration,
}

impl Default for WebLimits {
    fn default() -> Self {
        WebLimits {
            max_connections: 4096,
            header_timeout: std::time::Duration::from_secs(10),
            body_timeout: std::time::Duration::from_secs(30),
            idle_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// Reads the server limit keys (`max_connections`, `header_timeout_secs`,
/// `body_timeout_secs`, `idle_timeout_secs`) of `s` into `limits`; the
/// caller reads the section's other keys and calls [`Reader::finish`].
pub fn read_web_limits<'i>(r: &mut Reader<'i>, s: &mut Section<'i>, limits: &mut WebLimits) {
    if let Some(v) = r.get_with(s, "max_connections", |n: i64| {
        if (16..=1_000_000).contains(&n) {
            Ok(n as usize)
        } else {
            Err(format!("must be between 16 and 1000000, got {n}"))
        }
    }) {
        limits.max_connections = v;
    }
    for (key, slot) in [
        ("header_timeout_secs", &mut limits.header_timeout),
        ("body_timeout_secs", &mut limits.body_timeout),
        ("idle_timeout_secs", &mut limits.idle_timeout),
    ] {
        if let Some(v) = r.get_with(s, key, positive_secs) {
            *slot = v;
        }
    }
}
