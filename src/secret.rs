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
/// A file that group or others may read is refused ([`check_private_file`]).
pub fn load_secret_file(path: &Path) -> Result<Secret, String> {
    let (p, s) = read_credential(path)?;
    check_private_file(&p)?;
    if s.trim().is_empty() {
        return Err(format!("{} is empty", p.display()));
    }
    Ok(Secret::new(s.trim_end_matches(['\n', '\r']).to_string()))
}

/// Refuses a secret file whose mode lets group or others in (`exec.key`,
/// `*_file` secrets): "chmod 600 it". Files in `$CREDENTIALS_DIRECTORY` are
/// fine as systemd makes them (only the service can read that directory).
pub fn check_private_file(path: &Path) -> Result<(), String> {
    if in_credentials_directory(path) {
        return Ok(());
    }
    let mode = file_mode(path).unwrap_or(0);
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable by group or others (mode {mode:04o}): chmod 600 it (or load it with systemd's LoadCredential=)",
            path.display()
        ));
    }
    Ok(())
}

/// The mode of `path` (permission bits only) when other users (not the
/// owner, not the group) can read it: world-readable, and every directory
/// above it lets them through. `None` when they cannot (or it cannot be read).
pub fn readable_by_others(path: &Path) -> Option<u32> {
    let mode = file_mode(path)?;
    if mode & 0o004 == 0 {
        return None;
    }
    let full = std::fs::canonicalize(path).ok()?;
    for dir in full.ancestors().skip(1) {
        if file_mode(dir)? & 0o001 == 0 {
            return None;
        }
    }
    Some(mode)
}

/// The mode of `path` when any user may write to it (a file others could
/// rewrite, a directory others could add files to, sticky or not).
pub fn writable_by_others(path: &Path) -> Option<u32> {
    let mode = file_mode(path)?;
    if mode & 0o002 != 0 {
        return Some(mode);
    }
    None
}

fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

fn in_credentials_directory(path: &Path) -> bool {
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
        return false;
    };
    let dir = PathBuf::from(dir);
    match (std::fs::canonicalize(&dir), std::fs::canonicalize(path)) {
        (Ok(d), Ok(p)) => p.starts_with(d),
        _ => false,
    }
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

/// A database connection string fit for logs and errors, in any of the
/// forms libpq and tokio-postgres take: a URL (the `user:PASSWORD@` part and
/// every password-like query parameter replaced by `***`) or key=value
/// pairs (`host=db user=gpuops password='a b'`: every password-like value,
/// quoted or not, replaced by `***`). A string that cannot be read as
/// either and mentions a password is not shown at all.
pub fn redact_url(url: &str) -> String {
    if url.contains("://") {
        redact_url_form(url)
    } else {
        match redact_keyvalue(url) {
            Some(s) => s,
            None if url.to_ascii_lowercase().contains("pass") => {
                "<connection string hidden: it may hold a password>".to_string()
            }
            None => url.to_string(),
        }
    }
}

/// Whether `s` (a URL or key=value connection string) carries a password:
/// such a string must not be given on a command line, where `ps` shows it.
pub fn conninfo_has_password(s: &str) -> bool {
    redact_url(s) != s
}

/// A parameter name that holds a password (`password`, `PGPASSWORD`,
/// `sslpassword`, ...).
fn is_password_key(key: &str) -> bool {
    let k = key.trim().to_ascii_lowercase();
    k.contains("password") || k == "pass" || k == "pwd"
}

fn redact_url_form(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        // The userinfo ends at the last '@' before the query: a password
        // with an unencoded '/' or '@' is still hidden (over-redacting a
        // path with '@' in it is harmless).
        let query_start = out[rest_start..]
            .find('?')
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..query_start].rfind('@') {
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
                Some((k, _)) if is_password_key(k) => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{base}{}", redacted.join("&"));
    }
    out
}

/// `key=value` pairs separated by spaces, values bare or single-quoted with
/// backslash escapes (libpq's rules); `None` when `s` is not of that form.
fn redact_keyvalue(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut pairs = 0;
    while i < b.len() {
        if b[i].is_ascii_whitespace() {
            out.push(b[i] as char);
            i += 1;
            continue;
        }
        let key_start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &s[key_start..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if key.is_empty() || i >= b.len() || b[i] != b'=' {
            return None;
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let value_start = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return None,
                    Some(b'\\') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
        }
        let value = s.get(value_start..i.min(b.len()))?;
        out.push_str(key);
        out.push('=');
        if is_password_key(key) {
            out.push_str("***");
        } else {
            out.push_str(value);
        }
        pairs += 1;
    }
    (pairs > 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::{conninfo_has_password, redact_url};

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
        assert!(!redact_url("postgres://u:pa/ss@h/db").contains("pa/ss"));
    }

    #[test]
    fn keyvalue_connection_strings_lose_every_password() {
        assert_eq!(
            redact_url("host=db.example user=gpuops password=hunter2 dbname=gpuops"),
            "host=db.example user=gpuops password=*** dbname=gpuops"
        );
        assert_eq!(
            redact_url("host=db password = 'a b\\' c' sslmode=require"),
            "host=db password=*** sslmode=require"
        );
        assert_eq!(redact_url("PGPASSWORD=x host=h"), "PGPASSWORD=*** host=h");
        assert_eq!(
            redact_url("postgres://u@h/db?sslpassword=k&sslmode=require"),
            "postgres://u@h/db?sslpassword=***&sslmode=require"
        );
        let broken = redact_url("host=db password='unterminated hunter2");
        assert!(!broken.contains("hunter2"), "{broken}");
        assert!(conninfo_has_password("host=h password=x"));
        assert!(conninfo_has_password("postgres://u:p@h/db"));
        assert!(!conninfo_has_password("postgres://u@h/db?sslmode=require"));
        assert!(!conninfo_has_password("host=h user=u"));
    }
}
