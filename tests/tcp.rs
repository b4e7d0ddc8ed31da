//! The TCP backend: the shared collective suite over real sockets (ranks as threads of this test,
//! each with its own store client and socket mesh), a multi-process run through `init()`, strangers
//! on the transport port, and faults: a peer that stops reading, a peer that leaves or sends garbage
//! mid-run, a frame header that declares an absurd length.
//!
//! The raw-socket peers below speak the transport's wire format by hand (see the `ferroccl::tcp`
//! module docs): hello `["FCCH"][rank u32][token length u32][token]`, frames
//! `["FCC1"][kind u8][seq u64][step u32][len u64][payload]`, little-endian.
mod common;

use ferroccl::prelude::*;
use ferroccl::rendezvous::{StoreClient, StoreServer};
use ferroccl::tcp::TcpComm;
use ferroccl::Config;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const TOKEN: &str = "s3cret";
/// Bound on store round trips and raw-peer socket operations in these tests.
const T: Duration = Duration::from_secs(10);

fn mesh<T: Send>(n: usize, f: impl Fn(&TcpComm) -> Result<T> + Sync) -> Vec<T> {
    mesh_with(
        n,
        "t",
        Config::default().with_timeout(Duration::from_secs(60)),
        |_| {},
        f,
    )
}

/// `n` ranks as threads; `before(rank)` runs on each rank's thread before it starts connecting.
fn mesh_with<T: Send>(
    n: usize,
    prefix: &str,
    cfg: Config,
    before: impl Fn(usize) + Sync,
    f: impl Fn(&TcpComm) -> Result<T> + Sync,
) -> Vec<T> {
    let server = StoreServer::bind("127.0.0.1:0", TOKEN).unwrap();
    let addr = server.local_addr().to_string();
    let server = Arc::new(Some(server));
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (addr, server, cfg, f, before) =
                    (addr.clone(), server.clone(), cfg.clone(), &f, &before);
                s.spawn(move || {
                    before(r);
                    let store = Arc::new(StoreClient::connect(&addr, TOKEN, T)?);
                    let c = TcpComm::connect(store, server, &addr, prefix, r, n, TOKEN, cfg)?;
                    f(&c)
                })
            })
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("rank {r}: {e}"))
            })
            .collect()
    })
}

fn hello(rank: u32, token: &[u8]) -> Vec<u8> {
    let mut v = b"FCCH".to_vec();
    v.extend_from_slice(&rank.to_le_bytes());
    v.extend_from_slice(&(token.len() as u32).to_le_bytes());
    v.extend_from_slice(token);
    v
}

fn frame_header(kind: u8, seq: u64, step: u32, len: u64) -> Vec<u8> {
    let mut v = b"FCC1".to_vec();
    v.push(kind);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&step.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    // the collective's signature (kind, dtype, op, root, count: 15 bytes; issue 19)
    v.extend_from_slice(&[0u8; 15]);
    v
}

/// The transport address rank `j` of mesh `prefix` published in the store.
fn transport_addr(store: &StoreClient, prefix: &str, j: usize) -> String {
    String::from_utf8(store.get(&format!("{prefix}/addr/{j}"), T).unwrap()).unwrap()
}

/// A real rank 0 of a 2-rank mesh whose rank 1 is a raw socket: `peer` gets the socket once the hello
/// was sent and does what the test wants with it; `rank0` runs on the communicator (on this thread,
/// bounded by `limit` so that a hang fails the test instead of stalling the suite) and gets the
/// communicator by value so it can time dropping it.
fn with_raw_rank1<R: Send + 'static>(
    prefix: &'static str,
    cfg: Config,
    limit: Duration,
    peer: impl FnOnce(TcpStream) + Send + 'static,
    rank0: impl FnOnce(TcpComm) -> R + Send + 'static,
) -> R {
    let server = StoreServer::bind("127.0.0.1:0", TOKEN).unwrap();
    let addr = server.local_addr().to_string();
    let a = addr.clone();
    let raw = std::thread::spawn(move || {
        let store = StoreClient::connect(&a, TOKEN, T).unwrap();
        let mut s = TcpStream::connect(transport_addr(&store, prefix, 0)).unwrap();
        s.write_all(&hello(1, TOKEN.as_bytes())).unwrap();
        peer(s);
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let store = Arc::new(StoreClient::connect(&addr, TOKEN, T).unwrap());
        let c = TcpComm::connect(
            store,
            Arc::new(Some(server)),
            &addr,
            prefix,
            0,
            2,
            TOKEN,
            cfg,
        )
        .unwrap_or_else(|e| panic!("rank 0 connect: {e}"));
        let _ = tx.send(rank0(c));
    });
    let r = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("rank 0 did not finish within {limit:?} (hung or panicked)"));
    raw.join().unwrap();
    r
}

