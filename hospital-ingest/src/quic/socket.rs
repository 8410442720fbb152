//! The UDP socket vehicles' QUIC packets arrive on.
//!
//! Why a receive buffer of its own: every vehicle sends a packet per 40 ms frame, and the
//! kernel's default buffer (about 200 KiB) holds only milliseconds of a fleet's packets.
//! When the ingest is busy for longer (a commit, a burst of handshakes, a shared core), the
//! kernel drops what does not fit; QUIC then recovers each loss a round trip or more later, at
//! the cost of latency, retransmissions and, under sustained overload, idle timeouts. Measured
//! with 500 blasted vehicles on the 2-core machine: 110 k datagrams dropped and an ECG p99 of
//! 1.5 s with the default; none dropped and 0.66 s with 8 MiB. Drops that still happen are
//! counted from the kernel's own per-socket figure, so operators see them.

use std::net::SocketAddr;
use std::path::Path;

use socket2::{Domain, Protocol, Socket, Type};

/// The bound socket and what the kernel granted.
#[derive(Debug)]
pub struct BoundSocket {
    /// Bound and non-blocking, for quinn.
    pub socket: std::net::UdpSocket,
    /// Receive buffer the kernel reports (Linux doubles the request for its bookkeeping and
    /// caps the request at `net.core.rmem_max`).
    pub receive_buffer_bytes: usize,
    /// The socket's inode, to find its drop count in `/proc/net/udp{,6}` (Linux).
    pub inode: Option<u64>,
}

/// Binds the QUIC socket at `listen` asking for a receive buffer of `receive_buffer_bytes`.
pub fn bind(listen: SocketAddr, receive_buffer_bytes: usize) -> std::io::Result<BoundSocket> {
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Before bind, so no packet arrives into a small buffer. A refusal is not fatal: the
    // kernel's default still works, and the granted size is logged and exported.
    if let Err(e) = socket.set_recv_buffer_size(receive_buffer_bytes) {
        tracing::warn!(error = %e, receive_buffer_bytes, "could not set the QUIC socket's receive buffer");
    }
    socket.bind(&listen.into())?;
    socket.set_nonblocking(true)?;
    let granted = socket.recv_buffer_size()?;
    let socket: std::net::UdpSocket = socket.into();
    let inode = socket_inode(&socket);
    Ok(BoundSocket {
        socket,
        receive_buffer_bytes: granted,
        inode,
    })
}

#[cfg(target_os = "linux")]
fn socket_inode(socket: &std::net::UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    // /proc/self/fd/N of a socket resolves to its sockfs inode, the one /proc/net/udp lists.
    std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))
        .ok()
        .map(|m| m.ino())
}

#[cfg(not(target_os = "linux"))]
fn socket_inode(_socket: &std::net::UdpSocket) -> Option<u64> {
    None
}

/// Datagrams the kernel dropped for the socket with `inode` (full receive buffer, mostly),
/// from the tables at `/proc/net/udp` and `/proc/net/udp6`; `None` where they are not
/// readable or do not list it.
pub fn receive_drops(proc_net: &Path, inode: u64) -> Option<u64> {
    ["udp", "udp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(proc_net.join(table)).ok()?;
        drops_in_table(&text, inode)
    })
}

/// The `drops` column of the row whose `inode` column is `inode`, in the text of a
/// `/proc/net/udp`-style table (columns found by the header's names).
pub fn drops_in_table(text: &str, inode: u64) -> Option<u64> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    // The header names "tx_queue rx_queue" and "tr tm->when" as two words each where the rows
    // hold one field ("00000000:00000000"); count fields, not words.
    let fields: Vec<&str> = header
        .iter()
        .copied()
        .filter(|w| !matches!(*w, "rx_queue" | "tm->when"))
        .collect();
    let inode_at = fields.iter().position(|w| *w == "inode")?;
    let drops_at = fields.iter().position(|w| *w == "drops")?;
    lines.find_map(|line| {
        let row: Vec<&str> = line.split_whitespace().collect();
        let this: u64 = row.get(inode_at)?.parse().ok()?;
        if this != inode {
            return None;
        }
        row.get(drops_at)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rows of a real /proc/net/udp (Linux 6.x), the second with drops.
    const TABLE: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops            \n\
  1235: 0100007F:935E 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 81232 2 0000000000000000 0          \n\
  1240: 0100007F:1F90 00000000:0000 07 00000000:00040000 00:00000000 00000000     0        0 81299 2 0000000000000000 109529     \n";

    #[test]
    fn drops_are_read_from_the_row_of_the_socket() {
        assert_eq!(drops_in_table(TABLE, 81232), Some(0));
        assert_eq!(drops_in_table(TABLE, 81299), Some(109_529));
        assert_eq!(drops_in_table(TABLE, 5), None, "not listed");
        assert_eq!(drops_in_table("", 81232), None);
        assert_eq!(drops_in_table("garbage\n1 2 3", 1), None, "no such columns");
    }

    /// The kernel grants a buffer, and this process's socket shows up in its tables with
    /// no drops (nothing was sent to it).
    #[test]
    fn bound_socket_reports_its_buffer_and_is_found_in_the_kernel_tables() {
        let bound = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 1 << 20).unwrap();
        assert!(bound.receive_buffer_bytes > 0);
        if cfg!(target_os = "linux") {
            let inode = bound.inode.expect("a socket inode on Linux");
            assert_eq!(receive_drops(Path::new("/proc/net"), inode), Some(0));
        }
    }

    /// A full receive buffer makes the kernel drop datagrams, and the count says so.
    #[cfg(target_os = "linux")]
    #[test]
    fn drops_of_a_full_buffer_are_counted() {
        // The smallest buffer the kernel allows, never read: datagrams beyond it are dropped.
        let bound = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 1).unwrap();
        let to = bound.socket.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let payload = [0u8; 1200];
        for _ in 0..2_000 {
            let _ = sender.send_to(&payload, to);
        }
        let drops = receive_drops(Path::new("/proc/net"), bound.inode.unwrap()).unwrap();
        assert!(drops > 0, "a never-read minimal buffer dropped nothing");
    }
}
