//! Several ingest nodes on one JetStream log (store.backend = "jetstream").
//!
//! Each vehicle has one **owner** node, which runs the vehicle's reassembly and writes its
//! records; ownership is a key of the meta bucket (`o.<vehicle hex>` = node id), taken by
//! compare-and-set. Bearers of one vehicle may land on any nodes: a node routes what a
//! bearer brings (the Hello's streams, frames) to the owner's writer, its own or, over NATS
//! request/reply, another node's, and relays the owner's answer (durable, refused) back to
//! the bearer.
//!
//! - A vehicle nobody owns is taken by the first node that hears from it.
//! - An owner that does not answer because it is gone (NATS: no responders on its forward
//!   subject, the moment its connection drops) is replaced by the node that noticed, with a
//!   compare-and-set from the dead owner's entry, so two nodes cannot both take over.
//! - The new owner restores the vehicle's reassembly from the log (it follows the log, so it
//!   holds every record the old owner stored); the agents re-send what was not acknowledged.
//! - The store fences writes per vehicle: should two nodes believe they own one vehicle (a
//!   node cut off from NATS a moment), the late writer's batch is refused whole and it
//!   catches up: records are never interleaved or stored twice.
//!
//! Node ids are unique per process (name plus random suffix): a restarted node is a new node
//! and re-acquires vehicles like any other.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt as _;
use prost::Message as _;
use relay_proto::cluster::v1::{
    Busy, Durable, Forward, ForwardReply, ForwardedFrame, ForwardedStreams, NotOwner,
    StreamsAccepted, forward::Body, forward_reply::Outcome,
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::JetStreamOptions;
use crate::store::StoreError;
use crate::writer::{StreamsRefused, WriterCmd};

/// Forwarded frames this node holds for other nodes' vehicles at once (their memory).
const MAX_FORWARDING: usize = 8192;
/// Forwarded requests an owner serves at once; more wait in the subscription's bounded
/// buffer (beyond it the NATS client drops them and the sender, timing out, asks again).
const MAX_SERVING: usize = 8192;
/// Nodes whose departure this node tracks at once (node ids are per process: one per node
/// start seen). Beyond it the record is cleared: a request then waits its timeout, as before.
const MAX_TRACKED_NODES: usize = 1024;
/// Attempts to hand one command to the vehicle's owner before it is dropped (the agent
/// re-sends an unacknowledged frame; a Hello fails and the bearer redials).
const MAX_ATTEMPTS: usize = 20;

/// Who owns a vehicle, as the bucket says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    node: String,
    revision: u64,
}

/// Where a command goes.
enum Route {
    Local,
    Remote(String),
}

struct Inner {
    node: String,
    client: async_nats::Client,
    kv: kv::Store,
    subject_prefix: String,
    timeout: Duration,
    writer: mpsc::Sender<WriterCmd>,
    owners: Mutex<HashMap<String, Owner>>,
    /// Vehicles whose reassembly this node's writer has restored since it took them.
    adopted: tokio::sync::Mutex<HashSet<String>>,
    /// Per owner node asked: cancelled once it is found gone, so the requests already waiting
    /// on it ask again at once instead of after their timeout (a dead node never answers).
    departures: Mutex<HashMap<String, CancellationToken>>,
    forwarding: Arc<Semaphore>,
    serving: Arc<Semaphore>,
    stop: CancellationToken,
}

/// This node's part of the cluster: the router in front of the writer.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.node)
            .finish()
    }
}

