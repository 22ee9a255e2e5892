//! Where a request goes: the URI rewrite (base path + incoming path + query) and the checks
//! that keep the proxy a *reverse* proxy — only the methods in [`FORWARDED_METHODS`] (no
//! CONNECT, no TRACE that an upstream would answer with the injected token), no absolute-form
//! request for another host, no path that leaves the base path. They run before anything is sent, so a refused
//! request never reaches the upstream. Also the way back: a `Location` on the upstream
//! rewritten to the proxy's own address.

use bytes::Bytes;
use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Version};
use std::net::SocketAddr;

/// The methods forwarded, as an `Allow` header lists them. Anything else gets 405: CONNECT
/// would make a tunnel, TRACE and TRACK (and extension methods such as IIS's DEBUG) may be
/// answered with the request as the upstream saw it, injected token included.
pub const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

fn is_forwarded(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
    )
}

/// Why a request target is refused before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetError {
    /// A method not in [`FORWARDED_METHODS`].
    Method,
    ForeignHost,
    PathEscape,
    BadPath,
}

impl TargetError {
    pub fn message(self) -> &'static str {
        match self {
            TargetError::Method => "the method is not forwarded",
            TargetError::ForeignHost => {
                "tollgate is a reverse proxy, not a forward proxy: send the path only (GET /path), not a URL for another host"
            }
            TargetError::PathEscape => {
                "the path would leave the upstream's base path ('..', '%2e%2e' or an encoded slash)"
            }
            TargetError::BadPath => "the request target is not a path",
        }
    }
}

/// Where requests go: the upstream URL split into the parts the rewrite needs.
#[derive(Debug, Clone)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
    /// Base path without a trailing `/`; empty when the URL has no path.
    base_path: String,
    pub(super) host: HeaderValue,
}

impl Target {
    pub fn new(url: &url::Url) -> Result<Target, String> {
        let uri: Uri = url
            .as_str()
            .parse()
            .map_err(|e| format!("upstream url {url} is not a valid URI: {e}"))?;
        let authority = uri.authority().cloned().ok_or("upstream url has no host")?;
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        Ok(Target {
            scheme: uri.scheme().cloned().unwrap_or(Scheme::HTTPS),
            base_path: uri.path().trim_end_matches('/').to_owned(),
            authority,
            host,
        })
    }

    /// A `Location` from the upstream as the client should see it: an absolute URL on the
    /// upstream, or a path, under the base path, becomes the same place behind the proxy
    /// (`proxy` is the `scheme://host[:port]` the client used). Anything else (another host,
    /// a path outside the base path) is left as it is: redirects are never followed here.
    pub fn rewrite_location(&self, location: &HeaderValue, proxy: &str) -> Option<HeaderValue> {
        let value = location.to_str().ok()?;
        let (path, absolute) = if value.starts_with('/') && !value.starts_with("//") {
            (value, false)
        } else {
            let (scheme, rest) = value.split_once("://")?;
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let same = scheme.eq_ignore_ascii_case(self.scheme.as_str())
                && rest[..end].eq_ignore_ascii_case(self.authority.as_str());
            if !same {
                return None;
            }
            (&rest[end..], true)
        };
        let under = path.strip_prefix(self.base_path.as_str())?;
        if !(under.is_empty() || under.starts_with(['/', '?', '#'])) {
            return None; // `/api2` is not under `/api`
        }
        // One leading slash, never `//host` or `/\host`, which a browser reads as another host.
        let rest = under.trim_start_matches(['/', '\\']);
        let under = if under.starts_with(['?', '#']) {
            format!("/{under}")
        } else {
            format!("/{rest}")
        };
        let rewritten = if absolute {
            format!("{proxy}{under}")
        } else {
            under
        };
        HeaderValue::from_str(&rewritten).ok()
    }

