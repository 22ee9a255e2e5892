//! TLS both ways, with rustls: the HTTPS listener and its certificate re-read on SIGHUP
//! ([`listener`]); what an upstream's connections trust, and why a certificate was refused, in
//! words ([`upstream`]).

pub mod listener;
pub mod upstream;

pub use listener::{answer_plain_http, CertStore};
