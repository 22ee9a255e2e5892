//! `tollgate login NAME`: obtain a refresh token once, by the authorization-code flow with
//! PKCE S256 (RFC 6749 §4.1, RFC 7636) and a loopback redirect (RFC 8252).
//!
//! It prints the authorize URL (and can open a browser), serves `redirect_uri` on loopback,
//! checks `state`, exchanges the code, and saves the tokens to the state store under the
//! refresh lock with a higher generation — so a running `serve` adopts them on its next
//! refresh, and they win over the seed in the config. It never prints a token.

use super::answer::GrantError;
use super::grant::TokenEndpoint;
use super::{lineage_hash, new_record};
use crate::config::{AuthConfig, Config, Grant};
use crate::secret::Secret;
use crate::store::record_name;
use crate::store::{self, StateStore};
use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::Rng;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use url::Url;

/// Why a login did not complete.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Setup(String),
    #[error("the identity server refused the login: {error}{}", .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Denied {
        error: String,
        description: Option<String>,
    },
    #[error("the answer's `state` does not match this login; it was not started here, so it was ignored. Run the login again")]
    StateMismatch,
    #[error("the code could not be exchanged for tokens: {0}")]
    Exchange(GrantError),
    #[error(
        "no answer from the browser within {0:?}; run the login again and finish it in the browser"
    )]
    Timeout(Duration),
    #[error("state store: {0}")]
    Store(String),
}

/// A login in progress: what the browser must be sent to.
pub struct Login {
    pub authorize_url: Url,
    /// The lineage the login starts: the upstream's (`api`) or an identity's (`api@alice`).
    record: String,
    /// The upstream's auth, or the identity's.
    auth: AuthConfig,
    redirect_uri: Url,
    listener: TcpListener,
    state: String,
    verifier: Secret<String>,
    store: Arc<dyn StateStore>,
    endpoint: TokenEndpoint,
}

/// 43–128 characters of the unreserved set (RFC 7636 §4.1); 64 here.
fn random_verifier() -> String {
    const UNRESERVED: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~";
    let mut rng = rand::thread_rng();
    (0..64)
        .map(|_| UNRESERVED[rng.gen_range(0..UNRESERVED.len())] as char)
        .collect()
}

/// `BASE64URL-NOPAD(SHA256(verifier))`.
pub fn challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Listen where `redirect_uri` points, which must be plain HTTP on loopback; with port 0,
/// the URI gets the port the system chose.
async fn bind_redirect(mut redirect_uri: Url) -> Result<(TcpListener, Url), LoginError> {
    let setup = |m: String| LoginError::Setup(m);
    let host = redirect_uri.host_str().unwrap_or_default().to_owned();
    let ip = match host.as_str() {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        h => h
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .ok()
            .filter(|ip| ip.is_loopback())
            .ok_or_else(|| {
                setup(format!(
                    "login.redirect_uri must be a loopback address (http://127.0.0.1:PORT/callback), not {redirect_uri}"
                ))
            })?,
    };
    if redirect_uri.scheme() != "http" {
        return Err(setup(
            "login.redirect_uri must be http:// on loopback".into(),
        ));
    }
    let port = redirect_uri.port_or_known_default().unwrap_or(80);
    let listener = TcpListener::bind((ip, port)).await.map_err(|e| {
        setup(format!(
            "cannot listen on {ip}:{port} for the redirect: {e}"
        ))
    })?;
    if port == 0 {
        let bound = listener
            .local_addr()
            .map_err(|e| setup(e.to_string()))?
            .port();
        let _ = redirect_uri.set_port(Some(bound));
    }
    Ok((listener, redirect_uri))
}

