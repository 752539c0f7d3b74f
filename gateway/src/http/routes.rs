//! Parsing a request line into a [`Route`]: the only place that knows the URL layout. Handlers
//! `match` on the result.

use http::Method;

/// Every endpoint the gateway serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /api`: the API version.
    Api,
    /// `GET /api/status`.
    Status,
    /// `GET /api/kernelspecs`.
    KernelSpecs,
    /// `GET /api/kernelspecs/{name}`.
    KernelSpec(String),
    /// `GET /kernelspecs/{name}/{file}` (no `/api` prefix, as Jupyter Server serves logos).
    KernelSpecResource(String, String),
    /// `GET` (list) or `POST` (start) `/api/kernels`.
    Kernels,
    /// `GET` or `DELETE /api/kernels/{id}`.
    Kernel(String),
    /// `POST /api/kernels/{id}/interrupt`.
    Interrupt(String),
    /// `POST /api/kernels/{id}/restart`.
    Restart(String),
    /// `GET /api/kernels/{id}/channels`: the WebSocket.
    Channels(String),
    /// `GET` or `POST /api/sessions`.
    Sessions,
    /// `GET`, `PATCH` or `DELETE /api/sessions/{id}`.
    Session(String),
    /// `GET`, `PUT`, `POST`, `PATCH` or `DELETE /api/contents/{path}` (path decoded, unchecked).
    Contents(String),
    /// `GET` or `POST /api/contents/{path}/checkpoints`.
    Checkpoints(String),
    /// `POST` (restore) or `DELETE /api/contents/{path}/checkpoints/{id}`.
    Checkpoint(String, String),
    /// `GET /api/ask/usage`: `%%ask` tokens per workspace and kernel.
    AskUsage,
}

/// Why a path has no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// No such path.
    NotFound,
    /// The path exists but not with this method; the allowed ones.
    Method(&'static str),
}

/// Decodes one path segment (`%XX`), refusing ones that decode to separators or dot-segments.
fn segment(s: &str) -> Option<String> {
    let decoded = crate::auth::percent_decode(&s.replace('+', "%2B"));
    if decoded.is_empty()
        || decoded == "."
        || decoded == ".."
        || decoded.contains('/')
        || decoded.contains('\0')
    {
        return None;
    }
    Some(decoded)
}

fn decode_path(p: &str) -> String {
    crate::auth::percent_decode(&p.replace('+', "%2B"))
}

/// The Contents API: everything after `/api/contents` is a workspace path (decoded here,
/// checked by the workspace's own path parser).
fn contents(method: &Method, rest: &str) -> Result<Route, NoRoute> {
    let rest = rest.trim_end_matches('/');
    let (route, allowed) = if let Some((path, id)) = rest.rsplit_once("/checkpoints/") {
        let id = segment(id).ok_or(NoRoute::NotFound)?;
        (Route::Checkpoint(decode_path(path), id), "POST, DELETE")
    } else if let Some(path) = rest.strip_suffix("/checkpoints") {
        (Route::Checkpoints(decode_path(path)), "GET, POST")
    } else {
        (
            Route::Contents(decode_path(rest)),
            "GET, PUT, POST, PATCH, DELETE",
        )
    };
    let ok = allowed.split(", ").any(|m| m == method.as_str()) || *method == Method::OPTIONS;
    if ok {
        Ok(route)
    } else {
        Err(NoRoute::Method(allowed))
    }
}

