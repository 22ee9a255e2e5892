//! A JWS in compact form (RFC 7515 §7.1), taken apart for the simulators' checks: the header
//! and claims as JSON, the signature's bytes, and the signed part.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;

pub(crate) struct Compact<'a> {
    pub header: serde_json::Value,
    pub claims: serde_json::Value,
    pub signature: Vec<u8>,
    /// `header.claims`, what the signature covers.
    pub signed: &'a [u8],
}

/// `jwt` taken apart, or why it is not a compact JWS of JSON parts.
pub(crate) fn parse(jwt: &str) -> Result<Compact<'_>, &'static str> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWS in compact form");
    };
    let json = |part: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&B64.decode(part).ok()?).ok()
    };
    let (Some(header), Some(claims), Ok(signature)) = (json(h), json(c), B64.decode(s)) else {
        return Err("a part is not base64url JSON");
    };
    Ok(Compact {
        header,
        claims,
        signature,
        signed: &jwt.as_bytes()[..h.len() + 1 + c.len()],
    })
}
