//! The public gRPC API: ListVehicles and Subscribe (backlog from the store, a sync marker, then
//! live records from the bus; every message carries its resume cursor). Where a subscription
//! stands is the sans-IO [`flow::SubscriptionFlow`]; this module moves records and time.

pub mod flow;
pub mod listener;

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use relay_proto::model::telemetry_server::Telemetry;
use relay_proto::model::{
    ListVehiclesRequest, ListVehiclesResponse, SubscribeRequest, SubscribeResponse, Vehicle,
    subscribe_request::Start, subscribe_response::Record,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::quic::Online;
use crate::store::{LogEntry, Store, StoreError, record_scope};
use flow::{LiveStep, SubscriptionFlow};

/// Records read from the store per page while sending a backlog.
const BACKLOG_PAGE: usize = 512;

#[derive(Debug, Clone)]
/// Per-subscriber bounds.
pub struct GrpcSettings {
    /// Messages queued per subscriber.
    pub subscriber_queue: usize,
    /// A subscriber whose queue stays full this long is cut off.
    pub slow_subscriber_timeout: Duration,
}

#[derive(Debug, Clone)]
/// The Telemetry gRPC service.
pub struct TelemetryService {
    store: Store,
    bus: broadcast::Sender<Arc<LogEntry>>,
    online: Arc<Online>,
    settings: GrpcSettings,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
}

impl TelemetryService {
    /// The service over `store` and the live `bus`, admitting `max_subscribers` at once.
    pub fn new(
        store: Store,
        bus: broadcast::Sender<Arc<LogEntry>>,
        online: Arc<Online>,
        settings: GrpcSettings,
        max_subscribers: usize,
        stop: CancellationToken,
    ) -> Self {
        Self {
            store,
            bus,
            online,
            settings,
            slots: Arc::new(Semaphore::new(max_subscribers)),
            stop,
        }
    }
}

fn internal(e: StoreError) -> Status {
    tracing::error!(error = %e, "store read failed");
    Status::internal("store unavailable")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "store task failed");
            Status::internal("store task failed")
        })?
        .map_err(internal)
}

/// What a subscription wants.
#[derive(Debug, Clone)]
struct Filter {
    vehicles: HashSet<String>,
    kinds: HashSet<i32>,
}

impl Filter {
    fn matches(&self, vehicle: &str, kind: i32) -> bool {
        (self.vehicles.is_empty() || self.vehicles.contains(vehicle))
            && (self.kinds.is_empty() || self.kinds.contains(&kind))
    }

    fn matches_record(&self, msg: &SubscribeResponse) -> bool {
        record_scope(msg).is_some_and(|(v, k)| self.matches(v, k))
    }
}

/// A status handed from the subscription task to its response stream.
type StatusSlot = Arc<std::sync::Mutex<Option<Status>>>;

fn take_status(slot: &StatusSlot) -> Option<Status> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// The response stream: queued messages, unless the subscriber was cut off, in which case the
/// error comes first (its queue is full by definition) and the stream ends. A subscription
/// that failed (the store could not be read) ends with its error after what was queued.
pub struct SubscriberStream {
    rx: mpsc::Receiver<SubscribeResponse>,
    cut_off: StatusSlot,
    failure: StatusSlot,
    done: bool,
    _slot: OwnedSemaphorePermit,
}

impl Stream for SubscriberStream {
    type Item = Result<SubscribeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(status) = take_status(&self.cut_off) {
            self.done = true;
            self.rx.close();
            return Poll::Ready(Some(Err(status)));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(take_status(&self.failure).map(Err))
            }
            other => other.map(|m| m.map(Ok)),
        }
    }
}

/// Sends into a subscriber's queue; gives up (and cuts it off) when the queue stays full.
struct Outlet {
    tx: mpsc::Sender<SubscribeResponse>,
    timeout: Duration,
    cut_off: StatusSlot,
}

/// Why a subscription ended early.
#[derive(Debug)]
enum Stop {
    /// The client went away.
    Gone,
    /// The client did not read; it was cut off.
    Slow,
    /// The subscription cannot go on (the store could not be read); the client gets this.
    Failed(Status),
}

impl Outlet {
    async fn send(&mut self, msg: SubscribeResponse) -> Result<(), Stop> {
        match tokio::time::timeout(self.timeout, self.tx.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Gone),
            Err(_) => {
                // What was still queued is dropped with the stream, so the resume point is the
                // cursor of the last message the client actually received.
                let status = Status::resource_exhausted(format!(
                    "subscriber too slow: queue full for {:?}; subscribe again with after_cursor = the cursor of the last message received",
                    self.timeout
                ));
                *self.cut_off.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                metrics::counter!("relay_ingest_subscribers_cut_off_total").increment(1);
                Err(Stop::Slow)
            }
        }
    }
}

impl TelemetryService {
    /// Sends stored records in (after, up_to] that match; returns the last cursor examined.
    async fn send_backlog(
        &self,
        filter: &Filter,
        mut after: u64,
        up_to: u64,
        out: &mut Outlet,
    ) -> Result<(u64, u64), Stop> {
        let mut sent = 0;
        while after < up_to {
            let store = self.store.clone();
            let page = blocking(move || store.read_after(after, up_to, BACKLOG_PAGE))
                .await
                .map_err(Stop::Failed)?;
            let Some(last) = page.last().map(|(c, _)| *c) else {
                break;
            };
            for (_, msg) in page {
                if filter.matches_record(&msg) {
                    out.send(msg).await?;
                    sent += 1;
                }
            }
            after = last;
        }
        Ok((up_to.max(after), sent))
    }

