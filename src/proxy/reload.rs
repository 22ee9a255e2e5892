//! [`Proxy::reload`] (SIGHUP), and [`Proxy::start`] as a reload from nothing. A reload first
//! prepares everything that can fail — reading files, binding new sockets, loading the day's
//! count — and changes nothing until all of it has succeeded, so an invalid config leaves the
//! running one in force. Then, per upstream (by name), it keeps what is unchanged:
//!
//! - the token cache while `[upstream.auth]`, the CA and the pin are unchanged; otherwise a
//!   [`TokenCache::successor`] that, for the same lineage, keeps the running token in use
//!   while it fetches the next with the new settings; the old cache is retired, and a refresh
//!   it has in the air lands, saves and hands its token over;
//! - the quota's counts, handed over to a successor ([`Quota::successor`]);
//! - the pooled upstream connections while the URL, timeouts and CA are unchanged;
//! - the listener while `listen` is unchanged, or handed to the upstream that now listens on
//!   its address, with open connections kept; each request is served by the config in force
//!   when it arrives.
//!
//! Listeners no upstream uses any more stop accepting and drain their connections; a removed
//! upstream gives its daily counts back once none of its requests is in flight.

use super::{flush_task, give_back, refresh_task, Proxy, Running, StartError, SHUTDOWN_GRACE};
use crate::admin::{self, Admin, AdminKey};
use crate::body::Budget;
use crate::config::{Config, UpstreamConfig, UpstreamFiles};
use crate::counters::RequestStats;
use crate::forward;
use crate::pipeline::{Caches, Pipeline};
use crate::quota::{Limits, Quota};
use crate::seal::Keys;
use crate::server::{Bound, Listener, Site, Workers};
use crate::tls::CertStore;
use crate::token::TokenCache;
use crate::usage::Usage;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What a reload changed, by upstream name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// A quota replaced by a reload: the upstream's name, the old quota and its successor.
type Handover = (String, Arc<Quota>, Arc<Quota>);

/// One upstream of the new config, with everything that could fail already done.
struct Prepared {
    config: UpstreamConfig,
    files: UpstreamFiles,
    /// The running cache, or a new one (whose refresh task is not started yet).
    tokens: Arc<TokenCache>,
    /// The same for each identity, by name.
    identities: BTreeMap<String, Arc<TokenCache>>,
    quota: Arc<Quota>,
    certs: Option<Arc<CertStore>>,
    /// One per worker.
    forwards: Vec<forward::Upstream>,
    socket: Socket,
}

/// Where a prepared upstream listens.
enum Socket {
    /// The listener of this running upstream.
    Keep(String),
    New(Bound),
}

impl Proxy {
    /// Put `config` in force without dropping connections or losing token and quota state
    /// (SIGHUP). When any part of it cannot be put in force, nothing changes and the reason is
    /// returned.
    pub async fn reload(&mut self, config: &Config) -> Result<Reloaded, StartError> {
        if !config.state.same_store(&self.config.state) {
            let shown = |c: &Config| c.state.location().map_or_else(|e| e, |l| l.shown());
            return Err(StartError::StoreLocation(format!(
                "[state] changed (now `{}`, was `{}`); moving the state store takes a restart",
                shown(config),
                shown(&self.config)
            )));
        }
        let mut changes = Reloaded::default();
        for up in &config.upstreams {
            match self.config.upstream(&up.name) {
                None => changes.added.push(up.name.clone()),
                Some(old) if old != up => changes.changed.push(up.name.clone()),
                Some(_) => {}
            }
        }
        changes.removed = self
            .config
            .upstreams
            .iter()
            .filter(|old| config.upstream(&old.name).is_none())
            .map(|old| old.name.clone())
            .collect();
        let keys = (config.state.key != self.config.state.key
            || config.state.previous_keys != self.config.state.previous_keys)
            .then(|| config.state.keys())
            .transpose()
            .map_err(StartError::StoreLocation)?;
        self.apply(config, keys).await?;
        Ok(changes)
    }