/// Maps a method and path to a route.
pub fn route(method: &Method, path: &str) -> Result<Route, NoRoute> {
    if path == "/api/contents" {
        return contents(method, "");
    }
    if let Some(rest) = path.strip_prefix("/api/contents/") {
        return contents(method, rest);
    }
    let trimmed = path.trim_end_matches('/');
    let parts: Vec<&str> = trimmed.split('/').skip(1).collect();
    let seg = |i: usize| {
        parts
            .get(i)
            .and_then(|s| segment(s))
            .ok_or(NoRoute::NotFound)
    };
    let (route, allowed): (Route, &'static str) = match parts.as_slice() {
        ["api"] => (Route::Api, "GET"),
        ["api", "status"] => (Route::Status, "GET"),
        ["api", "kernelspecs"] => (Route::KernelSpecs, "GET"),
        ["api", "kernelspecs", _] => (Route::KernelSpec(seg(2)?), "GET"),
        ["kernelspecs", _, _] => (Route::KernelSpecResource(seg(1)?, seg(2)?), "GET, HEAD"),
        ["api", "kernels"] => (Route::Kernels, "GET, POST"),
        ["api", "kernels", _] => (Route::Kernel(seg(2)?), "GET, DELETE"),
        ["api", "kernels", _, "interrupt"] => (Route::Interrupt(seg(2)?), "POST"),
        ["api", "kernels", _, "restart"] => (Route::Restart(seg(2)?), "POST"),
        ["api", "kernels", _, "channels"] => (Route::Channels(seg(2)?), "GET"),
        ["api", "sessions"] => (Route::Sessions, "GET, POST"),
        ["api", "sessions", _] => (Route::Session(seg(2)?), "GET, PATCH, DELETE"),
        ["api", "ask", "usage"] => (Route::AskUsage, "GET"),
        _ => return Err(NoRoute::NotFound),
    };
    let ok = allowed.split(", ").any(|m| m == method.as_str()) || *method == Method::OPTIONS;
    if ok {
        Ok(route)
    } else {
        Err(NoRoute::Method(allowed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_parses() {
        let id = "3f2c7a0e-9a51-4c56-8c1e-2d3f4a5b6c7d";
        let cases = [
            (Method::GET, "/api".to_string(), Route::Api),
            (Method::GET, "/api/".to_string(), Route::Api),
            (Method::GET, "/api/status".to_string(), Route::Status),
            (
                Method::GET,
                "/api/kernelspecs".to_string(),
                Route::KernelSpecs,
            ),
            (
                Method::GET,
                "/api/kernelspecs/sandgate-python".to_string(),
                Route::KernelSpec("sandgate-python".into()),
            ),
            (
                Method::GET,
                "/kernelspecs/sandgate-python/logo-64x64.png".to_string(),
                Route::KernelSpecResource("sandgate-python".into(), "logo-64x64.png".into()),
            ),
            (Method::POST, "/api/kernels".to_string(), Route::Kernels),
            (
                Method::DELETE,
                format!("/api/kernels/{id}"),
                Route::Kernel(id.into()),
            ),
            (
                Method::POST,
                format!("/api/kernels/{id}/interrupt"),
                Route::Interrupt(id.into()),
            ),
            (
                Method::POST,
                format!("/api/kernels/{id}/restart"),
                Route::Restart(id.into()),
            ),
            (
                Method::GET,
                format!("/api/kernels/{id}/channels"),
                Route::Channels(id.into()),
            ),
            (
                Method::PATCH,
                "/api/sessions/abc".to_string(),
                Route::Session("abc".into()),
            ),
            (
                Method::GET,
                "/api/contents".into(),
                Route::Contents("".into()),
            ),
            (
                Method::PUT,
                "/api/contents/a%20b/c.ipynb".into(),
                Route::Contents("a b/c.ipynb".into()),
            ),
            (
                Method::GET,
                "/api/contents/%2e%2e/etc".into(),
                Route::Contents("../etc".into()),
            ),
            (
                Method::POST,
                "/api/contents/x.ipynb/checkpoints".into(),
                Route::Checkpoints("x.ipynb".into()),
            ),
            (
                Method::DELETE,
                "/api/contents/d/x.ipynb/checkpoints/checkpoint".into(),
                Route::Checkpoint("d/x.ipynb".into(), "checkpoint".into()),
            ),
        ];
        for (m, p, want) in cases {
            assert_eq!(route(&m, &p), Ok(want), "{m} {p}");
        }
    }

    #[test]
    fn wrong_methods_and_unknown_paths() {
        assert_eq!(
            route(&Method::PUT, "/api/kernels"),
            Err(NoRoute::Method("GET, POST"))
        );
        assert_eq!(route(&Method::GET, "/api/nothing"), Err(NoRoute::NotFound));
        assert_eq!(
            route(&Method::GET, "/kernelspecs/x/%2e%2e"),
            Err(NoRoute::NotFound)
        );
        assert_eq!(
            route(&Method::GET, "/kernelspecs/x/a%2fb"),
            Err(NoRoute::NotFound)
        );
        assert_eq!(
            route(&Method::GET, "/api/kernels//channels"),
            Err(NoRoute::NotFound)
        );
    }
}
