//! The worker threads that serve every listener, and the sockets they accept on: one
//! single-threaded runtime per thread, and per listener one `SO_REUSEPORT` socket per worker,
//! so the kernel spreads connections between them and a request is accepted, forwarded and
//! answered on one thread.

use super::stopped;
use std::net::SocketAddr;
use tokio::runtime::Handle;
use tokio::sync::watch;

/// Bind `count` listeners on `addr` with `SO_REUSEPORT`, so each worker accepts on its own
/// socket and the kernel spreads connections between them. Port 0 binds once, then the rest
/// join the port the first one got.
pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    if count > 1 && addr.port() != 0 {
        // SO_REUSEPORT would let a second tollgate share the port and take half the
        // connections; a plain bind first proves the port is free.
        drop(std::net::TcpListener::bind(addr)?);
    }
    for _ in 0..count {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if count > 1 {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        let listener = socket.listen(1024)?.into_std()?;
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// The threads that serve requests: each a single-threaded runtime running the listener
/// tasks spawned onto it, so a request is accepted, forwarded and answered on one thread.
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    exit: watch::Sender<bool>,
}

impl Workers {
    /// The caller's runtime, alone.
    pub fn current() -> Workers {
        Workers {
            handles: vec![Handle::current()],
            threads: Vec::new(),
            exit: watch::channel(false).0,
        }
    }

    /// `count` threads of their own (at least one). One thread serves too, rather than the
    /// caller's runtime: requests then run on a single-threaded runtime as with more, which
    /// costs 860 to 1,100 instructions a request less than the caller's multi-threaded one
    /// (its scheduler times every poll; benches/instructions.sh, BENCHMARKS.md).
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let count = count.max(1);
        let (exit, _) = watch::channel(false);
        let mut workers = Workers {
            handles: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
            exit,
        };
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let mut exit = workers.exit.subscribe();
            let thread = std::thread::Builder::new()
                .name(format!("tollgate-worker-{i}"))
                .spawn(move || runtime.block_on(stopped(&mut exit)))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// The runtime of each worker, in order.
    pub(super) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// End the threads, once every listener has drained.
    pub async fn stop(self) {
        let _ = self.exit.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Sockets bound for a listener, not yet served.
pub struct Bound {
    pub local: SocketAddr,
    pub(super) sockets: Vec<std::net::TcpListener>,
}

impl Bound {
    /// One socket on `addr` per worker (see [`bind`]).
    pub fn bind(addr: SocketAddr, workers: usize) -> std::io::Result<Bound> {
        let sockets = bind(addr, workers)?;
        Ok(Bound {
            local: sockets[0].local_addr()?,
            sockets,
        })
    }
}