/// Whether the other end closed `s` (EOF or reset) within `within`; false if it stays open.
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while start.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn every_collective_over_sockets() {
    let k = mesh(3, |c| {
        let mut k = 0;
        for n in [0usize, 1, 13, 1031] {
            k += common::suite::all_dtypes(c, n)?;
        }
        k += common::suite::collectives_t::<f32>(c, 100_003, &[ReduceOp::Sum, ReduceOp::Avg])?;
        Ok(k)
    });
    assert!(k.iter().all(|&k| k > 300), "{k:?}");
}

#[test]
fn split_over_sockets() {
    let out = mesh(4, |c| {
        let sub = c.split(Some((c.rank() / 2) as u32), 0)?.expect("member");
        let mut v = [c.rank() as i32];
        sub.all_reduce(&mut v, ReduceOp::Sum)?;
        Ok((sub.rank(), sub.world_size(), v[0]))
    });
    assert_eq!(out, vec![(0, 2, 1), (1, 2, 1), (0, 2, 5), (1, 2, 5)]);
}

/// Set in the child process of [`split_reuses_the_communicators_token`]: the store address.
const SPLIT_CHILD: &str = "FERROCCL_TEST_SPLIT_CHILD_STORE";

fn split_rank(addr: &str, rank: usize, server: Option<StoreServer>) -> Result<i32> {
    let cfg = Config::default().with_timeout(Duration::from_secs(20));
    let store = Arc::new(StoreClient::connect(addr, TOKEN, T)?);
    let c = TcpComm::connect(
        store,
        Arc::new(server),
        addr,
        "split-token",
        rank,
        2,
        TOKEN,
        cfg,
    )?;
    let sub = c.split(Some(0), 0)?.expect("member");
    let mut v = [rank as i32 + 1];
    sub.all_reduce(&mut v, ReduceOp::Sum)?;
    Ok(v[0])
}

#[test]
fn split_reuses_the_communicators_token() {
    // Rank 1 runs in a child process whose FERROCCL_TOKEN differs from this process's: a split that
    // re-read the variable would send different hello tokens on the two ranks and never connect.
    if let Ok(addr) = std::env::var(SPLIT_CHILD) {
        assert_eq!(split_rank(&addr, 1, None).unwrap(), 3);
        return;
    }
    let server = StoreServer::bind("127.0.0.1:0", TOKEN).unwrap();
    let addr = server.local_addr().to_string();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "split_reuses_the_communicators_token",
            "--test-threads=1",
        ])
        .env(SPLIT_CHILD, &addr)
        .env("FERROCCL_TOKEN", "the-child-has-another-token")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mine = split_rank(&addr, 0, Some(server));
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "child (rank 1) failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mine.unwrap(), 3);
}

#[test]
fn connect_rejects_a_rank_outside_the_world() {
    let server = StoreServer::bind("127.0.0.1:0", TOKEN).unwrap();
    let addr = server.local_addr().to_string();
    let store = Arc::new(StoreClient::connect(&addr, TOKEN, T).unwrap());
    let server = Arc::new(Some(server));
    let cfg = Config::default().with_timeout(Duration::from_secs(5));
    let connect = |rank, size| {
        TcpComm::connect(
            store.clone(),
            server.clone(),
            &addr,
            "bad",
            rank,
            size,
            TOKEN,
            cfg.clone(),
        )
    };
    match connect(2, 2) {
        Err(Error::RankOutOfRange { rank, world, .. }) => assert_eq!((rank, world), (2, 2)),
        other => panic!(
            "rank 2 of 2: expected RankOutOfRange, got {:?}",
            other.err()
        ),
    }
    match connect(0, 0) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("world size"), "{m}"),
        other => panic!("size 0: expected InvalidArgument, got {:?}", other.err()),
    }
}

