//! What other replicas announce on Redis pub/sub — new generations of a token record, holds
//! after an upstream's 429 — handed to this process's subscribers by channel. One listener per
//! store, reconnecting with backoff and pinging, so a vanished server is noticed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// How long the announcement listener waits to connect, or for an answer to its ping.
const LISTENER_TIMEOUT: Duration = Duration::from_secs(5);

/// Listens for what other replicas announce (new generations, holds after a 429), and hands
/// each value to the subscribers of its channel; reconnects with backoff, and ends with the
/// store.
pub(super) struct Listener {
    pub(super) client: redis::Client,
    pub(super) patterns: Vec<String>,
    pub(super) announced: std::sync::Weak<Mutex<HashMap<String, watch::Sender<u64>>>>,
    /// Closed when the store is dropped.
    pub(super) open: watch::Receiver<()>,
    /// How often a silent connection is pinged (`[state] heartbeat`).
    pub(super) ping_every: Duration,
}

impl Listener {
    pub(super) async fn run(mut self) {
        let mut closed = self.open.clone();
        tokio::select! {
            _ = closed.changed() => {}
            _ = self.listen() => {}
        }
    }

    async fn listen(&mut self) {
        let mut pause = Duration::from_millis(100);
        loop {
            let connect = tokio::time::timeout(LISTENER_TIMEOUT, self.client.get_async_pubsub());
            if let Ok(Ok(mut pubsub)) = connect.await {
                if pubsub.psubscribe(&self.patterns).await.is_ok() {
                    pause = Duration::from_millis(100);
                    // What was announced while this listener was away is unknown (a Redis
                    // that came back empty, say): every subscriber looks at the store again.
                    if !self.nudge_all() {
                        return;
                    }
                    if !self.receive(pubsub).await {
                        return;
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Deliver what comes on `pubsub` until the connection fails or stops answering a ping
    /// (a subscriber sends nothing otherwise, so a vanished server would go unnoticed); false
    /// once the store is gone.
    async fn receive(&self, pubsub: redis::aio::PubSub) -> bool {
        use futures_util::StreamExt;
        let (mut sink, mut messages) = pubsub.split();
        let mut ping = tokio::time::interval(self.ping_every);
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => {
                        if !self.deliver(message.get_channel_name(), message.get_payload()) {
                            return false;
                        }
                    }
                    None => return true,
                },
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(LISTENER_TIMEOUT, sink.ping::<redis::Value>());
                    if !matches!(pong.await, Ok(Ok(_))) {
                        return true;
                    }
                }
            }
        }
    }

    /// Hand `value` to the subscribers of `channel` (a lower generation, or the same again, is
    /// news too: the store lost data); false once the store is gone.
    fn deliver(&self, channel: &str, value: redis::RedisResult<u64>) -> bool {
        let Some(announced) = self.announced.upgrade() else {
            return false;
        };
        let Ok(value) = value else {
            return true;
        };
        if let Some(sender) = announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(channel)
        {
            // Every announcement is news, the same value again too (a write-back).
            sender.send_replace(value);
        }
        true
    }

    /// Tell every subscriber to look at the store again; false once the store is gone.
    fn nudge_all(&self) -> bool {
        let Some(announced) = self.announced.upgrade() else {
            return false;
        };
        for sender in announced.lock().unwrap_or_else(|p| p.into_inner()).values() {
            sender.send_modify(|_| {});
        }
        true
    }
}
