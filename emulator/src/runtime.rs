//! The emulated link as a UDP relay: the vehicle's bearer sends to `addr`; the relay forwards
//! through the uplink model to the target from its own socket (like a carrier NAT) and sends
//! the answers back through the downlink model to the latest vehicle address it heard from.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::model::{Direction, DirectionCounters};
use super::spec::BearerSpec;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Cut,
    Restore,
    /// Drop every constraint from now on: used after a measured run so backlogs drain.
    Lift,
}

/// Counters of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkCounters {
    /// Agent-to-ingest direction.
    pub up: DirectionCounters,
    /// Ingest-to-agent direction.
    pub down: DirectionCounters,
}

/// A running emulated link.
#[derive(Debug)]
pub struct Link {
    /// Where the vehicle sends (instead of the ingest).
    pub addr: SocketAddr,
    /// The link's specification.
    pub spec: BearerSpec,
    /// Wall-clock time of the link's time zero, UTC ns (trace time 0 + offset).
    pub started_utc_ns: i64,
    control: mpsc::UnboundedSender<Control>,
    counters: Arc<Mutex<LinkCounters>>,
    task: JoinHandle<()>,
}

impl Link {
    /// Starts a link on `listen` (port 0 picks one) towards `target`.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        spec: BearerSpec,
        seed: u64,
    ) -> std::io::Result<Self> {
        let front = UdpSocket::bind(listen).await?;
        let back_bind: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .map_err(std::io::Error::other)?;
        let back = UdpSocket::bind(back_bind).await?;
        back.connect(target).await?;
        let addr = front.local_addr()?;
        let (control, rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Mutex::new(LinkCounters::default()));
        let started_utc_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let up = Direction::new(spec.up.clone(), seed);
        // A different stream of random numbers for the other direction.
        let down = Direction::new(spec.down.clone(), seed ^ 0x9e37_79b9_7f4a_7c15);
        let task = tokio::spawn(relay(front, back, up, down, rx, counters.clone()));
        Ok(Self {
            addr,
            spec,
            started_utc_ns,
            control,
            counters,
            task,
        })
    }

    /// Takes the link down in both directions until [`Link::restore`].
    pub fn cut(&self) {
        let _ = self.control.send(Control::Cut);
    }

    /// Ends a runtime cut.
    pub fn restore(&self) {
        let _ = self.control.send(Control::Restore);
    }

    /// Removes every limit (capacity, loss, delay, outages) from now on.
    pub fn lift(&self) {
        let _ = self.control.send(Control::Lift);
    }

    /// Counters of both directions.
    pub fn counters(&self) -> LinkCounters {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops relaying; returns the final counters.
    pub fn stop(self) -> LinkCounters {
        self.counters()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts one link per spec on ephemeral loopback ports, all towards `target`; link `i` uses
/// seed `seed + i`.
pub async fn start_links(
    target: SocketAddr,
    specs: &[BearerSpec],
    seed: u64,
) -> std::io::Result<Vec<Link>> {
    let loopback: SocketAddr = if target.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    };
    let mut links = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        links.push(Link::start(loopback, target, spec.clone(), seed.wrapping_add(i as u64)).await?);
    }
    Ok(links)
}

async fn relay(
    front: UdpSocket,
    back: UdpSocket,
    mut up: Direction,
    mut down: Direction,
    mut control: mpsc::UnboundedReceiver<Control>,
    counters: Arc<Mutex<LinkCounters>>,
) {
    let start = Instant::now();
    let mut vehicle: Option<SocketAddr> = None;
    let mut front_buf = vec![0u8; MAX_DATAGRAM];
    let mut back_buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let now = start.elapsed();
        while let Some(p) = up.poll_transmit(now) {
            // The target may be down (connection refused); the packet is then lost like on a
            // real network.
            let _ = back.send(&p).await;
        }
        while let Some(p) = down.poll_transmit(now) {
            if let Some(v) = vehicle {
                let _ = front.send_to(&p, v).await;
            }
        }
        *counters.lock().unwrap_or_else(|p| p.into_inner()) = LinkCounters {
            up: up.counters(),
            down: down.counters(),
        };
        let next = match (up.poll_timeout(), down.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(start + at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = front.recv_from(&mut front_buf) => {
                if let Ok((n, from)) = r {
                    vehicle = Some(from);
                    up.offer(start.elapsed(), Bytes::copy_from_slice(&front_buf[..n]));
                }
            }
            r = back.recv(&mut back_buf) => {
                if let Ok(n) = r {
                    down.offer(start.elapsed(), Bytes::copy_from_slice(&back_buf[..n]));
                }
            }
            () = sleep => {}
            c = control.recv() => {
                let now = start.elapsed();
                match c {
                    Some(Control::Cut) => { up.set_cut(now, true); down.set_cut(now, true); }
                    Some(Control::Restore) => { up.set_cut(now, false); down.set_cut(now, false); }
                    Some(Control::Lift) => { up.lift(now); down.lift(now); }
                    None => return,
                }
            }
        }
    }
}