    /// Prepare every upstream of `config`, then switch to them; records are sealed and opened
    /// with `keys` (when they changed) from the same moment, before any new cache refreshes.
    pub(super) async fn apply(
        &mut self,
        config: &Config,
        keys: Option<Keys>,
    ) -> Result<(), StartError> {
        // Listeners drained since the last reload.
        while self.retiring.try_join_next().is_some() {}
        let mut claimed = BTreeSet::new();
        let mut prepared = Vec::with_capacity(config.upstreams.len());
        for up in &config.upstreams {
            prepared.push(self.prepare(up, &mut claimed).await?);
        }
        let admin = match (&config.admin, &self.admin) {
            (Some(a), Some(_))
                if self.config.admin.as_ref().map(|o| o.listen) == Some(a.listen) =>
            {
                None
            }
            (Some(a), _) => Some(
                Bound::bind(a.listen, 1)
                    .map_err(|source| self.bind_error("admin", a.listen, source))?,
            ),
            (None, _) => None,
        };
        // Nothing below fails.
        if let Some(keys) = keys {
            let sealing = keys.fingerprint().unwrap_or("none").to_owned();
            self.store.set_keys(keys);
            tracing::info!(key = %sealing, "state keys reloaded: token records are sealed with [state] key from their next save");
        }
        let handovers = self.commit(prepared);
        self.switch_admin(config, admin);
        self.config = config.clone();
        for (name, old, new) in handovers {
            if let Err(e) = old.hand_over(&new).await {
                tracing::warn!(upstream = %name, error = %e, "could not give back the daily counts in hand; they stay spent for today");
            }
        }
        Ok(())
    }

    /// Everything for `up` that can fail: files, the token cache, the day's count, sockets.
    async fn prepare(
        &self,
        up: &UpstreamConfig,
        claimed: &mut BTreeSet<String>,
    ) -> Result<Prepared, StartError> {
        let fail = |reason: String| StartError::Upstream {
            upstream: up.name.clone(),
            reason,
        };
        let files = up.read_files().map_err(&fail)?;
        let old = self.upstreams.get(&up.name);
        let (tokens, identities) = self.caches(up, old, &files).map_err(&fail)?;
        let (budgets, own_limits) = (up.budgets(), up.identity_limits());
        let limits = Limits {
            budgets: &budgets,
            identities: &own_limits,
        };
        let quota = match old {
            Some(o) if o.quota.enforces(up.quota.as_ref(), limits) => Arc::clone(&o.quota),
            _ => {
                let quota = match old {
                    Some(o) => o.quota.successor(up.quota.as_ref(), limits),
                    None => Quota::new(
                        &up.name,
                        up.quota.as_ref(),
                        limits,
                        Arc::clone(&self.store),
                        self.clock.clone(),
                    ),
                };
                quota.load().await?;
                Arc::new(quota)
            }
        };
        let same_forwarding = old.is_some_and(|o| {
            o.config.url == up.url
                && o.config.timeout == up.timeout
                && o.config.limits.connect_timeout == up.limits.connect_timeout
                && o.config.limits.max_upstream_connections == up.limits.max_upstream_connections
                && o.files.ca == files.ca
                && o.files.api_cert == files.api_cert
                && o.config.pin_sha256 == up.pin_sha256
        });
        let forwards = match self.listeners.get(&up.name) {
            // Sharing the pools keeps their warm connections.
            Some(listener) if same_forwarding => listener
                .sites()
                .map(|site| site.handler.upstream().clone())
                .collect(),
            _ => {
                let workers = self.workers.len();
                let total = up.limits.max_upstream_connections;
                let mut forwards = Vec::with_capacity(workers);
                for worker in 0..workers {
                    let connections = forward::share(total, workers, worker);
                    let forward = forward::Upstream::new(up, &files, connections);
                    forwards.push(forward.map_err(&fail)?);
                }
                forwards
            }
        };
        let certs = match (&up.tls, old) {
            (Some(_), Some(o)) if o.config.tls == up.tls => o.certs.clone(),
            (Some(t), _) => Some(CertStore::open(&t.cert, &t.key).map_err(&fail)?),
            (None, _) => None,
        };
        Ok(Prepared {
            socket: self.socket_for(up, claimed)?,
            config: up.clone(),
            files,
            tokens,
            identities,
            quota,
            certs,
            forwards,
        })
    }

    /// The running listener `up` can take over, or a new socket: the upstream's own listener
    /// while its address is unchanged, else one of another upstream on the same fixed address.
    fn socket_for(
        &self,
        up: &UpstreamConfig,
        claimed: &mut BTreeSet<String>,
    ) -> Result<Socket, StartError> {
        let same_address = |name: &String| {
            self.upstreams
                .get(name)
                .is_some_and(|o| o.config.listen == up.listen)
                && !claimed.contains(name)
        };
        let keep = if same_address(&up.name) {
            Some(up.name.clone())
        } else if up.listen.port() != 0 {
            self.listeners.keys().find(|n| same_address(n)).cloned()
        } else {
            None
        };
        match keep {
            Some(name) if self.listeners.contains_key(&name) => {
                claimed.insert(name.clone());
                Ok(Socket::Keep(name))
            }
            _ => Bound::bind(up.listen, self.workers.len())
                .map(Socket::New)
                .map_err(|source| self.bind_error(&up.name, up.listen, source)),
        }
    }