    /// The upstream URI (origin-form: base path, path, query) for an incoming request, or
    /// why it is refused.
    ///
    /// `local` is the listener's own address: an absolute-form request naming it is accepted
    /// (some clients send that), one naming any other host is not.
    pub fn rewrite(
        &self,
        method: &Method,
        uri: &Uri,
        version: Version,
        local: SocketAddr,
    ) -> Result<Uri, TargetError> {
        if !is_forwarded(method) {
            return Err(TargetError::Method);
        }
        // HTTP/2 always carries an authority (it replaces Host); HTTP/1 carries one only in
        // absolute-form, which is how forward-proxy requests look.
        if version < Version::HTTP_2 {
            if let Some(authority) = uri.authority() {
                if !names_listener(authority, local) {
                    return Err(TargetError::ForeignHost);
                }
            }
        }
        let path = uri.path();
        if !path.starts_with('/') {
            return Err(TargetError::BadPath);
        }
        check_path(path)?;
        let path_and_query = if self.base_path.is_empty() {
            match uri.path_and_query() {
                Some(pq) => pq.clone(),
                None => PathAndQuery::from_static("/"),
            }
        } else {
            let query = uri.query();
            let mut joined = String::with_capacity(
                self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
            );
            joined.push_str(&self.base_path);
            joined.push_str(path);
            if let Some(q) = query {
                joined.push('?');
                joined.push_str(q);
            }
            PathAndQuery::from_maybe_shared(Bytes::from(joined))
                .map_err(|_| TargetError::BadPath)?
        };
        Ok(Uri::from(path_and_query))
    }

    /// `uri` (origin-form) as an absolute URI on the upstream, as HTTP/2 sends it.
    pub fn absolute(&self, uri: &Uri) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = uri.path_and_query().cloned();
        Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// `htu` of a request to `uri` (origin-form) for a DPoP proof: scheme, authority and
    /// path, no query (RFC 9449 §4.2).
    pub fn htu(&self, uri: &Uri) -> String {
        format!("{}://{}{}", self.scheme, self.authority, uri.path())
    }
}

fn names_listener(authority: &Authority, local: SocketAddr) -> bool {
    let port = authority.port_u16().unwrap_or(80);
    if port != local.port() {
        return false;
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip == local.ip() || (local.ip().is_unspecified() && ip.is_loopback()))
}