#[test]
fn strangers_on_the_transport_port_do_not_stop_the_mesh() {
    // Ranks 0 and 1 start and publish their transport addresses; strangers then connect to both
    // (silent, an HTTP request, a wrong token, a hello that stops half way, an absurd token length);
    // only then does rank 2 start. The mesh must form at once, not after per-stranger timeouts.
    const N: usize = 3;
    const LEN: usize = 100_003;
    let cfg = Config::default().with_timeout(Duration::from_secs(30));
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let ready_rx = std::sync::Mutex::new(ready_rx);
    let (socks_tx, socks_rx) = mpsc::channel::<Vec<(String, TcpStream)>>();
    let prefix = "strangers";
    let server = StoreServer::bind("127.0.0.1:0", TOKEN).unwrap();
    let addr = server.local_addr().to_string();
    let server = Arc::new(Some(server));
    let a = addr.clone();
    let strangers = std::thread::spawn(move || {
        let store = StoreClient::connect(&a, TOKEN, T).unwrap();
        let mut socks = Vec::new();
        for j in 0..2 {
            let ta = transport_addr(&store, prefix, j);
            let open = || TcpStream::connect(&ta).unwrap();
            socks.push((format!("silent→{j}"), open()));
            let mut g = open();
            g.write_all(b"GET / HTTP/1.1\r\nHost: ferroccl\r\n\r\n")
                .unwrap();
            socks.push((format!("http→{j}"), g));
            let mut w = open();
            w.write_all(&hello(2, b"not-the-token")).unwrap();
            socks.push((format!("wrong token→{j}"), w));
            let mut p = open();
            let h = hello(2, &[b'x'; 4000]);
            p.write_all(&h[..100]).unwrap();
            socks.push((format!("half a hello→{j}"), p));
            let mut l = open();
            l.write_all(&b"FCCH\x02\0\0\0\xff\xff\xff\x7f"[..]).unwrap();
            socks.push((format!("2 GiB token→{j}"), l));
        }
        // Let the ranks see the strangers before rank 2 shows up.
        std::thread::sleep(Duration::from_millis(200));
        ready_tx.send(()).unwrap();
        socks_tx.send(socks).unwrap();
    });
    let started = std::sync::Mutex::new(None::<Instant>);
    let out = std::thread::scope(|s| {
        let hs: Vec<_> = (0..N)
            .map(|r| {
                let (addr, server, cfg) = (addr.clone(), server.clone(), cfg.clone());
                let (ready_rx, started) = (&ready_rx, &started);
                s.spawn(move || -> Result<(Duration, Vec<f32>)> {
                    if r == N - 1 {
                        ready_rx.lock().unwrap().recv().unwrap();
                        *started.lock().unwrap() = Some(Instant::now());
                    }
                    let store = Arc::new(StoreClient::connect(&addr, TOKEN, T)?);
                    let c = TcpComm::connect(store, server, &addr, prefix, r, N, TOKEN, cfg)?;
                    let formed = started.lock().unwrap().map(|t| t.elapsed());
                    let mut v: Vec<f32> = common::input(r, LEN, ReduceOp::Sum);
                    c.all_reduce(&mut v, ReduceOp::Sum)?;
                    Ok((formed.unwrap_or_default(), v))
                })
            })
            .collect();
        hs.into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("rank {r}: {e}"))
            })
            .collect::<Vec<_>>()
    });
    strangers.join().unwrap();
    let want: Vec<f32> = common::reduced_vec(N, LEN, ReduceOp::Sum);
    for (r, (formed, v)) in out.iter().enumerate() {
        eprintln!("strangers: rank {r}'s mesh formed {formed:?} after the last rank started");
        assert!(
            *formed < Duration::from_secs(5),
            "rank {r}: the mesh took {formed:?} after the last rank started"
        );
        assert!(
            v == &want,
            "rank {r}: all_reduce differs from the reference"
        );
    }
    // Every stranger's socket was closed: the rejected ones at once, the incomplete ones when the
    // mesh was complete.
    for (what, mut s) in socks_rx.recv().unwrap() {
        assert!(
            closed_by_peer(&mut s, Duration::from_secs(2)),
            "stranger {what} is still connected"
        );
    }
}

