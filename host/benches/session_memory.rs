//! Heap memory a session holds while it waits for a resume (its connection gone): with nothing
//! kept, with a full buffer of room broadcasts (their bodies shared with the room's other
//! sessions), and with a full buffer of frames of its own. Counted in-process by dhat's heap
//! statistics (bytes requested from the allocator, not resident pages), so that no connection's
//! memory is mixed in.
//!
//! Run: `cargo bench -p plexus --bench session_memory`

use std::sync::Arc;

use plexus::protocol::Outbound;
use plexus::registry::{LoadOptions, Registry, SwapPolicy};
use plexus::rooms::Rooms;
use plexus::router::{self, ConnState, HostLimits, Hub};
use plexus::session::{Identity, SessionPolicy};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn heap() -> i64 {
    dhat::HeapStats::get().curr_bytes as i64
}

/// Opens `n` sessions as connections do (welcomed), lets `prepare` act on each, and detaches
/// them. Returns them (held, as the registry holds them).
fn detached(
    hub: &Hub,
    n: usize,
    mut prepare: impl FnMut(&ConnState),
) -> Vec<Arc<plexus::session::Session>> {
    (0..n)
        .map(|_| {
            let conn = ConnState::open(hub, Identity::guest());
            router::welcome(&conn);
            prepare(&conn);
            let (session, rx, driver) = conn.into_parts();
            drop(rx);
            drop(driver);
            session.mark_detached();
            session
        })
        .collect()
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let empty_dir = std::env::temp_dir().join(format!("plexus-memory-{}", std::process::id()));
    std::fs::create_dir_all(&empty_dir).unwrap();
    let hub = rt.block_on(async {
        let rooms = Arc::new(Rooms::default());
        let registry = Registry::load(
            &empty_dir,
            plexus::plugin::wasm::Runtime::new().unwrap(),
            rooms.clone(),
            LoadOptions { build: false },
            SwapPolicy::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
        let limits = HostLimits {
            rate: None,
            ..HostLimits::default()
        };
        Hub::new(
            registry,
            rooms,
            limits,
            SessionPolicy::default(),
            Default::default(),
        )
        .0
    });
    let kept = hub.policy.bounds.kept_frames;
    // A 150-byte frame, like a short chat message with its envelope.
    let payload = format!("{{\"text\":\"{}\"}}", "x".repeat(40));
    let frame = |room: Option<&str>| {
        Outbound {
            ty: "chat.message",
            room,
            payload: &payload,
            sender: Some("guest-0123456789abcdef0123456789abcdef"),
        }
        .encode()
    };
    println!("frame: {} bytes", frame(Some("lobby")).len());

    // Nothing kept: the client acknowledged everything (`sys.received`).
    let n = 10_000;
    let before = heap();
    let empty = detached(&hub, n, |conn| conn.session.outbox.trim(u64::MAX));
    let per = (heap() - before) / n as i64;
    println!("detached session, nothing kept: {per} bytes");

    // A full buffer of room broadcasts: 1,000 sessions in one room, gone, then 1,000 broadcasts.
    let n = 1_000;
    let before = heap();
    let members = detached(&hub, n, |conn| {
        conn.session.outbox.trim(u64::MAX);
        hub.rooms.join("lobby", &conn.session, usize::MAX).unwrap();
        conn.session.add_room("lobby".into());
    });
    let joined = heap();
    for _ in 0..kept {
        hub.rooms
            .broadcast("lobby", &frame(Some("lobby")), None, None);
    }
    let full = heap();
    println!(
        "detached session, {kept} room broadcasts kept: {} bytes ({} of them for the buffer; the {kept} bodies, shared by the room, {} bytes in all)",
        (full - before) / n as i64,
        (full - joined) / n as i64,
        kept * frame(Some("lobby")).len()
    );

    // A full buffer of its own frames (replies, direct messages): the worst case per session.
    let n = 100;
    let before = heap();
    let own = detached(&hub, n, |conn| {
        for _ in 0..kept {
            conn.session.outbox.push(frame(None));
        }
    });
    println!(
        "detached session, {kept} frames of its own kept: {} bytes",
        (heap() - before) / n as i64
    );
    assert_eq!(hub.sessions.len(), empty.len() + members.len() + own.len());
    let _ = std::fs::remove_dir_all(&empty_dir);
}
