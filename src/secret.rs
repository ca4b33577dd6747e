//! [`Secret`]: a value that never prints itself, and [`load_secret_file`]
//! (`*_file` secrets, looked up in `$CREDENTIALS_DIRECTORY` first). A base
//! leaf shared by `config` and `exec_auth`; it imports nothing of the crate.

use std::fmt;
use std::path::{Path, PathBuf};

/// Reads a `*_file` name: an absolute path as it is; a relative one in
/// `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`) first, then
/// relative to the current directory. Returns the path read and its text.
pub fn read_credential(path: &Path) -> Result<(PathBuf, String), String> {
    let candidates: Vec<PathBuf> = if path.is_absolute() {
        vec![path.to_path_buf()]
    } else {
        let mut c = Vec::new();
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            c.push(PathBuf::from(dir).join(path));
        }
        c.push(path.to_path_buf());
        c
    };
    let mut last = String::new();
    for p in candidates {
        match std::fs::read_to_string(&p) {
            Ok(s) => return Ok((p, s)),
            Err(e) => last = format!("cannot read {}: {e}", p.display()),
        }
    }
    Err(last)
}

/// Reads a secret file ([`read_credential`]), trimming the trailing newline.
pub fn load_secret_file(path: &Path) -> Result<Secret, String> {
    let (p, s) = read_credential(path)?;
    if s.trim().is_empty() {
        return Err(format!("{} is empty", p.display()));
    }
    Ok(Secret::new(s.trim_end_matches(['\n', '\r']).to_string()))
}

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself; call only where it is used (signing, auth headers).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A database URL fit for logs and errors: the password (the `user:PASSWORD@`
/// part, or a `password=` query parameter) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let (from, to) = (rest_start + colon + 1, rest_start + at);
                out.replace_range(from..to, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let redacted: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{base}{}", redacted.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn database_urls_lose_their_password_only() {
        assert_eq!(
            redact_url("postgres://gpuops:s3cr%40t@db.example:5432/gpuops?sslmode=require"),
            "postgres://gpuops:***@db.example:5432/gpuops?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?password=hunter2&sslmode=disable"),
            "postgres://u@h/db?password=***&sslmode=disable"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert!(!redact_url("postgresql://a:b@c@d/e").contains(":b@"));
    }
}