#[test]
fn a_peer_that_stops_reading_fails_the_collective_and_drop_returns() {
    // Rank 1 completes the hello and then never reads: rank 0's 64 MiB all_gather fills the socket
    // buffers and its writer blocks. The collective must fail within about the 2 s timeout and
    // dropping the communicator must return promptly (no lock held across the blocked write).
    let cfg = Config::default().with_timeout(Duration::from_secs(2));
    let (hold_tx, hold_rx) = mpsc::channel::<()>();
    let (r, took, dropped) = with_raw_rank1(
        "stuck",
        cfg,
        Duration::from_secs(40),
        move |s| {
            // Keep the socket open, unread, until rank 0 is done.
            let _ = hold_rx.recv_timeout(Duration::from_secs(40));
            drop(s);
        },
        move |c| {
            let send = vec![1.0f32; 16 << 20];
            let mut recv = vec![0.0f32; 32 << 20];
            let t = Instant::now();
            let r = c.all_gather(&send[..], &mut recv[..]);
            let took = t.elapsed();
            let t = Instant::now();
            drop(c);
            let dropped = t.elapsed();
            let _ = hold_tx.send(());
            (r, took, dropped)
        },
    );
    eprintln!("stuck peer: all_gather returned {r:?} after {took:?}; drop took {dropped:?}");
    assert!(
        matches!(
            r,
            Err(Error::Timeout { .. } | Error::Hang { .. } | Error::PeerLost { .. })
        ),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(8), "all_gather took {took:?}");
    assert!(dropped < Duration::from_secs(8), "drop took {dropped:?}");
}

#[test]
fn dropping_with_work_queued_for_a_hung_peer_is_bounded() {
    // Rank 1 reads everything but never sends (a hung process): each all_reduce queued on rank 0
    // would wait the whole timeout for it. Dropping the communicator waits for the queue at most
    // one timeout, then closes the connections so the rest fails at once: about 1.5 s, not 5 × 1.5.
    let cfg = Config::default().with_timeout(Duration::from_millis(1500));
    let (works, dropped) = with_raw_rank1(
        "hung",
        cfg,
        Duration::from_secs(40),
        |mut s| {
            let mut sink = vec![0u8; 1 << 16];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        },
        |c| {
            let works: Vec<_> = (0..5)
                .map(|_| c.iall_reduce(vec![1.0f32; 1000], ReduceOp::Sum).unwrap())
                .collect();
            let t = Instant::now();
            drop(c);
            (works, t.elapsed())
        },
    );
    eprintln!("hung peer: drop with 5 queued all_reduces took {dropped:?}");
    assert!(dropped < Duration::from_secs(5), "drop took {dropped:?}");
    for w in works {
        let r = w.wait();
        assert!(
            matches!(
                r,
                Err(Error::Timeout { .. } | Error::Hang { .. } | Error::PeerLost { .. })
            ),
            "{:?}",
            r.map(|v| v.len())
        );
    }
}