/// Refuse paths whose segments would climb out of the base path once the upstream decodes
/// them: `.` and `..` (also percent-encoded, and also followed by `;params`, which servlet
/// containers strip before resolving dots), encoded `/` and `\`, and NUL.
pub fn check_path(path: &str) -> Result<(), TargetError> {
    if !path.contains(['.', '%', '\\']) {
        return Ok(());
    }
    if path.contains('\\') {
        return Err(TargetError::PathEscape);
    }
    for segment in path.split('/') {
        let mut len = 0;
        let mut bytes = segment.bytes();
        let mut dots_only = true;
        let mut in_params = false;
        while let Some(b) = bytes.next() {
            let c = if b == b'%' {
                let hi = bytes.next().and_then(hex);
                let lo = bytes.next().and_then(hex);
                match (hi, lo) {
                    (Some(h), Some(l)) => h << 4 | l,
                    _ => return Err(TargetError::BadPath),
                }
            } else {
                b
            };
            if c == b'/' || c == b'\\' || c == 0 {
                return Err(TargetError::PathEscape);
            }
            if c == b';' {
                in_params = true;
            } else if !in_params {
                dots_only &= c == b'.';
                len += 1;
            }
        }
        if dots_only && (len == 1 || len == 2) {
            return Err(TargetError::PathEscape);
        }
    }
    Ok(())
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Target {
        Target::new(&url::Url::parse(url).unwrap()).unwrap()
    }

    const LOCAL: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

    fn rewrite(t: &Target, uri: &str) -> Result<String, TargetError> {
        t.rewrite(&Method::GET, &uri.parse().unwrap(), Version::HTTP_11, LOCAL)
            .map(|u| u.to_string())
    }

    #[test]
    fn joins_base_path_path_and_query() {
        let t = target("https://api.example.com/api/v1/");
        assert_eq!(
            rewrite(&t, "/Style/1?x=1&y=%20").unwrap(),
            "/api/v1/Style/1?x=1&y=%20"
        );
        assert_eq!(rewrite(&t, "/").unwrap(), "/api/v1/");
        let origin: Uri = "/api/v1/Style/1?x=1".parse().unwrap();
        assert_eq!(
            t.absolute(&origin).to_string(),
            "https://api.example.com/api/v1/Style/1?x=1"
        );
        let t = target("http://127.0.0.1:9000");
        assert_eq!(rewrite(&t, "/a?b").unwrap(), "/a?b");
        assert_eq!(
            t.absolute(&"/a?b".parse().unwrap()).to_string(),
            "http://127.0.0.1:9000/a?b"
        );
    }

    #[test]
    fn refuses_escapes() {
        let t = target("https://api.example.com/api");
        for bad in [
            "/../x",
            "/a/..",
            "/a/%2e%2e/x",
            "/a/%2E%2e",
            "/a/.%2e/",
            "/a/%2e./",
            "/./x",
            "/a%2fb",
            "/a%2F..",
            "/a%5cb",
            "/a\\..\\b",
            "/a%00",
            "/a%zz",
            "/a%2",
            "/..;/x",
            "/a/%2e%2e;a/x",
            "/a/.;x/",
            "/a/..%3b/x",
        ] {
            assert!(rewrite(&t, bad).is_err(), "{bad} should be refused");
        }
        for good in [
            "/a;v=1/b",
            "/x.y;z",
            "/a..b",
            "/...",
            "/a/.well-known/x",
            "/file.txt",
            "/%41",
            "/a%20b",
        ] {
            assert!(rewrite(&t, good).is_ok(), "{good} should pass");
        }
    }

    #[test]
    fn refuses_connect_and_foreign_absolute_form() {
        let t = target("https://api.example.com");
        let connect = t.rewrite(
            &Method::CONNECT,
            &"api.example.com:443".parse().unwrap(),
            Version::HTTP_11,
            LOCAL,
        );
        assert_eq!(connect.unwrap_err(), TargetError::Method);
        for refused in ["TRACE", "TRACK", "DEBUG", "PROPFIND"] {
            let method = Method::from_bytes(refused.as_bytes()).unwrap();
            let refused = t.rewrite(&method, &"/x".parse().unwrap(), Version::HTTP_11, LOCAL);
            assert_eq!(refused.unwrap_err(), TargetError::Method);
        }
        for allowed in FORWARDED_METHODS.split(", ") {
            let method = Method::from_bytes(allowed.as_bytes()).unwrap();
            let allowed = t.rewrite(&method, &"/x".parse().unwrap(), Version::HTTP_11, LOCAL);
            assert!(allowed.is_ok());
        }
        assert_eq!(
            rewrite(&t, "http://evil.example/x").unwrap_err(),
            TargetError::ForeignHost
        );
        assert_eq!(
            rewrite(&t, "http://127.0.0.1:9999/x").unwrap_err(),
            TargetError::ForeignHost
        );
        assert!(rewrite(&t, "http://127.0.0.1:8080/x").is_ok());
        assert!(rewrite(&t, "http://localhost:8080/x").is_ok());
        // HTTP/2 requests always carry an authority.
        let h2 = t.rewrite(
            &Method::GET,
            &"http://anything:1/x".parse().unwrap(),
            Version::HTTP_2,
            LOCAL,
        );
        assert!(h2.is_ok());
    }

    #[test]
    fn locations_on_the_upstream_point_at_the_proxy() {
        let target = Target::new(&"https://erp.example/api/odata".parse().unwrap()).unwrap();
        let proxy = "http://127.0.0.1:8080";
        let at = |l: &str| {
            target
                .rewrite_location(&HeaderValue::from_str(l).unwrap(), proxy)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            at("https://erp.example/api/odata/Items(5)?x=1").as_deref(),
            Some("http://127.0.0.1:8080/Items(5)?x=1")
        );
        assert_eq!(
            at("HTTPS://ERP.example/api/odata").as_deref(),
            Some("http://127.0.0.1:8080/")
        );
        assert_eq!(at("/api/odata/Items").as_deref(), Some("/Items"));
        assert_eq!(at("/api/odata?page=2").as_deref(), Some("/?page=2"));
        // Not ours to rewrite: other hosts, other schemes, outside the base path, relative.
        assert_eq!(at("https://login.example/api/odata/x"), None);
        assert_eq!(at("http://erp.example/api/odata/x"), None);
        assert_eq!(at("https://erp.example/other"), None);
        assert_eq!(at("/api/odata2/x"), None);
        assert_eq!(at("//erp.example/api/odata/x"), None);
        assert_eq!(at("Items(6)"), None);
        // Never a scheme-relative reference to another host.
        assert_eq!(
            at("/api/odata//evil.example/x").as_deref(),
            Some("/evil.example/x")
        );
        assert_eq!(
            at("/api/odata/\\evil.example").as_deref(),
            Some("/evil.example")
        );
    }
}