    /// A bind error, saying so when it is this tollgate that holds the port.
    fn bind_error(&self, upstream: &str, addr: SocketAddr, source: std::io::Error) -> StartError {
        let clashes = |held: SocketAddr| {
            held.port() == addr.port()
                && (held.ip() == addr.ip()
                    || held.ip().is_unspecified()
                    || addr.ip().is_unspecified())
        };
        let holder = self
            .listeners
            .iter()
            .find(|(_, l)| clashes(l.local))
            .map(|(name, l)| format!("upstream `{name}` on {}", l.local))
            .or_else(|| {
                let admin = self.admin.as_ref()?;
                clashes(admin.local).then(|| format!("[admin] on {}", admin.local))
            });
        match holder {
            Some(holder) if source.kind() == std::io::ErrorKind::AddrInUse => {
                StartError::Upstream {
                    upstream: upstream.to_owned(),
                    reason: format!(
                    "cannot listen on {addr}: the port is still held by this tollgate's {holder}; \
                     a listener keeps its socket only at the same address, so moving it to another \
                     address on the same port, or swapping it with [admin], takes a restart"
                ),
                }
            }
            _ => StartError::Bind {
                upstream: upstream.to_owned(),
                addr,
                source,
            },
        }
    }

    /// Switch every listener to the prepared upstreams; stop what the new config dropped.
    /// Returns the quotas that have a successor now, to be handed over.
    fn commit(&mut self, prepared: Vec<Prepared>) -> Vec<Handover> {
        let mut old_upstreams = std::mem::take(&mut self.upstreams);
        let mut old_listeners = std::mem::take(&mut self.listeners);
        let mut handovers = Vec::new();
        for p in prepared {
            let old = old_upstreams.remove(&p.config.name);
            handovers.extend(self.put_in_force(p, old, &mut old_listeners));
        }
        // What no upstream of the new config took over: stop refreshing, drain, give back.
        for (name, gone) in old_upstreams {
            let drained = old_listeners.remove(&name).map(Listener::stop);
            self.retire_upstream(name, gone, drained);
        }
        for (_, listener) in old_listeners {
            self.retiring.spawn(listener.stop());
        }
        handovers
    }