impl Login {
    /// Check the config, bind the redirect listener and build the authorize URL, for the
    /// upstream's own lineage or, with `identity`, for that identity's.
    pub async fn prepare(
        config: &Config,
        name: &str,
        identity: Option<&str>,
    ) -> Result<Login, LoginError> {
        let setup = |m: String| LoginError::Setup(m);
        let up = config.upstream_named(name).map_err(setup)?;
        let (record, auth) = match identity {
            None => (name.to_owned(), up.auth.clone()),
            Some(id) => {
                let identity = up.identity(id).ok_or_else(|| {
                    setup(format!("upstream `{name}` has no identity `{id}`: add [[upstream.identity]] name = \"{id}\""))
                })?;
                (record_name(name, Some(id)), up.identity_auth(identity))
            }
        };
        let login = up.login.as_ref().ok_or_else(|| {
            setup(format!(
                "upstream `{name}` has no [upstream.login]; add authorize_url (and redirect_uri) there"
            ))
        })?;
        if up.auth.grant != Grant::RefreshToken {
            return Err(setup(format!(
                "upstream `{name}` uses grant = \"{}\", which needs no login; login is for grant = \"refresh_token\"",
                up.auth.grant.as_str()
            )));
        }
        let (listener, redirect_uri) = bind_redirect(login.redirect_uri.clone()).await?;
        let store = store::open(&config.state).map_err(|e| LoginError::Store(e.to_string()))?;
        let files = up.read_files().map_err(setup)?;
        let endpoint = TokenEndpoint::new(up, &auth, &files).map_err(setup)?;

        let verifier = random_verifier();
        let state = random_verifier();
        let mut authorize_url = login.authorize_url.clone();
        {
            let mut query = authorize_url.query_pairs_mut();
            query
                .append_pair("response_type", "code")
                .append_pair("client_id", &auth.client_id)
                .append_pair("redirect_uri", redirect_uri.as_str());
            if let Some(scope) = &auth.scope {
                query.append_pair("scope", scope);
            }
            query
                .append_pair("state", &state)
                .append_pair("code_challenge", &challenge(&verifier))
                .append_pair("code_challenge_method", "S256");
            for (k, v) in &login.params {
                query.append_pair(k, v);
            }
        }
        Ok(Login {
            authorize_url,
            record,
            auth,
            redirect_uri,
            listener,
            state,
            verifier: Secret::new(verifier),
            store,
            endpoint,
        })
    }

