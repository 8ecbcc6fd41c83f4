//! The `http` step kind's allowlist (`worker.http_allowlist`): URLs are parsed and compared
//! by part, never as strings. A request URL is allowed when some entry has the same scheme,
//! host and port (exactly, after parsing: `127.1` is `127.0.0.1`, hosts are lowercased) and
//! the entry's path segments are a prefix of the URL's, compared percent-decoded after dot
//! segments (`..`, `%2e%2e`) are resolved. A URL with credentials (`user:pass@`), or with a
//! segment that decodes to `.`, `..` or contains `/` or `\` (which a server could resolve
//! again), is refused whatever the allowlist says.

use percent_encoding::percent_decode_str;
use url::{Host, Url};

/// Why a URL is refused (an entry, or a step's URL). Never echoes credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    #[error("{0:?} is not an absolute http(s) URL")]
    NotHttp(String),
    #[error("the url carries credentials (user:password@), which are refused")]
    Credentials,
    #[error("{0} has a path segment that decodes to a dot segment or a separator")]
    AmbiguousPath(String),
    #[error("{0} may not have a query or fragment (an allowlist entry is a prefix)")]
    QueryInEntry(String),
    #[error("url {0} is not in the worker's http_allowlist")]
    NotAllowed(String),
}

/// One allowed prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Prefix {
    scheme: String,
    host: Host<String>,
    port: u16,
    /// Decoded path segments, without a trailing empty one (`/api/` and `/api` alike).
    segments: Vec<String>,
}

/// Parsed `worker.http_allowlist`; empty allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlAllowlist {
    prefixes: Vec<Prefix>,
}

/// Scheme, host and port of an absolute http(s) URL without credentials.
fn origin(url: &Url, text: &str) -> Result<(String, Host<String>, u16), UrlRefused> {
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlRefused::Credentials);
    }
    let not_http = || UrlRefused::NotHttp(text.to_string());
    if !matches!(url.scheme(), "http" | "https") {
        return Err(not_http());
    }
    let host = url.host().ok_or_else(not_http)?.to_owned();
    let port = url.port_or_known_default().ok_or_else(not_http)?;
    Ok((url.scheme().to_string(), host, port))
}

/// The URL's path segments, percent-decoded; refuses any that a server could read as a dot
/// segment or a separator after decoding.
fn segments(url: &Url) -> Result<Vec<String>, UrlRefused> {
    let mut out = Vec::new();
    for raw in url.path_segments().into_iter().flatten() {
        let s = percent_decode_str(raw).decode_utf8_lossy().into_owned();
        if s == "." || s == ".." || s.contains(['/', '\\']) {
            return Err(UrlRefused::AmbiguousPath(url.to_string()));
        }
        out.push(s);
    }
    if out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    Ok(out)
}

fn parse(text: &str) -> Result<Url, UrlRefused> {
    Url::parse(text).map_err(|_| UrlRefused::NotHttp(text.to_string()))
}

impl UrlAllowlist {
    /// Parses the entries (config validation reports the first bad one).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, UrlRefused> {
        let prefixes = entries
            .iter()
            .map(|e| {
                let text = e.as_ref();
                let url = parse(text)?;
                let (scheme, host, port) = origin(&url, text)?;
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(UrlRefused::QueryInEntry(url.to_string()));
                }
                Ok(Prefix {
                    scheme,
                    host,
                    port,
                    segments: segments(&url)?,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { prefixes })
    }

    /// The parsed URL to call (send this one, not the text), or why it is refused.
    pub fn check(&self, text: &str) -> Result<Url, UrlRefused> {
        let url = parse(text)?;
        let (scheme, host, port) = origin(&url, text)?;
        let segs = segments(&url)?;
        let allowed = self.prefixes.iter().any(|p| {
            p.scheme == scheme
                && p.host == host
                && p.port == port
                && segs.len() >= p.segments.len()
                && p.segments.iter().zip(&segs).all(|(a, b)| a == b)
        });
        if allowed {
            Ok(url)
        } else {
            Err(UrlRefused::NotAllowed(url.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> UrlAllowlist {
        UrlAllowlist::parse(entries).unwrap()
    }

    #[test]
    fn scheme_host_and_port_are_compared_exactly() {
        let a = list(&["http://127.0.0.1:19301"]);
        assert!(a.check("http://127.0.0.1:19301/x").is_ok());
        assert!(a.check("http://127.1:19301/x").is_ok(), "same host, parsed");
        assert!(a.check("http://127.0.0.1:193011/x").is_err());
        assert!(a.check("http://127.0.0.1:19302/x").is_err());
        assert!(a.check("https://127.0.0.1:19301/x").is_err());
        assert!(a.check("http://127.0.0.1/x").is_err(), "port 80");
        assert_eq!(
            a.check("http://127.0.0.1:19301@127.0.0.1:19302/x"),
            Err(UrlRefused::Credentials)
        );
        assert_eq!(
            a.check("http://u:secret@127.0.0.1:19301/x"),
            Err(UrlRefused::Credentials)
        );
        assert!(!UrlRefused::Credentials.to_string().contains("secret"));
        let d = list(&["https://Example.COM/"]);
        assert!(d.check("https://example.com:443/a").is_ok());
        assert!(d.check("https://example.com.evil.test/a").is_err());
        assert!(d.check("file:///etc/passwd").is_err());
    }

    #[test]
    fn paths_are_compared_by_normalised_segment() {
        let a = list(&["http://localhost:19301/api/"]);
        assert!(a.check("http://localhost:19301/api/x").is_ok());
        assert!(a.check("http://localhost:19301/api").is_ok());
        assert!(a.check("http://localhost:19301/api/%61b").is_ok());
        assert!(a.check("http://localhost:19301/apix").is_err());
        assert!(a.check("http://localhost:19301/admin").is_err());
        for bypass in [
            "http://localhost:19301/api/../admin",
            "http://localhost:19301/api/%2e%2e/admin",
            "http://localhost:19301/api/.%2E/admin",
            "http://localhost:19301/api/..%2fadmin",
            "http://localhost:19301/api/%2E%2E%5Cadmin",
            "http://localhost:19301/api\\..\\admin",
        ] {
            assert!(a.check(bypass).is_err(), "{bypass}");
        }
        // Resolving dots inside the allowed prefix stays allowed, and is what is sent.
        let u = a.check("http://localhost:19301/api/v1/../v2").unwrap();
        assert_eq!(u.path(), "/api/v2");
    }

    #[test]
    fn entries_are_validated() {
        assert!(UrlAllowlist::parse(&["ftp://h/"]).is_err());
        assert!(UrlAllowlist::parse(&["/relative"]).is_err());
        assert!(UrlAllowlist::parse(&["http://u:p@h/"]).is_err());
        assert!(UrlAllowlist::parse(&["http://h/?q=1"]).is_err());
        assert!(
            UrlAllowlist::parse::<&str>(&[])
                .unwrap()
                .check("http://h/")
                .is_err()
        );
    }
}