fn owner_key(vehicle: &str) -> String {
    let mut key = String::with_capacity(2 + vehicle.len() * 2);
    key.push_str("o.");
    for b in vehicle.bytes() {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

fn vehicle_of_key(key: &str) -> Option<String> {
    let hex = key.strip_prefix("o.")?;
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn cmd_vehicle(cmd: &WriterCmd) -> Arc<str> {
    cmd.vehicle().clone()
}

impl Cluster {
    /// Joins the cluster as a new node: connects, serves forwarded commands, follows who
    /// owns what, and routes what `writer` would get. Returns the node and the sender the
    /// QUIC side uses in place of the writer's.
    pub async fn start(
        opts: &JetStreamOptions,
        writer: mpsc::Sender<WriterCmd>,
        queue: usize,
        stop: CancellationToken,
    ) -> Result<(Self, mpsc::Sender<WriterCmd>), StoreError> {
        let node = format!("{}-{}", opts.client_name, random_suffix()?);
        let client = crate::store::jetstream::connect(opts).await?;
        let js = async_nats::jetstream::new(client.clone());
        let kv = js
            .get_key_value(&opts.meta_bucket)
            .await
            .map_err(|e| StoreError::js("opening the meta bucket", e))?;
        let inner = Arc::new(Inner {
            subject_prefix: format!("relay-cluster.{}", opts.stream),
            node,
            client,
            kv,
            timeout: opts.request_timeout,
            writer,
            owners: Mutex::new(HashMap::new()),
            adopted: tokio::sync::Mutex::new(HashSet::new()),
            departures: Mutex::new(HashMap::new()),
            forwarding: Arc::new(Semaphore::new(MAX_FORWARDING)),
            serving: Arc::new(Semaphore::new(MAX_SERVING)),
            stop: stop.clone(),
        });
        let forwards = inner
            .client
            .subscribe(inner.forward_subject(&inner.node))
            .await
            .map_err(|e| StoreError::js("serving forwards", e))?;
        let watch = inner
            .kv
            .watch_with_history("o.>")
            .await
            .map_err(|e| StoreError::js("watching owners", e))?;
        tokio::spawn(watch_owners(inner.clone(), watch, stop.clone()));
        tokio::spawn(serve_forwards(inner.clone(), forwards, stop.clone()));
        let (tx, rx) = mpsc::channel(queue);
        tokio::spawn(route(inner.clone(), rx));
        tracing::info!(node = %inner.node, "ingest node joined the cluster");
        Ok((Self { inner }, tx))
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// Gives up the vehicles this node owns (a clean stop: others take them at once).
    pub async fn leave(&self) {
        let mine: Vec<(String, u64)> = lock(&self.inner.owners)
            .iter()
            .filter(|(_, o)| o.node == self.inner.node)
            .map(|(v, o)| (v.clone(), o.revision))
            .collect();
        for (vehicle, revision) in mine {
            let key = owner_key(&vehicle);
            if let Err(e) = self
                .inner
                .kv
                .delete_expect_revision(&key, Some(revision))
                .await
            {
                tracing::debug!(%vehicle, error = %e, "ownership not released (moved already)");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn random_suffix() -> Result<String, StoreError> {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 6];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| StoreError::js("node id", "no randomness"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Inner {
    fn forward_subject(&self, node: &str) -> String {
        format!("{}.{node}.forward", self.subject_prefix)
    }

    /// Who owns `vehicle`: the cached entry, else the bucket's, else this node (taken).
    async fn route(&self, vehicle: &str) -> Result<Route, StoreError> {
        let cached = lock(&self.owners).get(vehicle).cloned();
        let owner = match cached {
            Some(o) => o,
            None => self.acquire_or_read(vehicle).await?,
        };
        Ok(if owner.node == self.node {
            Route::Local
        } else {
            Route::Remote(owner.node)
        })
    }

    /// Takes `vehicle` if nobody owns it; else who does.
    async fn acquire_or_read(&self, vehicle: &str) -> Result<Owner, StoreError> {
        let key = owner_key(vehicle);
        let mut last_error = None;
        // A create that loses a race fails on the key's last sequence, and the winner's
        // entry may reach the replica that answers reads a moment later: a few rounds.
        for round in 0..20u64 {
            match self.kv.create(&key, Bytes::from(self.node.clone())).await {
                Ok(revision) => {
                    let me = Owner {
                        node: self.node.clone(),
                        revision,
                    };
                    lock(&self.owners).insert(vehicle.to_owned(), me.clone());
                    tracing::info!(%vehicle, node = %self.node, "vehicle taken");
                    metrics::counter!("relay_ingest_cluster_ownership_taken_total").increment(1);
                    return Ok(me);
                }
                Err(e) => {
                    if let Some(owner) = self.read_existing(vehicle).await? {
                        return Ok(owner);
                    }
                    last_error = Some(e);
                }
            }
            tokio::time::sleep(Duration::from_millis(10 * (round + 1))).await;
        }
        Err(StoreError::js(
            "taking a vehicle",
            last_error.map_or_else(|| "no answer".to_owned(), |e| e.to_string()),
        ))
    }

    /// The bucket's owner of `vehicle` (taken when there is none).
    async fn read(&self, vehicle: &str) -> Result<Owner, StoreError> {
        match self.read_existing(vehicle).await? {
            Some(owner) => Ok(owner),
            None => Box::pin(self.acquire_or_read(vehicle)).await,
        }
    }

    /// The bucket's owner of `vehicle`, if it has one.
    async fn read_existing(&self, vehicle: &str) -> Result<Option<Owner>, StoreError> {
        let key = owner_key(vehicle);
        let entry = self
            .kv
            .entry(&key)
            .await
            .map_err(|e| StoreError::js("reading an owner", e))?;
        Ok(match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let owner = Owner {
                    node: String::from_utf8_lossy(&e.value).into_owned(),
                    revision: e.revision,
                };
                lock(&self.owners).insert(vehicle.to_owned(), owner.clone());
                Some(owner)
            }
            _ => None,
        })
    }

    /// Fires when `node` is found gone.
    fn departure(&self, node: &str) -> CancellationToken {
        let mut departures = lock(&self.departures);
        if departures.len() >= MAX_TRACKED_NODES && !departures.contains_key(node) {
            departures.retain(|_, t| !t.is_cancelled());
            if departures.len() >= MAX_TRACKED_NODES {
                departures.clear();
            }
        }
        departures.entry(node.to_owned()).or_default().clone()
    }

    /// Replaces `dead` as the owner of `vehicle`, unless someone else did first; who owns
    /// it then.
    async fn take_over(&self, vehicle: &str, dead: &str) -> Result<Owner, StoreError> {
        let key = owner_key(vehicle);
        let entry = self
            .kv
            .entry(&key)
            .await
            .map_err(|e| StoreError::js("reading an owner", e))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return self.acquire_or_read(vehicle).await;
        };
        if entry.value.as_ref() != dead.as_bytes() {
            return self.read(vehicle).await;
        }
        match self
            .kv
            .update(&key, Bytes::from(self.node.clone()), entry.revision)
            .await
        {
            Ok(revision) => {
                let me = Owner {
                    node: self.node.clone(),
                    revision,
                };
                lock(&self.owners).insert(vehicle.to_owned(), me.clone());
                tracing::warn!(%vehicle, %dead, node = %self.node, "owner gone; vehicle taken over");
                metrics::counter!("relay_ingest_cluster_takeovers_total").increment(1);
                Ok(me)
            }
            // Someone else was quicker: theirs.
            Err(_) => self.read(vehicle).await,
        }
    }

    /// Hands `cmd` to this node's writer, restoring the vehicle's reassembly first if this
    /// node has just taken it.
    async fn local(&self, cmd: WriterCmd) -> Result<(), StoreError> {
        let vehicle = cmd_vehicle(&cmd);
        {
            let mut adopted = self.adopted.lock().await;
            if !adopted.contains(&*vehicle) {
                let (done, restored) = oneshot::channel();
                self.writer
                    .send(WriterCmd::Adopt {
                        vehicle: vehicle.clone(),
                        done,
                    })
                    .await
                    .map_err(|_| StoreError::js("adopting a vehicle", "writer stopped"))?;
                match restored.await {
                    Ok(Ok(())) => {
                        adopted.insert(vehicle.to_string());
                    }
                    Ok(Err(e)) => return Err(StoreError::js("adopting a vehicle", e)),
                    Err(_) => return Err(StoreError::js("adopting a vehicle", "writer stopped")),
                }
            }
        }
        self.writer
            .send(cmd)
            .await
            .map_err(|_| StoreError::js("handing a frame to the writer", "writer stopped"))
    }
}

/// Routes every command of the QUIC side to the vehicle's owner.
async fn route(inner: Arc<Inner>, mut rx: mpsc::Receiver<WriterCmd>) {
    while let Some(cmd) = rx.recv().await {
        let vehicle = cmd_vehicle(&cmd);
        match inner.route(&vehicle).await {
            Ok(Route::Local) => {
                if let Err(e) = inner.local(cmd).await {
                    tracing::warn!(%vehicle, error = %e, "a command was not stored");
                }
            }
            Ok(Route::Remote(node)) => {
                let Ok(permit) = inner.forwarding.clone().acquire_owned().await else {
                    return;
                };
                let inner = inner.clone();
                tokio::spawn(async move {
                    forward(&inner, cmd, node).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // The bucket is unreachable: nothing acknowledged, the agent re-sends.
                tracing::warn!(%vehicle, error = %e, "no owner for a vehicle");
                metrics::counter!("relay_ingest_cluster_forward_failures_total").increment(1);
            }
        }
    }
}

/// The request for `cmd`.
fn request(cmd: &WriterCmd) -> Option<Forward> {
    let (vehicle, session, body) = match cmd {
        WriterCmd::Streams {
            vehicle,
            session,
            streams,
            ..
        } => (
            vehicle,
            *session,
            Body::Streams(ForwardedStreams {
                streams: streams.clone(),
            }),
        ),
        WriterCmd::Frame {
            vehicle,
            session,
            frame,
            received_ns,
            vehicle_clock,
            capture_time_check,
            ..
        } => (
            vehicle,
            *session,
            Body::Frame(ForwardedFrame {
                frame: Some(frame.clone()),
                received_ns: *received_ns,
                vehicle_clock: *vehicle_clock,
                capture_time_check: *capture_time_check as i32,
            }),
        ),
        WriterCmd::Adopt { .. } => return None,
    };
    Some(Forward {
        vehicle_id: vehicle.to_string(),
        session_id: session,
        body: Some(body),
    })
}

/// Hands `cmd` to the owner node `node` and relays its answer; follows the vehicle when it
/// moves and takes it over when its owner is gone.
async fn forward(inner: &Inner, mut cmd: WriterCmd, mut node: String) {
    let Some(req) = request(&cmd) else { return };
    let vehicle = req.vehicle_id.clone();
    let payload = Bytes::from(req.encode_to_vec());
    for attempt in 0..MAX_ATTEMPTS {
        if inner.stop.is_cancelled() {
            return; // not acknowledged: the agent re-sends to whichever node it reaches
        }
        let departure = inner.departure(&node);
        let sent = tokio::select! {
            sent = tokio::time::timeout(
                inner.timeout,
                inner
                    .client
                    .request(inner.forward_subject(&node), payload.clone()),
            ) => Some(sent),
            // The owner was found gone while this request waited for an answer that will
            // never come (its frames were in flight when it died): ask again now.
            () = departure.cancelled(), if !departure.is_cancelled() => None,
        };
        let reply = match sent {
            Some(Ok(Ok(reply))) => ForwardReply::decode(reply.payload).ok(),
            Some(Ok(Err(e))) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                // The owner's connection is gone: it is.
                departure.cancel();
                let owner = inner.take_over(&vehicle, &node).await;
                match hand_over(inner, owner, cmd, &mut node).await {
                    Some(c) => cmd = c,
                    None => return,
                }
                continue;
            }
            // Slow, unreachable or found gone meanwhile: ask again.
            Some(Ok(Err(_)) | Err(_)) | None => None,
        };
        match reply.and_then(|r| r.outcome) {
            Some(Outcome::Durable(Durable { stream_id, seq })) => {
                if let WriterCmd::Frame { ack, .. } = &cmd
                    && ack.try_send((stream_id, seq)).is_err()
                {
                    metrics::counter!("relay_ingest_acks_dropped_total").increment(1);
                }
                return;
            }
            Some(Outcome::StreamsAccepted(_)) => {
                if let WriterCmd::Streams { done, .. } = cmd {
                    let _ = done.send(Ok(()));
                }
                return;
            }
            Some(Outcome::StreamsRefused(r)) => {
                if let WriterCmd::Streams { done, .. } = cmd {
                    let refused = if r.session_quota {
                        StreamsRefused::SessionQuota {
                            per_hour: usize::try_from(r.detail).unwrap_or(usize::MAX),
                        }
                    } else {
                        StreamsRefused::SessionMismatch {
                            stream_id: u32::try_from(r.detail).unwrap_or(u32::MAX),
                        }
                    };
                    let _ = done.send(Err(refused));
                }
                return;
            }
            Some(Outcome::NotOwner(_)) => {
                lock(&inner.owners).remove(&vehicle);
                let owner = inner.read(&vehicle).await;
                match hand_over(inner, owner, cmd, &mut node).await {
                    Some(c) => cmd = c,
                    None => return,
                }
            }
            Some(Outcome::Busy(_)) | None => {
                let pause = Duration::from_millis(20 * (attempt as u64 + 1));
                tokio::time::sleep(pause.min(Duration::from_millis(500))).await;
            }
        }
    }
    tracing::warn!(%vehicle, %node, "gave up handing a command to the vehicle's owner");
    metrics::counter!("relay_ingest_cluster_forward_failures_total").increment(1);
}

/// After looking `cmd`'s owner up again: this node's writer takes it (None), or `node` names
/// the owner to ask next and the command comes back.
async fn hand_over(
    inner: &Inner,
    owner: Result<Owner, StoreError>,
    cmd: WriterCmd,
    node: &mut String,
) -> Option<WriterCmd> {
    match owner {
        Ok(o) if o.node == inner.node => {
            let vehicle = cmd_vehicle(&cmd);
            if let Err(e) = inner.local(cmd).await {
                tracing::warn!(%vehicle, error = %e, "a command was not stored");
            }
            None
        }
        Ok(o) => {
            *node = o.node;
            Some(cmd)
        }
        Err(e) => {
            tracing::warn!(vehicle = %cmd_vehicle(&cmd), error = %e, "looking the owner up failed");
            Some(cmd)
        }
    }
}

/// Keeps the owner cache current; a vehicle taken by another node must be restored again
/// should it come back.
async fn watch_owners(inner: Arc<Inner>, mut watch: kv::Watch, stop: CancellationToken) {
    loop {
        let next = tokio::select! {
            n = watch.next() => n,
            () = stop.cancelled() => return,
        };
        let Some(Ok(entry)) = next else {
            tracing::warn!("owner watch ended");
            return;
        };
        let Some(vehicle) = vehicle_of_key(&entry.key) else {
            continue;
        };
        let owner = (entry.operation == kv::Operation::Put).then(|| Owner {
            node: String::from_utf8_lossy(&entry.value).into_owned(),
            revision: entry.revision,
        });
        let mine = owner.as_ref().is_some_and(|o| o.node == inner.node);
        match owner {
            Some(o) => {
                lock(&inner.owners).insert(vehicle.clone(), o);
            }
            None => {
                lock(&inner.owners).remove(&vehicle);
            }
        }
        if !mine {
            inner.adopted.lock().await.remove(&vehicle);
        }
    }
}

/// Serves other nodes' forwarded commands for the vehicles this node owns.
async fn serve_forwards(
    inner: Arc<Inner>,
    mut sub: async_nats::Subscriber,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            () = stop.cancelled() => return,
        };
        let Some(msg) = msg else { return };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        // The bound is taken before the task exists: a flood of requests waits here (in
        // NATS's bounded subscription buffer), not in spawned tasks.
        let Ok(permit) = inner.serving.clone().acquire_owned().await else {
            return;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let outcome = serve_one(&inner, &msg.payload).await;
            drop(permit);
            let reply = ForwardReply {
                outcome: Some(outcome),
            };
            let _ = inner
                .client
                .publish(reply_to, Bytes::from(reply.encode_to_vec()))
                .await;
        });
    }
}

async fn serve_one(inner: &Inner, payload: &[u8]) -> Outcome {
    let Ok(req) = Forward::decode(payload) else {
        return Outcome::NotOwner(NotOwner {});
    };
    let vehicle: Arc<str> = req.vehicle_id.as_str().into();
    // Only what this node owns (the sender looks the owner up again otherwise).
    match inner.route(&vehicle).await {
        Ok(Route::Local) => {}
        _ => return Outcome::NotOwner(NotOwner {}),
    }
    match req.body {
        Some(Body::Streams(s)) => {
            let (done, answer) = oneshot::channel();
            let cmd = WriterCmd::Streams {
                vehicle,
                session: req.session_id,
                streams: s.streams,
                done,
            };
            if inner.local(cmd).await.is_err() {
                return Outcome::Busy(Busy {});
            }
            match answer.await {
                Ok(Ok(())) => Outcome::StreamsAccepted(StreamsAccepted {}),
                Ok(Err(r)) => {
                    let (session_quota, detail) = match r {
                        StreamsRefused::SessionQuota { per_hour } => (true, per_hour as u64),
                        StreamsRefused::SessionMismatch { stream_id } => {
                            (false, u64::from(stream_id))
                        }
                    };
                    Outcome::StreamsRefused(relay_proto::cluster::v1::StreamsRefused {
                        session_quota,
                        reason: r.to_string(),
                        detail,
                    })
                }
                Err(_) => Outcome::Busy(Busy {}),
            }
        }
        Some(Body::Frame(f)) => {
            let Some(frame) = f.frame else {
                return Outcome::NotOwner(NotOwner {});
            };
            let (ack, mut durable) = mpsc::channel(1);
            let cmd = WriterCmd::Frame {
                vehicle,
                session: req.session_id,
                frame,
                received_ns: f.received_ns,
                vehicle_clock: f.vehicle_clock,
                capture_time_check: relay_proto::model::TimestampCheck::try_from(
                    f.capture_time_check,
                )
                .unwrap_or(relay_proto::model::TimestampCheck::Unspecified),
                ack,
                budget: Vec::new(),
            };
            if inner.local(cmd).await.is_err() {
                return Outcome::Busy(Busy {});
            }
            match tokio::time::timeout(inner.timeout, durable.recv()).await {
                Ok(Some((stream_id, seq))) => Outcome::Durable(Durable { stream_id, seq }),
                // Held back or not stored: the sender asks again, the agent re-sends.
                _ => Outcome::Busy(Busy {}),
            }
        }
        None => Outcome::NotOwner(NotOwner {}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_keys_name_any_vehicle_id() {
        for id in ["amb-1", "a.b c*>", "ü"] {
            let key = owner_key(id);
            assert!(key.starts_with("o.") && !key[2..].contains('.'));
            assert_eq!(vehicle_of_key(&key).as_deref(), Some(id));
        }
        assert_eq!(vehicle_of_key("s.00.1.2"), None);
    }
}