    /// Serve the redirect until the browser comes back (or `timeout`), exchange the code and
    /// save the tokens.
    pub async fn finish(self, timeout: Duration) -> Result<(), LoginError> {
        let (done, mut outcome) = mpsc::channel::<Result<(), LoginError>>(1);
        let login = Arc::new(Callback {
            login: self,
            done,
            used: Mutex::new(false),
        });
        let accept = {
            let login = Arc::clone(&login);
            async move {
                loop {
                    let Ok((stream, _)) = login.login.listener.accept().await else {
                        continue;
                    };
                    let login = Arc::clone(&login);
                    tokio::spawn(async move {
                        let service = service_fn(move |request| {
                            let login = Arc::clone(&login);
                            async move { Ok::<_, std::convert::Infallible>(login.handle(request).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        };
        let result = tokio::select! {
            _ = accept => unreachable!("the accept loop never ends"),
            result = tokio::time::timeout(timeout, outcome.recv()) => match result {
                Ok(Some(result)) => {
                    // Let the browser's page go out before the process exits.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    result
                }
                Ok(None) => unreachable!("the sender lives in the callback"),
                Err(_) => Err(LoginError::Timeout(timeout)),
            },
        };
        // The refresh lock is let go before the process exits, not left to expire.
        login.login.store.flush().await;
        result
    }
}

struct Callback {
    login: Login,
    done: mpsc::Sender<Result<(), LoginError>>,
    /// One answer is taken; later ones (a reload) are told the login is over.
    used: Mutex<bool>,
}

fn page(status: StatusCode, title: &str, text: &str) -> Response<Full<Bytes>> {
    let html = format!(
        "<!doctype html><meta charset=utf-8><title>tollgate: {title}</title>\
         <body style=\"font-family:sans-serif;margin:3em\"><h1>{title}</h1><p>{text}</p></body>"
    );
    let mut response = Response::new(Full::new(Bytes::from(html)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

impl Callback {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.uri().path() != self.login.redirect_uri.path() {
            return page(
                StatusCode::NOT_FOUND,
                "Not found",
                "This is tollgate's login callback.",
            );
        }
        {
            let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
            if *used {
                return page(
                    StatusCode::GONE,
                    "Login already finished",
                    "You can close this tab.",
                );
            }
            *used = true;
        }
        let query: Vec<(String, String)> =
            url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let (result, response) = if param("state").as_deref() != Some(self.login.state.as_str()) {
            (
                Err(LoginError::StateMismatch),
                page(StatusCode::BAD_REQUEST, "Login refused", "This answer does not belong to the login tollgate started. Run the login again."),
            )
        } else if let Some(error) = param("error") {
            let description = param("error_description");
            (
                Err(LoginError::Denied { error, description }),
                page(
                    StatusCode::OK,
                    "Login failed",
                    "The identity server did not grant access. See the terminal for details.",
                ),
            )
        } else if let Some(code) = param("code") {
            match self.exchange(&code).await {
                Ok(()) => (
                    Ok(()),
                    page(
                        StatusCode::OK,
                        "Logged in",
                        &format!(
                            "tollgate has the tokens for <b>{}</b>. You can close this tab.",
                            self.login.record
                        ),
                    ),
                ),
                Err(e) => (
                    Err(e),
                    page(
                        StatusCode::OK,
                        "Login failed",
                        "The code could not be exchanged for tokens. See the terminal for details.",
                    ),
                ),
            }
        } else {
            (
                Err(LoginError::Denied {
                    error: "invalid_response".into(),
                    description: Some("the redirect carried neither a code nor an error".into()),
                }),
                page(
                    StatusCode::BAD_REQUEST,
                    "Login failed",
                    "The redirect carried neither a code nor an error.",
                ),
            )
        };
        let _ = self.done.try_send(result);
        response
    }

    /// Exchange the code and save the tokens durably, under the refresh lock.
    async fn exchange(&self, code: &str) -> Result<(), LoginError> {
        let login = &self.login;
        let name = &login.record;
        let store_error = |e: crate::store::StoreError| LoginError::Store(e.to_string());
        // As long as a holder may keep it (waiting for its answer), or a store that lost its
        // data may refuse it.
        let auth = &login.auth;
        let lock = login
            .store
            .lock_refresh(
                name,
                auth.timeout + auth.answer_timeout + super::LOCK_MARGIN,
                auth.timeout + super::LOCK_MARGIN,
            )
            .await
            .map_err(store_error)?;
        // A new login starts a new lineage, with a DPoP key of its own.
        let dpop = match login.endpoint.dpop() {
            true => Some(
                super::dpop::DpopKey::generate()
                    .map_err(|e| LoginError::Exchange(GrantError::transient(e)))?,
            ),
            false => None,
        };
        let issued = login
            .endpoint
            .exchange_code(
                code,
                login.redirect_uri.as_str(),
                &login.verifier,
                dpop.as_ref(),
            )
            .await
            .map_err(LoginError::Exchange)?;
        if issued.refresh_token.is_none() {
            return Err(LoginError::Exchange(GrantError::Refused {
                code: "no_refresh_token".into(),
                description: Some("the identity server issued no refresh token; ask for offline_access in auth.scope".into()),
            }));
        }
        let previous = match login.store.load_token(name).await {
            Ok(stored) => stored.map_or(0, |r| r.generation),
            // The operator starting over: said, and replaced.
            Err(crate::store::StoreError::Sealed {
                generation, why, ..
            }) => {
                tracing::warn!(upstream = %name, generation, %why, "the stored token record does not open; this login replaces it");
                generation
            }
            Err(e) => return Err(store_error(e)),
        };
        let mut issued = issued;
        issued.logged_in = true;
        let lineage = lineage_hash(&login.auth);
        let key = dpop.map(|key| key.stored().clone());
        let record = new_record(&lineage, issued, None, previous, super::unix_ms(), key);
        login
            .store
            .save_token(name, &record, &lock)
            .await
            .map_err(store_error)?;
        tracing::info!(upstream = %name, generation = record.generation, "login saved to the state store");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_matches_rfc7636_appendix_b() {
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let v = random_verifier();
        assert_eq!(v.len(), 64);
        assert!(v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)));
    }
}
