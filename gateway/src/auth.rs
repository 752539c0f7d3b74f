//! Who is calling, and from where: the access token (kept only as its SHA-256, compared in
//! constant time, never logged), the `Host` check against DNS rebinding, and the `Origin` check
//! for WebSocket upgrades and CORS.

use http::HeaderMap;
use ring::digest;

/// The user a request acts for. One user for now; the field is what ownership checks compare.
pub const DEFAULT_USER: &str = "default";

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the request.
    #[error("this request needs a token: send `Authorization: token <token>`")]
    Missing,
    /// A token that does not match.
    #[error("the token is not valid")]
    Invalid,
    /// The `Host` header is not a local name.
    #[error(
        "the Host header {0:?} is not allowed; set auth.allow_remote_access to serve other names"
    )]
    Host(String),
    /// A browser on another origin.
    #[error("requests from origin {0:?} are not allowed; add it to auth.allow_origins")]
    Origin(String),
}

/// The token check: each token (kept as its SHA-256) names a user.
#[derive(Clone)]
pub struct Auth {
    /// (SHA-256 of a token, its user); `None` when authentication is off.
    users: Option<Vec<([u8; 32], String)>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.users.is_some() {
            "Auth(token)"
        } else {
            "Auth(off)"
        })
    }
}

/// SHA-256 of a token, as the hash stored in configuration.
pub fn hash_token(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A new random token: 24 bytes, hex (as Jupyter's are).
pub fn new_token() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source works");
    hex::encode(bytes)
}

/// Compares two equal-length byte strings without an early exit.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // Keep the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

impl Auth {
    /// One user's token (`None` turns authentication off).
    pub fn new(token_hash: Option<[u8; 32]>) -> Auth {
        Auth {
            users: token_hash.map(|h| vec![(h, DEFAULT_USER.to_owned())]),
        }
    }

    /// Several users, each with the SHA-256 of their token.
    pub fn with_users(users: Vec<([u8; 32], String)>) -> Auth {
        Auth { users: Some(users) }
    }

    /// The token a request carries: `Authorization: token T` or `Bearer T`, `X-API-Key: T`, or, when
    /// `query_allowed` (WebSocket upgrades, which browsers cannot give headers), `?token=T`.
    pub fn presented(
        headers: &HeaderMap,
        query: Option<&str>,
        query_allowed: bool,
    ) -> Option<String> {
        if let Some(value) = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            let value = value.trim();
            for scheme in ["token ", "Token ", "bearer ", "Bearer "] {
                if let Some(t) = value.strip_prefix(scheme) {
                    return Some(t.trim().to_owned());
                }
            }
        }
        // E2B's SDKs send their API key so; a Sandgate token is the key.
        if let Some(value) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            return Some(value.trim().to_owned());
        }
        if query_allowed {
            for (k, v) in form_pairs(query.unwrap_or_default()) {
                if k == "token" {
                    return Some(v);
                }
            }
        }
        None
    }

    /// Authenticates a request; returns the user it acts for.
    pub fn check(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        query_allowed: bool,
    ) -> Result<String, AuthError> {
        let Some(users) = &self.users else {
            return Ok(DEFAULT_USER.to_owned());
        };
        let token = Self::presented(headers, query, query_allowed).ok_or(AuthError::Missing)?;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let presented = hash_token(&token);
        // Every entry is compared, so the time taken does not tell which one matched.
        let mut found = None;
        for (hash, user) in users {
            if constant_time_eq(&presented, hash) && found.is_none() {
                found = Some(user.clone());
            }
        }
        found.ok_or(AuthError::Invalid)
    }
}

/// Decodes `a=b&c=d` with `%XX` and `+` escapes.
pub fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Decodes `%XX` and `+`; malformed escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' {
            out.push(b' ');
            i += 1;
            continue;
        }
        if b == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && hex.iter().all(u8::is_ascii_hexdigit)
            && let Some(v) = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The host part of a `Host` header or an origin's authority (`[::1]:8888` → `::1`).