    /// Serve `p` on its socket (kept from `old_listeners`, or new), continuing what `old`
    /// ran under the same name. Returns the quota handover, when the quota was replaced.
    fn put_in_force(
        &mut self,
        p: Prepared,
        mut old: Option<Running>,
        old_listeners: &mut BTreeMap<String, Listener<Pipeline>>,
    ) -> Option<Handover> {
        let stats = match &old {
            Some(o) => o.stats.clone(),
            None => (0..self.workers.len())
                .map(|_| Arc::new(RequestStats::default()))
                .collect(),
        };
        let usage = match &old {
            Some(o) => Arc::clone(&o.usage),
            None => Arc::new(Usage::new(
                &p.config.name,
                Arc::clone(&self.store),
                self.clock.clone(),
            )),
        };
        let keys = p.config.inbound.iter().flat_map(|i| i.keys.iter());
        let labels = keys.enumerate().map(|(i, k)| k.label(i)).collect();
        usage.serve(stats.clone(), Arc::clone(&p.quota), labels);
        let local = match &p.socket {
            Socket::Keep(from) => old_listeners[from].local,
            Socket::New(bound) => bound.local,
        };
        let tls = p.certs.as_ref().map(CertStore::acceptor);
        let workers = p.forwards.len();
        let buffered = usize::try_from(p.config.limits.max_buffered).unwrap_or(usize::MAX);
        let sites: Vec<Site<Pipeline>> = p
            .forwards
            .into_iter()
            .zip(&stats)
            .enumerate()
            .map(|(worker, (forward, stats))| {
                let budget = forward::share(buffered, workers, worker);
                let pipeline = Pipeline::new(
                    &p.config,
                    local,
                    forward,
                    Caches {
                        own: Arc::clone(&p.tokens),
                        identities: &p.identities,
                    },
                    Arc::clone(&p.quota),
                    Arc::clone(stats),
                    Budget::new(budget as u64),
                );
                Site::new(pipeline, &p.config.limits, tls.clone())
            })
            .collect();
        let listener = match p.socket {
            Socket::Keep(from) => {
                let listener = old_listeners.remove(&from).expect("claimed once");
                listener.swap(sites);
                listener.resize_cap(p.config.limits.max_connections);
                listener
            }
            Socket::New(bound) => {
                tracing::info!(upstream = %p.config.name, listen = %local, url = %p.config.url, workers = self.workers.len(), "listening");
                let cap = Some(p.config.limits.max_connections);
                Listener::serve(bound, sites, cap, &self.workers, SHUTDOWN_GRACE)
            }
        };
        let mut handover = None;
        let identities = self.keep_identities(&p.identities, old.as_mut());
        let (refresh, flushing) = match old {
            Some(o) => {
                if !Arc::ptr_eq(&o.quota, &p.quota) {
                    handover = Some((p.config.name.clone(), o.quota, Arc::clone(&p.quota)));
                }
                let refresh = if Arc::ptr_eq(&o.tokens, &p.tokens) {
                    o.refresh
                } else {
                    o.tokens.retire(&p.tokens);
                    self.retire_tokens(o.tokens, o.refresh);
                    refresh_task(&p.tokens)
                };
                (refresh, o.flushing)
            }
            None => (refresh_task(&p.tokens), flush_task(&usage)),
        };
        let name = p.config.name.clone();
        self.listeners.insert(name.clone(), listener);
        let running = Running {
            config: p.config,
            files: p.files,
            tokens: p.tokens,
            refresh,
            identities,
            quota: p.quota,
            certs: p.certs,
            stats,
            usage,
            flushing,
        };
        self.upstreams.insert(name, running);
        handover
    }

    /// An upstream the new config dropped: stop refreshing; once its listener has drained
    /// and none of its requests is in flight, give its daily counts back.
    fn retire_upstream(
        &mut self,
        name: String,
        gone: Running,
        drained: Option<impl std::future::Future<Output = ()> + Send + 'static>,
    ) {
        gone.tokens.close();
        self.retire_tokens(gone.tokens, gone.refresh);
        for (_, (tokens, task)) in gone.identities {
            tokens.close();
            self.retire_tokens(tokens, task);
        }
        let (quota, stats, flushing) = (gone.quota, gone.stats, gone.flushing);
        self.retiring.spawn(async move {
            if let Some(drained) = drained {
                drained.await;
            }
            // Requests that arrived before the reload (on a listener another upstream took
            // over) may still be spending, through this quota or an older one.
            let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
            let in_flight = || stats.iter().map(|s| s.in_flight()).sum::<u64>();
            while in_flight() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            give_back(&name, &quota).await;
            // A last flush of the day's use.
            let _ = flushing.stop.send(true);
            let _ = flushing.handle.await;
        });
    }

    /// Start, keep or stop the admin listener, and show it the upstreams now running.
    fn switch_admin(&mut self, config: &Config, bound: Option<Bound>) {
        let upstreams = self
            .upstreams
            .iter()
            .map(|(name, u)| admin::Upstream {
                name: name.clone(),
                tokens: Arc::clone(&u.tokens),
                identities: u.identities.values().map(|(c, _)| Arc::clone(c)).collect(),
                quota: Arc::clone(&u.quota),
                stats: u.stats.clone(),
                usage: Arc::clone(&u.usage),
            })
            .collect();
        let key = config.admin.as_ref().and_then(|a| a.key.as_ref());
        let site = || {
            Site::new(
                Admin::new(upstreams, Arc::clone(&self.store), key.map(AdminKey::new)),
                &crate::config::LimitsConfig::default(),
                None,
            )
        };
        if config.admin.is_none() {
            if let Some(old) = self.admin.take() {
                self.retiring.spawn(old.stop());
            }
            return;
        }
        match bound {
            None => {
                if let Some(admin) = &self.admin {
                    admin.swap(vec![site()]);
                }
            }
            Some(bound) => {
                tracing::info!(listen = %bound.local, "admin listening");
                let here = Workers::current();
                let listener = Listener::serve(bound, vec![site()], None, &here, SHUTDOWN_GRACE);
                if let Some(old) = self.admin.replace(listener) {
                    self.retiring.spawn(old.stop());
                }
            }
        }
    }
}