#[test]
fn a_frame_declaring_a_terabyte_is_not_allocated_up_front() {
    // A frame header declaring 1 TiB - 1 (under the sanity bound), 3 MiB of it, then a close:
    // allocating the declared length would abort this process; instead rank 0 loses the peer.
    let cfg = Config::default().with_timeout(Duration::from_secs(20));
    let (r, took) = with_raw_rank1(
        "huge",
        cfg,
        Duration::from_secs(40),
        |mut s| {
            let _ = s.write_all(&frame_header(1, 1, 0, (1 << 40) - 1));
            let _ = s.write_all(&vec![0u8; 3 << 20]);
        },
        |c| {
            let t = Instant::now();
            let mut v = vec![1.0f32; 1000];
            let r = c.all_reduce(&mut v[..], ReduceOp::Sum);
            (r, t.elapsed())
        },
    );
    assert!(matches!(r, Err(Error::PeerLost { rank: 1, .. })), "{r:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn garbage_or_a_close_mid_run_is_a_lost_peer() {
    for (name, bytes) in [
        (
            "bad magic",
            b"HTTP/1.1 200 OK\r\n\r\n plus some more bytes".to_vec(),
        ),
        ("unknown kind", frame_header(9, 1, 0, 0)),
        ("over the frame limit", frame_header(1, 1, 0, u64::MAX)),
        ("half a header", frame_header(1, 1, 0, 8)[..10].to_vec()),
        ("nothing", Vec::new()),
    ] {
        let cfg = Config::default().with_timeout(Duration::from_secs(20));
        let (first, second, took) = with_raw_rank1(
            "garbage",
            cfg,
            Duration::from_secs(40),
            move |mut s| {
                let _ = s.write_all(&bytes);
                // then close
            },
            |c| {
                let t = Instant::now();
                let mut v = vec![1i64; 4096];
                let first = c.all_reduce(&mut v[..], ReduceOp::Sum);
                let second = c.barrier();
                (first, second, t.elapsed())
            },
        );
        assert!(
            matches!(first, Err(Error::PeerLost { rank: 1, .. })),
            "{name}: {first:?}"
        );
        assert!(
            matches!(second, Err(Error::PeerLost { rank: 1, .. })),
            "{name}: the communicator stays broken: {second:?}"
        );
        assert!(took < Duration::from_secs(10), "{name}: {took:?}");
    }
}

#[test]
fn a_rank_that_drops_its_communicator_is_a_lost_peer_for_the_others() {
    // Rank 2 leaves after one all_reduce. The barrier that follows on ranks 0 and 1 (dissemination:
    // each of them receives from rank 2 directly) fails with PeerLost well inside the timeout, and so
    // does every later collective.
    let cfg = Config::default().with_timeout(Duration::from_secs(30));
    let out = mesh_with(
        3,
        "leave",
        cfg,
        |_| {},
        |c| {
            let mut v = [c.rank() as i64 + 1];
            c.all_reduce(&mut v, ReduceOp::Sum)?;
            assert_eq!(v[0], 6);
            if c.rank() == 2 {
                return Ok(None);
            }
            let t = Instant::now();
            let b = c.barrier();
            let took = t.elapsed();
            let again = c.all_reduce(&mut v, ReduceOp::Sum);
            Ok(Some((b, again, took)))
        },
    );
    for (r, o) in out.into_iter().enumerate().take(2) {
        let (b, again, took) = o.expect("ranks 0 and 1 report");
        assert!(
            matches!(b, Err(Error::PeerLost { rank: 2, .. })),
            "rank {r}: {b:?}"
        );
        assert!(
            matches!(again, Err(Error::PeerLost { rank: 2, .. })),
            "rank {r}: {again:?}"
        );
        assert!(took < Duration::from_secs(10), "rank {r}: {took:?}");
    }
}

#[test]
fn processes_launched_torchrun_style_run_the_example() {
    // The allreduce example through init(): 3 processes, env rendezvous, TCP transport.
    // Look in this crate's target dir and in the one this test binary runs from (CARGO_TARGET_DIR).
    let mut targets = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target")];
    if let Some(t) = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.parent()?.to_path_buf()))
    {
        targets.push(t);
    }
    let bin = targets
        .iter()
        .flat_map(|t| {
            ["release", "debug"]
                .iter()
                .map(move |p| t.join(p).join("examples").join("allreduce"))
        })
        .find(|p| p.exists());
    let Some(bin) = bin else {
        let msg = "the allreduce example is not built: run `cargo build --release --examples`";
        if std::env::var("FERROCCL_REQUIRE_EXAMPLES").as_deref() == Ok("1") {
            panic!("{msg} (FERROCCL_REQUIRE_EXAMPLES=1 makes this a failure)");
        }
        eprintln!("skipping: {msg}");
        return;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let kids: Vec<_> = (0..3)
        .map(|r| {
            std::process::Command::new(&bin)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "3")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("FERROCCL_TOKEN", "tok")
                .env("FERROCCL_TIMEOUT", "60")
                .env_remove("FERROCCL_BACKEND")
                .env_remove("OMPI_COMM_WORLD_SIZE")
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = kids
        .into_iter()
        .map(|k| k.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    }
    let s = String::from_utf8_lossy(&outs[0].stdout);
    assert!(
        s.contains(r#""backend":"tcp""#) && s.contains(r#""ok":true"#),
        "{s}"
    );
}

#[test]
fn traffic_counters_match_a_hand_count_over_sockets() {
    let checks = mesh(4, common::traffic::hand_count);
    assert!(checks.iter().all(|&k| k >= 7), "{checks:?}");
}