fn host_name(authority: &str) -> &str {
    let a = authority.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match a.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => a,
    }
}

/// The `Host` rule: when the gateway listens on loopback and remote access is off, only local
/// names are served, so a web page cannot reach it through a rebinding DNS name.
pub fn check_host(
    headers: &HeaderMap,
    listening_on_loopback: bool,
    allow_remote_access: bool,
    local_hostnames: &[String],
) -> Result<(), AuthError> {
    if allow_remote_access || !listening_on_loopback {
        return Ok(());
    }
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let name = host_name(host).to_ascii_lowercase();
    let local = name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
        || local_hostnames
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&name));
    if local {
        Ok(())
    } else {
        Err(AuthError::Host(host.to_owned()))
    }
}

/// The `Origin` rule for WebSocket upgrades: no `Origin` (not a browser) is fine; a browser's
/// origin must be the gateway's own (same host and port as `Host`) or exactly one allowed.
pub fn check_origin(headers: &HeaderMap, allow_origins: &[String]) -> Result<(), AuthError> {
    let Some(origin) = headers.get(http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("<not text>");
    if allow_origins.iter().any(|o| o == origin) {
        return Ok(());
    }
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    if authority.is_some_and(|a| !host.is_empty() && a.eq_ignore_ascii_case(host)) {
        return Ok(());
    }
    Err(AuthError::Origin(origin.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn token_header_forms_and_query() {
        let auth = Auth::new(Some(hash_token("s3cret")));
        for v in ["token s3cret", "Bearer s3cret", "bearer s3cret"] {
            assert_eq!(
                auth.check(&headers(&[("authorization", v)]), None, false),
                Ok(DEFAULT_USER.to_owned())
            );
        }
        assert_eq!(
            auth.check(&headers(&[]), None, false),
            Err(AuthError::Missing)
        );
        assert_eq!(
            auth.check(&headers(&[("authorization", "token nope")]), None, false),
            Err(AuthError::Invalid)
        );
        // The query form only counts where allowed (WebSocket upgrades).
        assert_eq!(
            auth.check(&headers(&[]), Some("token=s3cret"), false),
            Err(AuthError::Missing)
        );
        assert_eq!(
            auth.check(&headers(&[]), Some("a=1&token=s3cret"), true),
            Ok(DEFAULT_USER.to_owned())
        );
        assert_eq!(
            Auth::new(None).check(&headers(&[]), None, false),
            Ok(DEFAULT_USER.to_owned())
        );
    }

    #[test]
    fn host_rule_blocks_rebinding_names() {
        let ok = |h: &str| check_host(&headers(&[("host", h)]), true, false, &[]);
        assert!(ok("localhost:8888").is_ok());
        assert!(ok("127.0.0.1:8888").is_ok());
        assert!(ok("[::1]:8888").is_ok());
        assert!(ok("attacker.example:8888").is_err());
        assert!(
            check_host(
                &headers(&[("host", "box.lan")]),
                true,
                false,
                &["box.lan".into()]
            )
            .is_ok()
        );
        assert!(check_host(&headers(&[("host", "x.example")]), true, true, &[]).is_ok());
    }

    #[test]
    fn origin_rule_is_exact() {
        let allowed = vec!["https://lab.example.org".to_string()];
        let check = |o: &str| {
            check_origin(
                &headers(&[("origin", o), ("host", "127.0.0.1:8888")]),
                &allowed,
            )
        };
        assert!(check("http://127.0.0.1:8888").is_ok());
        assert!(check("https://lab.example.org").is_ok());
        assert!(check("https://lab.example.org.evil.example").is_err());
        assert!(check("https://evil.example").is_err());
        assert!(check_origin(&headers(&[("host", "127.0.0.1:8888")]), &allowed).is_ok());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%2e%2E"), "..");
    }
}