    async fn run_subscription(
        self,
        filter: Filter,
        start: Option<Start>,
        out: &mut Outlet,
    ) -> Result<(), Stop> {
        // Subscribe to the bus before reading the head: whatever is committed after the head
        // arrives live, so backlog and live meet without gap; duplicates are skipped by cursor.
        let mut live = self.bus.subscribe();
        let store = self.store.clone();
        let head = blocking(move || store.head()).await.map_err(Stop::Failed)?;
        let mut flow = SubscriptionFlow::new(start.as_ref(), head);
        // Descriptors of the matching streams first, so every data record can be interpreted.
        let store = self.store.clone();
        let streams = blocking(move || store.streams())
            .await
            .map_err(Stop::Failed)?;
        for info in streams {
            let matches = info
                .stream
                .as_ref()
                .is_some_and(|s| filter.matches(&s.vehicle_id, s.kind));
            if matches {
                out.send(SubscribeResponse {
                    cursor: flow.cursor(),
                    record: Some(Record::Stream(info)),
                })
                .await?;
            }
        }
        let (after, up_to) = flow.backlog();
        let (reached, backlog) = self.send_backlog(&filter, after, up_to, out).await?;
        flow.handle_caught_up(reached);
        out.send(flow.sync_marker(backlog)).await?;
        loop {
            let entry = tokio::select! {
                r = live.recv() => r,
                () = self.stop.cancelled() => return Ok(()),
                () = out.tx.closed() => return Err(Stop::Gone),
            };
            match entry {
                Ok(e) => match flow.handle_live(e.cursor) {
                    LiveStep::Skip => {}
                    LiveStep::Deliver { heal } => {
                        if let Some((after, up_to)) = heal {
                            // Committed but not seen live (cannot happen with an intact bus;
                            // cheap to heal from the store).
                            self.send_backlog(&filter, after, up_to, out).await?;
                        }
                        if filter.matches(&e.vehicle, e.kind) {
                            out.send(e.message.clone()).await?;
                        }
                    }
                },
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!("relay_ingest_subscriber_lagged_total").increment(1);
                    out.send(flow.handle_lagged(missed)).await?;
                    let store = self.store.clone();
                    let head = blocking(move || store.head()).await.map_err(Stop::Failed)?;
                    let (reached, _) = self.send_backlog(&filter, flow.cursor(), head, out).await?;
                    flow.handle_caught_up(reached);
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    async fn list_vehicles(
        &self,
        _req: Request<ListVehiclesRequest>,
    ) -> Result<Response<ListVehiclesResponse>, Status> {
        let store = self.store.clone();
        let (vehicles, streams) =
            blocking(move || Ok((store.vehicles()?, store.streams()?))).await?;
        let mut by_vehicle: BTreeMap<String, Vehicle> = vehicles
            .into_iter()
            .map(|(id, last_seen_ns)| {
                let v = Vehicle {
                    vehicle_id: id.clone(),
                    online: self.online.is_online(&id),
                    last_seen_ns,
                    streams: Vec::new(),
                };
                (id, v)
            })
            .collect();
        for info in streams {
            let Some(id) = info.stream.as_ref().map(|s| s.vehicle_id.clone()) else {
                continue;
            };
            if let Some(v) = by_vehicle.get_mut(&id) {
                v.streams.push(info);
            }
        }
        Ok(Response::new(ListVehiclesResponse {
            vehicles: by_vehicle.into_values().collect(),
        }))
    }

    type SubscribeStream = SubscriberStream;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = req.into_inner();
        if req.vehicle_ids.len() > 1024 || req.kinds.len() > 16 {
            return Err(Status::invalid_argument("too many vehicle ids or kinds"));
        }
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many subscribers"))?;
        let filter = Filter {
            vehicles: req.vehicle_ids.into_iter().collect(),
            kinds: req.kinds.into_iter().collect(),
        };
        let (tx, rx) = mpsc::channel(self.settings.subscriber_queue);
        let cut_off = Arc::new(std::sync::Mutex::new(None));
        let out = Outlet {
            tx,
            timeout: self.settings.slow_subscriber_timeout,
            cut_off: cut_off.clone(),
        };
        let failure = StatusSlot::default();
        let svc = self.clone();
        let failed = failure.clone();
        metrics::gauge!("relay_ingest_subscribers").increment(1.0);
        tokio::spawn(async move {
            let mut out = out;
            let result = svc.run_subscription(filter, req.start, &mut out).await;
            metrics::gauge!("relay_ingest_subscribers").decrement(1.0);
            match result {
                Err(Stop::Slow) => tracing::warn!("slow subscriber cut off"),
                // Set before the queue closes, so the stream ends with it.
                Err(Stop::Failed(status)) => {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                }
                Ok(()) | Err(Stop::Gone) => {}
            }
            drop(out);
        });
        Ok(Response::new(SubscriberStream {
            rx,
            cut_off,
            failure,
            done: false,
            _slot: slot,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_store_read_error_ends_the_subscription_with_internal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        store.damage_record_for_tests(1).unwrap();
        let (bus, _) = broadcast::channel(16);
        let svc = TelemetryService::new(
            store,
            bus,
            Arc::new(Online::default()),
            GrpcSettings {
                subscriber_queue: 16,
                slow_subscriber_timeout: Duration::from_secs(5),
            },
            4,
            CancellationToken::new(),
        );
        let req = SubscribeRequest {
            start: Some(Start::AfterCursor(0)),
            ..SubscribeRequest::default()
        };
        let mut stream = svc.subscribe(Request::new(req)).await.unwrap().into_inner();
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.next().await {
                    Some(Ok(_)) => continue,
                    other => break other,
                }
            }
        })
        .await
        .unwrap();
        let status = end
            .expect("the stream ends with an error, not cleanly")
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    }
}
