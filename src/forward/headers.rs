//! The header rewrite on the way up (hop-by-hop removed, Host, Authorization, Via) and on
//! the way back (hop-by-hop removed).

use super::Target;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies drop, and `Upgrade`
/// (tollgate does not switch protocols). `Trailer` is not one (RFC 9110 §6.6.2): it announces
/// the trailer fields, which pass through, and hyper sends trailer fields over HTTP/1.1 only
/// when it announces them.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Remove hop-by-hop headers, including every header named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (most messages have none of these, or only Connection)
    // instead of a lookup for each.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Every Connection header counts. `close` and `keep-alive` name no other header:
        // collect (and allocate) only when there are other names.
        let named = || {
            headers
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("").split(','))
                .map(str::trim)
                .filter(|n| {
                    !n.eq_ignore_ascii_case("close") && !n.eq_ignore_ascii_case("keep-alive")
                })
        };
        if named().any(|n| !n.is_empty()) {
            let named: Vec<HeaderName> = named()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect();
            for name in named {
                headers.remove(name);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

fn via(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 tollgate",
        Version::HTTP_10 => "1.0 tollgate",
        Version::HTTP_2 => "2 tollgate",
        Version::HTTP_3 => "3 tollgate",
        _ => "1.1 tollgate",
    })
}

/// Rewrite the client's headers for the upstream: the client's credentials go, the token comes.
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    version: Version,
    target: &Target,
    authorization: &HeaderValue,
) {
    remove_hop_by_hop(headers);
    headers.insert(header::HOST, target.host.clone());
    headers.insert(header::AUTHORIZATION, authorization.clone());
    headers.append(header::VIA, via(version));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Target {
        Target::new(&url::Url::parse(url).unwrap()).unwrap()
    }

    #[test]
    fn header_rewrite_drops_hop_by_hop_and_client_credentials() {
        let t = target("https://api.example.com/base");
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer client-own".parse().unwrap());
        h.insert(
            header::CONNECTION,
            "keep-alive, X-Secret-Hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Basic abc".parse().unwrap());
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        h.insert("continuepath", "/next".parse().unwrap());
        rewrite_request_headers(
            &mut h,
            Version::HTTP_11,
            &t,
            &HeaderValue::from_static("Bearer T"),
        );
        assert_eq!(h[header::AUTHORIZATION], "Bearer T");
        assert_eq!(h.get_all(header::AUTHORIZATION).iter().count(), 1);
        assert_eq!(h[header::HOST], "api.example.com");
        assert_eq!(h[header::VIA], "1.1 tollgate");
        assert_eq!(h["continuepath"], "/next");
        for gone in [
            "connection",
            "x-secret-hop",
            "keep-alive",
            "te",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
    }

    /// Every Connection header counts, in any case; `close` names nothing; a message with
    /// no hop-by-hop header is left as it is.
    #[test]
    fn hop_by_hop_names_come_from_every_connection_header() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "close".parse().unwrap());
        h.append(header::CONNECTION, " X-One ,x-two".parse().unwrap());
        h.insert("x-one", "1".parse().unwrap());
        h.insert("x-two", "2".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-three", "3".parse().unwrap());
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["x-three"]);

        let mut plain = HeaderMap::new();
        plain.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        plain.insert("close", "not a hop".parse().unwrap());
        let before = plain.clone();
        remove_hop_by_hop(&mut plain);
        assert_eq!(plain, before);
    }
}
