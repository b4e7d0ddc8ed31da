//! Integration tests of the rendezvous store: round trips, blocking gets, barriers, authentication,
//! hostile peers, the server's limits (connections, keys, bytes, waits), the client's reply bound and
//! the torchrun-style environment.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ferroccl::rendezvous::{EnvRendezvous, StoreClient, StoreLimits, StoreServer};
use ferroccl::Error;
use rand::{Rng, SeedableRng};

const T: Duration = Duration::from_secs(10);
const TOKEN: &str = "s3cret";

fn server() -> StoreServer {
    StoreServer::bind("127.0.0.1:0", TOKEN).unwrap_or_else(|e| panic!("bind: {e}"))
}

fn client(s: &StoreServer) -> StoreClient {
    StoreClient::connect(&s.local_addr().to_string(), TOKEN, T)
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// A raw frame with the store's header layout.
fn raw_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xFC, 1, op];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn auth_frame(token: &str) -> Vec<u8> {
    raw_frame(0x01, token.as_bytes())
}

/// Read until the server closes the connection (or 5 s pass); returns everything it sent.
fn read_until_close(s: &mut TcpStream) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(5) {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            // A reset also means the server dropped us.
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

/// The good client still works: a fresh round trip through the store.
fn assert_serving(good: &StoreClient, tag: &str) {
    let key = format!("alive/{tag}");
    good.set(&key, tag.as_bytes()).unwrap();
    assert_eq!(good.get(&key, T).unwrap(), tag.as_bytes());
    let other = client_for(good);
    assert_eq!(other.get(&key, T).unwrap(), tag.as_bytes());
}

fn client_for(c: &StoreClient) -> StoreClient {
    StoreClient::connect(c.addr(), TOKEN, T).unwrap()
}

#[test]
fn set_get_add_check_delete_round_trip() {
    let s = server();
    let a = client(&s);
    let b = client(&s);

    a.set("k", b"hello").unwrap();
    assert_eq!(b.get("k", T).unwrap(), b"hello");
    b.set("k", b"").unwrap();
    assert_eq!(a.get("k", T).unwrap(), b"");
    let big = vec![7u8; 1 << 20];
    a.set("big", &big).unwrap();
    assert_eq!(b.get("big", T).unwrap(), big);

    assert_eq!(a.add("ctr", 5).unwrap(), 5);
    assert_eq!(b.add("ctr", -2).unwrap(), 3);
    assert_eq!(a.add("ctr", 0).unwrap(), 3);
    assert_eq!(b.get("ctr", T).unwrap(), b"3");
    // ADD on a non-counter is refused but the connection stays usable.
    match a.add("k", 1) {
        Err(Error::Rendezvous(m)) => assert!(m.contains("not a decimal integer"), "{m}"),
        other => panic!("expected Rendezvous error, got {other:?}"),
    }
    assert_eq!(a.add("ctr", 1).unwrap(), 4);

    assert!(a.check("k").unwrap());
    assert!(!b.check("nope").unwrap());
    assert!(b.delete("k").unwrap());
    assert!(!a.check("k").unwrap());
    assert!(!a.delete("k").unwrap());
    assert!(matches!(
        a.get("k", Duration::from_millis(50)),
        Err(Error::Timeout { .. })
    ));
    // Unicode keys.
    a.set("ключ/🔑", b"v").unwrap();
    assert_eq!(b.get("ключ/🔑", T).unwrap(), b"v");
}

#[test]
fn get_blocks_until_another_thread_sets() {
    let s = server();
    let a = client(&s);
    let addr = s.local_addr().to_string();
    let start = Instant::now();
    let setter = std::thread::spawn(move || {
        let b = StoreClient::connect(&addr, TOKEN, T).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        b.set("late", b"value-42").unwrap();
    });
    let v = a.get("late", T).unwrap();
    assert_eq!(v, b"value-42");
    assert!(start.elapsed() >= Duration::from_millis(250));
    setter.join().unwrap();
}

#[test]
fn get_times_out_on_missing_key() {
    let s = server();
    let a = client(&s);
    let start = Instant::now();
    match a.get("missing", Duration::from_millis(200)) {
        Err(Error::Timeout { during, after, .. }) => {
            assert_eq!(during, "rendezvous get");
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("expected timeout, got {other:?}"),
    }
    let el = start.elapsed();
    assert!(
        el >= Duration::from_millis(190) && el < Duration::from_secs(5),
        "{el:?}"
    );
    // The connection is still usable after a server-side timeout.
    a.set("missing", b"now").unwrap();
    assert_eq!(a.get("missing", T).unwrap(), b"now");
}

#[test]
fn many_waiters_are_all_woken() {
    let s = server();
    let addr = s.local_addr().to_string();
    let hs: Vec<_> = (0..6)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let c = StoreClient::connect(&addr, TOKEN, T).unwrap();
                c.get("go", T).unwrap()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    client(&s).set("go", b"now").unwrap();
    for h in hs {
        assert_eq!(h.join().unwrap(), b"now");
    }
}

#[test]
fn barrier_eight_threads_three_generations() {
    const N: usize = 8;
    let s = server();
    let addr = s.local_addr().to_string();
    let arrived = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..N)
        .map(|i| {
            let addr = addr.clone();
            let arrived = Arc::clone(&arrived);
            std::thread::spawn(move || {
                let c = StoreClient::connect(&addr, TOKEN, T).unwrap();
                for generation in 1..=3 {
                    // Stagger arrivals so early threads really wait.
                    std::thread::sleep(Duration::from_millis((i * 7 % 5) as u64 * 10));
                    arrived.fetch_add(1, Ordering::SeqCst);
                    c.barrier("step", N, T).unwrap();
                    let seen = arrived.load(Ordering::SeqCst);
                    assert!(
                        seen >= N * generation,
                        "thread {i} left generation {generation} with only {seen} arrivals"
                    );
                    // Nobody can be more than one generation ahead of us.
                    assert!(seen <= N * (generation + 1), "{seen}");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(arrived.load(Ordering::SeqCst), 3 * N);
    // Old generation keys were cleaned up; only the last one remains.
    let c = client(&s);
    assert!(!c.check("__ferroccl/barrier/step/0").unwrap());
    assert!(!c.check("__ferroccl/barrier/step/1").unwrap());
    assert!(c.check("__ferroccl/barrier/step/2").unwrap());
}

#[test]
fn barrier_times_out_when_someone_is_missing() {
    let s = server();
    let c = client(&s);
    match c.barrier("lonely", 2, Duration::from_millis(150)) {
        Err(Error::Timeout { during, .. }) => assert_eq!(during, "rendezvous barrier"),
        other => panic!("expected timeout, got {other:?}"),
    }
    assert!(matches!(
        c.barrier("x", 0, T),
        Err(Error::InvalidArgument(_))
    ));
    c.barrier("solo", 1, T).unwrap();
    c.barrier("solo", 1, T).unwrap();
}

#[test]
fn wrong_token_is_rejected_and_server_keeps_serving() {
    let s = server();
    let addr = s.local_addr().to_string();
    match StoreClient::connect(&addr, "wrong", T) {
        Err(Error::BadToken { addr: a }) => assert_eq!(a, addr),
        other => panic!("expected BadToken, got {other:?}"),
    }
    match StoreClient::connect(&addr, "", T) {
        Err(Error::BadToken { .. }) => {}
        other => panic!("expected BadToken, got {other:?}"),
    }
    match StoreClient::connect(&addr, "s3cret-and-more", T) {
        Err(Error::BadToken { .. }) => {}
        other => panic!("expected BadToken, got {other:?}"),
    }
    let good = client(&s);
    assert_serving(&good, "after-bad-token");

    // The empty token means "no secret" but still has to match.
    let open = StoreServer::bind("127.0.0.1:0", "").unwrap();
    let oaddr = open.local_addr().to_string();
    let c = StoreClient::connect(&oaddr, "", T).unwrap();
    c.set("a", b"b").unwrap();
    assert!(matches!(
        StoreClient::connect(&oaddr, "x", T),
        Err(Error::BadToken { .. })
    ));
}

#[test]
fn connect_retries_until_server_starts() {
    // Reserve a port, release it, and start the server there only after the client began connecting.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let a2 = addr.clone();
    let h = std::thread::spawn(move || StoreClient::connect(&a2, TOKEN, T));
    std::thread::sleep(Duration::from_millis(300));
    let s = StoreServer::bind(&addr, TOKEN).unwrap();
    let c = h.join().unwrap().unwrap();
    c.set("k", b"v").unwrap();
    assert_eq!(client(&s).get("k", T).unwrap(), b"v");

    // Nobody listening at all: a bounded failure that names the address.
    drop(c);
    drop(s);
    let start = Instant::now();
    match StoreClient::connect(&addr, TOKEN, Duration::from_millis(300)) {
        Err(Error::Rendezvous(m)) => assert!(m.contains(&addr), "{m}"),
        other => panic!("expected Rendezvous error, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn closed_server_gives_error_naming_the_store() {
    let s = server();
    let addr = s.local_addr().to_string();
    let c = client(&s);
    c.set("k", b"v").unwrap();
    // A blocked get is released when the server goes away.
    let addr2 = addr.clone();
    let waiter = std::thread::spawn(move || {
        let w = StoreClient::connect(&addr2, TOKEN, T).unwrap();
        w.get("never", Duration::from_secs(30))
    });
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    drop(s);
    assert!(start.elapsed() < Duration::from_secs(3));
    let r = waiter.join().unwrap();
    let msg = match r {
        Err(e @ (Error::Rendezvous(_) | Error::Io { .. })) => e.to_string(),
        other => panic!("expected closed-store error, got {other:?}"),
    };
    assert!(msg.contains(&addr) && msg.contains("closed"), "{msg}");
    let msg = match c.get("k", T) {
        Err(e @ (Error::Rendezvous(_) | Error::Io { .. })) => e.to_string(),
        other => panic!("expected closed-store error, got {other:?}"),
    };
    assert!(msg.contains(&addr) && msg.contains("closed"), "{msg}");
    // Later calls keep failing instead of reading a stale stream.
    assert!(c.set("k", b"v").is_err());
}

#[test]
fn garbage_reply_gives_bad_frame() {
    // A fake "store" that answers AUTH with garbage.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    match StoreClient::connect(&addr, TOKEN, T) {
        Err(Error::BadFrame { peer, .. }) => assert_eq!(peer, addr),
        other => panic!("expected BadFrame, got {other:?}"),
    }
    h.join().unwrap();
}

#[test]
fn hostile_peers_do_not_disturb_good_clients() {
    let s = StoreServer::bind_with_auth_timeout("127.0.0.1:0", TOKEN, Duration::from_millis(500))
        .unwrap();
    let addr = s.local_addr();
    let good = client(&s);
    assert_serving(&good, "start");

    // A silent peer stays connected while the good client works.
    let mut silent = TcpStream::connect(addr).unwrap();
    // A peer that sent half a header and stalls.
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.write_all(&[0xFC, 1]).unwrap();
    assert_serving(&good, "with-silent-peers");

    // 1. Random garbage (seeded), several times.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xFE44_0CC1);
    for i in 0..8 {
        let mut g = TcpStream::connect(addr).unwrap();
        let n = rng.gen_range(1..4096);
        let mut bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        if bytes[0] == 0xFC {
            bytes[0] = 0;
        }
        g.write_all(&bytes).unwrap();
        assert_serving(&good, &format!("garbage-{i}"));
        let (reply, closed) = read_until_close(&mut g);
        assert!(closed, "garbage connection {i} was not closed");
        assert_eq!(
            reply.get(..3),
            Some(&[0xFC, 1, 0x85][..]),
            "expected ERROR frame"
        );
    }

    // 2. A truncated frame, then close (before and after auth).
    {
        let mut t = TcpStream::connect(addr).unwrap();
        let f = auth_frame(TOKEN);
        t.write_all(&f[..f.len() - 2]).unwrap();
        drop(t);
        let mut t = TcpStream::connect(addr).unwrap();
        t.write_all(&auth_frame(TOKEN)).unwrap();
        let mut set = raw_frame(0x02, &[0, 0, 0, 1, b'k', b'v', b'v']);
        set.truncate(9);
        t.write_all(&set).unwrap();
        drop(t);
        assert_serving(&good, "truncated");
    }

    // 3. An oversize length prefix (before and after auth).
    for authed in [false, true] {
        let mut o = TcpStream::connect(addr).unwrap();
        if authed {
            o.write_all(&auth_frame(TOKEN)).unwrap();
        }
        o.write_all(&[0xFC, 1, 0x02, 0xFF, 0xFF, 0xFF, 0xFF])
            .unwrap();
        let (reply, closed) = read_until_close(&mut o);
        assert!(closed);
        let skip = if authed { 7 } else { 0 }; // the OK reply to AUTH
        assert_eq!(reply.get(skip..skip + 3), Some(&[0xFC, 1, 0x85][..]));
        let msg = String::from_utf8_lossy(&reply[skip + 7..]).to_string();
        assert!(msg.contains("exceeds"), "{msg}");
        assert_serving(&good, &format!("oversize-{authed}"));
    }

    // 4. A valid frame with an unknown opcode, after auth.
    {
        let mut u = TcpStream::connect(addr).unwrap();
        u.write_all(&auth_frame(TOKEN)).unwrap();
        u.write_all(&raw_frame(0x42, b"whatever")).unwrap();
        let (reply, closed) = read_until_close(&mut u);
        assert!(closed);
        assert_eq!(&reply[..7], &[0xFC, 1, 0x80, 0, 0, 0, 0]); // OK to AUTH
        assert_eq!(&reply[7..10], &[0xFC, 1, 0x85]);
        assert!(String::from_utf8_lossy(&reply[14..]).contains("opcode 0x42"));
        assert_serving(&good, "unknown-op");
    }

    // 5. A valid request before auth.
    {
        let mut b = TcpStream::connect(addr).unwrap();
        b.write_all(&raw_frame(0x05, b"alive/start")).unwrap();
        let (reply, closed) = read_until_close(&mut b);
        assert!(closed);
        assert_eq!(&reply[..3], &[0xFC, 1, 0x85]);
        assert!(String::from_utf8_lossy(&reply[7..]).contains("before AUTH"));
        assert_serving(&good, "before-auth");
    }

    // 6. Invalid UTF-8 in a key, and a wrong protocol version.
    {
        let mut k = TcpStream::connect(addr).unwrap();
        k.write_all(&auth_frame(TOKEN)).unwrap();
        k.write_all(&raw_frame(0x05, &[0xFF, 0xFE, 0xFD])).unwrap();
        let (reply, closed) = read_until_close(&mut k);
        assert!(closed);
        assert!(String::from_utf8_lossy(&reply[14..]).contains("UTF-8"));
        let mut v = TcpStream::connect(addr).unwrap();
        v.write_all(&[0xFC, 9, 0x01, 0, 0, 0, 0]).unwrap();
        let (reply, closed) = read_until_close(&mut v);
        assert!(closed);
        assert!(String::from_utf8_lossy(&reply[7..]).contains("version"));
        assert_serving(&good, "bad-utf8");
    }

    // The silent and stalled peers are eventually dropped by the auth timeout.
    let (reply, closed) = read_until_close(&mut silent);
    assert!(closed, "silent peer was never dropped");
    assert_eq!(reply.get(..3), Some(&[0xFC, 1, 0x85][..]));
    let (_, closed) = read_until_close(&mut stalled);
    assert!(closed, "stalled peer was never dropped");
    assert_serving(&good, "end");
}

#[test]
fn concurrent_hostile_and_good_traffic() {
    let s = StoreServer::bind_with_auth_timeout("127.0.0.1:0", TOKEN, Duration::from_millis(300))
        .unwrap();
    let addr = s.local_addr();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attackers: Vec<_> = (0..3u64)
        .map(|seed| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut g) = TcpStream::connect(addr) {
                        let mut bytes: Vec<u8> =
                            (0..rng.gen_range(0..512)).map(|_| rng.gen()).collect();
                        if rng.gen_bool(0.5) {
                            // Start like a real frame so the parser gets further.
                            bytes.splice(0..0, [0xFC, 1]);
                        }
                        let _ = g.write_all(&bytes);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    let good = client(&s);
    for i in 0..50 {
        good.set(&format!("k{i}"), &[i as u8]).unwrap();
        assert_eq!(good.get(&format!("k{i}"), T).unwrap(), vec![i as u8]);
        assert_eq!(good.add("n", 1).unwrap(), i + 1);
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
}

/// Raw connection that has authenticated (the OK reply consumed).
fn raw_authed(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&auth_frame(TOKEN)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut ok = [0u8; 7];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(ok, [0xFC, 1, 0x80, 0, 0, 0, 0], "OK reply to AUTH");
    s
}

#[test]
fn before_auth_only_a_token_sized_auth_frame_is_read() {
    // A long auth timeout, so that only refusing on the header (not a deadline) can answer quickly.
    let s =
        StoreServer::bind_with_auth_timeout("127.0.0.1:0", TOKEN, Duration::from_secs(30)).unwrap();
    let addr = s.local_addr();
    let good = client(&s);
    // An AUTH header declaring 64 MiB (the general frame limit) and no payload: refused at once
    // with the token limit in the message, without waiting for (or allocating) the payload.
    let mut big = TcpStream::connect(addr).unwrap();
    big.write_all(&[0xFC, 1, 0x01, 0x04, 0, 0, 0]).unwrap();
    let start = Instant::now();
    let (reply, closed) = read_until_close(&mut big);
    assert!(
        closed && start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(reply.get(..3), Some(&[0xFC, 1, 0x85][..]));
    let msg = String::from_utf8_lossy(&reply[7..]).to_string();
    assert!(msg.contains("4096") && msg.contains("exceeds"), "{msg}");
    // A SET header declaring 1 MiB before AUTH: refused on the header too.
    let mut set = TcpStream::connect(addr).unwrap();
    set.write_all(&[0xFC, 1, 0x02, 0, 0x10, 0, 0]).unwrap();
    let start = Instant::now();
    let (reply, closed) = read_until_close(&mut set);
    assert!(closed && start.elapsed() < Duration::from_secs(3));
    let msg = String::from_utf8_lossy(reply.get(7..).unwrap_or_default()).to_string();
    assert!(msg.contains("SET before AUTH"), "{msg}");
    // A token at the limit still authenticates; one byte more is refused by the client itself.
    let long = "t".repeat(4096);
    let ls = StoreServer::bind("127.0.0.1:0", &long).unwrap();
    StoreClient::connect(&ls.local_addr().to_string(), &long, T).unwrap();
    assert!(matches!(
        StoreClient::connect(&ls.local_addr().to_string(), &"t".repeat(4097), T),
        Err(Error::InvalidArgument(_))
    ));
    assert_serving(&good, "after-pre-auth");
}

#[test]
fn connections_over_the_limit_are_refused_and_the_store_keeps_serving() {
    let limits = StoreLimits {
        max_connections: 3,
        auth_timeout: Duration::from_secs(30),
        ..StoreLimits::default()
    };
    let s = StoreServer::bind_with_limits("127.0.0.1:0", TOKEN, limits).unwrap();
    let addr = s.local_addr();
    let good = client(&s);
    // Two more authenticated connections fill the store; silent ones do not count (issue 19).
    let authed: Vec<TcpStream> = (0..2).map(|_| raw_authed(addr)).collect();
    let _silent: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Full: a fourth client retries until its timeout, then gets an error naming the limit.
    let start = Instant::now();
    match StoreClient::connect(&addr.to_string(), TOKEN, Duration::from_secs(1)) {
        Err(Error::Rendezvous(m)) => assert!(m.contains("max_connections"), "{m}"),
        other => panic!("expected a refusal naming max_connections, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(3));
    let mut extra = TcpStream::connect(addr).unwrap();
    extra.write_all(&auth_frame(TOKEN)).unwrap();
    let (reply, closed) = read_until_close(&mut extra);
    assert!(closed, "a connection over the limit was kept open");
    assert_eq!(reply.get(..3), Some(&[0xFC, 1, 0x85][..]));
    // The clients already in are served as before.
    good.set("k", b"v").unwrap();
    assert_eq!(good.get("k", T).unwrap(), b"v");
    // Once two leave, there is room again (the client retries until then).
    drop(authed);
    let c = StoreClient::connect(&addr.to_string(), TOKEN, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("no room after two connections closed: {e}"));
    assert_eq!(c.get("k", T).unwrap(), b"v");
}

#[test]
fn stored_keys_and_bytes_are_capped_with_a_named_error() {
    let limits = StoreLimits {
        max_keys: 4,
        max_bytes: 64,
        ..StoreLimits::default()
    };
    let s = StoreServer::bind_with_limits("127.0.0.1:0", TOKEN, limits).unwrap();
    let c = client(&s);
    let refused = |r: ferroccl::Result<()>, limit: &str| match r {
        Err(Error::Rendezvous(m)) => assert!(m.contains(limit), "{m}"),
        other => panic!("expected a refusal naming {limit}, got {other:?}"),
    };
    // Bytes are key + value lengths: a, b, c hold 11 each, the counter n 2: 35 bytes in 4 keys.
    for k in ["a", "b", "c"] {
        c.set(k, &[b'x'; 10]).unwrap();
    }
    assert_eq!(c.add("n", 5).unwrap(), 5);
    refused(c.set("d", b""), "max_keys");
    refused(c.add("m", 1).map(|_| ()), "max_keys");
    // Replacing a value is not a new key: a grows to 31 bytes, 55 in all.
    c.set("a", &[b'y'; 30]).unwrap();
    // b growing to 31 would make 75 > 64: refused, and b keeps its value.
    refused(c.set("b", &[b'z'; 30]), "max_bytes");
    assert_eq!(c.get("b", T).unwrap(), vec![b'x'; 10]);
    // A counter growing past the limit is refused the same way (n = "1000000000005": 67 bytes).
    refused(c.add("n", 1_000_000_000_000).map(|_| ()), "max_bytes");
    assert_eq!(c.get("n", T).unwrap(), b"5");
    // Deleting makes room: 44 bytes in 3 keys; d with 19 bytes makes exactly the limit, 64 in 4 keys.
    assert!(c.delete("c").unwrap());
    c.set("d", &[b'w'; 19]).unwrap();
    refused(c.set("e", b""), "max_keys");
    assert!(c.delete("d").unwrap());
    refused(c.set("d", &[b'w'; 20]), "max_bytes");
    // The connection was never broken by the refusals.
    assert_eq!(c.get("a", T).unwrap(), vec![b'y'; 30]);
    assert!(!c.check("d").unwrap(), "a refused SET stored nothing");
    c.set("d", &[b'w'; 19]).unwrap();
}

#[test]
fn get_waits_are_bounded_by_the_server() {
    let limits = StoreLimits {
        max_wait: Duration::from_millis(300),
        ..StoreLimits::default()
    };
    let s = StoreServer::bind_with_limits("127.0.0.1:0", TOKEN, limits).unwrap();
    // A raw GET asking to wait forever gets TIMEOUT once the server's limit passed.
    let mut r = raw_authed(s.local_addr());
    let mut get = 0xFFFF_FFFF_FFFF_FFFFu64.to_be_bytes().to_vec();
    get.extend_from_slice(b"never");
    r.write_all(&raw_frame(0x03, &get)).unwrap();
    let start = Instant::now();
    let mut reply = [0u8; 7];
    r.read_exact(&mut reply).unwrap();
    assert_eq!(reply, [0xFC, 1, 0x84, 0, 0, 0, 0], "TIMEOUT reply");
    let el = start.elapsed();
    assert!(
        el >= Duration::from_millis(250) && el < Duration::from_secs(3),
        "{el:?}"
    );
    // A client asking for longer is cut at the server's limit too, and its connection stays usable.
    let c = client(&s);
    let start = Instant::now();
    assert!(matches!(c.get("never", T), Err(Error::Timeout { .. })));
    assert!(start.elapsed() < Duration::from_secs(3));
    c.set("never", b"now").unwrap();
    assert_eq!(c.get("never", T).unwrap(), b"now");
}

#[test]
fn a_waiting_get_ends_when_its_client_leaves() {
    // Room for two connections: the good client and one that waits forever and then leaves. If the
    // server kept waiting for the departed client, nobody else could connect.
    let limits = StoreLimits {
        max_connections: 2,
        max_wait: Duration::from_secs(120),
        ..StoreLimits::default()
    };
    let s = StoreServer::bind_with_limits("127.0.0.1:0", TOKEN, limits).unwrap();
    let addr = s.local_addr();
    let good = client(&s);
    let mut r = raw_authed(addr);
    let mut get = 0xFFFF_FFFF_FFFF_FFFFu64.to_be_bytes().to_vec();
    get.extend_from_slice(b"never");
    r.write_all(&raw_frame(0x03, &get)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        StoreClient::connect(&addr.to_string(), TOKEN, Duration::from_millis(500)).is_err(),
        "the limit of 2 connections did not apply"
    );
    drop(r);
    let start = Instant::now();
    let c = loop {
        match StoreClient::connect(&addr.to_string(), TOKEN, T) {
            Ok(c) => break c,
            Err(_) if start.elapsed() < Duration::from_secs(3) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("the abandoned GET still holds its connection: {e}"),
        }
    };
    c.set("never", b"late").unwrap();
    assert_eq!(good.get("never", T).unwrap(), b"late");
}

#[test]
fn a_store_that_stops_answering_times_out_within_the_client_timeout() {
    // A fake store: it accepts AUTH, then reads requests and never answers.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 7 + 6];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&[0xFC, 1, 0x80, 0, 0, 0, 0]).unwrap();
        let mut sink = [0u8; 256];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while let Ok(n) = s.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    });
    let c = StoreClient::connect(&addr, TOKEN, Duration::from_millis(500)).unwrap();
    let start = Instant::now();
    match c.set("k", b"v") {
        Err(Error::Timeout { during, .. }) => assert_eq!(during, "rendezvous store reply"),
        other => panic!("expected a reply timeout, got {other:?}"),
    }
    let el = start.elapsed();
    assert!(
        el >= Duration::from_millis(400) && el < Duration::from_secs(5),
        "{el:?}"
    );
    drop(c);
    h.join().unwrap();
}

#[test]
fn shared_client_across_threads() {
    let s = server();
    let c = Arc::new(client(&s));
    let hs: Vec<_> = (0..4)
        .map(|_| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                for _ in 0..25 {
                    c.add("shared", 1).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(c.add("shared", 0).unwrap(), 100);
}

fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| m.get(name).cloned()
}

#[test]
fn env_missing_vars_give_none_and_defaults_apply() {
    assert_eq!(EnvRendezvous::from_lookup(lookup(&[])).unwrap(), None);
    assert_eq!(
        EnvRendezvous::from_lookup(lookup(&[("RANK", "0")])).unwrap(),
        None
    );
    assert_eq!(
        EnvRendezvous::from_lookup(lookup(&[("WORLD_SIZE", "2")])).unwrap(),
        None
    );
    let e = EnvRendezvous::from_lookup(lookup(&[("RANK", "1"), ("WORLD_SIZE", "4")]))
        .unwrap()
        .unwrap();
    assert_eq!(
        e,
        EnvRendezvous {
            rank: 1,
            world_size: 4,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            token: String::new(),
            // no token: loopback only (issue 19)
            bind: "127.0.0.1:29500".into(),
        }
    );
    assert_eq!(e.store_addr(), "127.0.0.1:29500");
    let e = EnvRendezvous::from_lookup(lookup(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "3"),
        ("MASTER_ADDR", "node0.cluster"),
        ("MASTER_PORT", "1234"),
        ("FERROCCL_TOKEN", "tok"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        (e.rank, e.world_size, e.local_rank, e.master_port),
        (3, 8, 3, 1234)
    );
    assert_eq!(e.master_addr, "node0.cluster");
    assert_eq!(e.token, "tok");
    assert_eq!(e.bind, "0.0.0.0:1234");
    let e = EnvRendezvous::from_lookup(lookup(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "::1"),
        ("FERROCCL_STORE_BIND", "[::1]:5000"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(e.bind, "[::1]:5000");
    assert_eq!(e.store_addr(), "[::1]:29500");
    // Without a token the store listens on loopback only; a remote MASTER_ADDR then needs a token
    // or an explicit bind, and the error names both.
    let e = EnvRendezvous::from_lookup(lookup(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "::1"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(e.bind, "[::1]:29500");
    match EnvRendezvous::from_lookup(lookup(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "10.1.2.3"),
    ])) {
        Err(Error::Config { var, why, .. }) => {
            assert_eq!(var, "FERROCCL_TOKEN");
            assert!(why.contains("FERROCCL_STORE_BIND"), "{why}");
        }
        other => panic!("expected a config error naming FERROCCL_TOKEN, got {other:?}"),
    }
    let open = EnvRendezvous::from_lookup(lookup(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "10.1.2.3"),
        ("FERROCCL_STORE_BIND", "0.0.0.0:29500"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(open.bind, "0.0.0.0:29500");
}

#[test]
fn env_bad_values_name_the_variable() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK"),
        (&[("RANK", "-1"), ("WORLD_SIZE", "2")], "RANK"),
        (&[("RANK", "0"), ("WORLD_SIZE", "two")], "WORLD_SIZE"),
        (&[("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE"),
        (&[("RANK", "2"), ("WORLD_SIZE", "2")], "RANK"),
        (
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "a")],
            "LOCAL_RANK",
        ),
        (
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")],
            "MASTER_PORT",
        ),
        (
            &[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "0")],
            "MASTER_PORT",
        ),
        (
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "")],
            "MASTER_ADDR",
        ),
        (
            &[
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("FERROCCL_STORE_BIND", " "),
            ],
            "FERROCCL_STORE_BIND",
        ),
    ];
    for (vars, want) in cases {
        match EnvRendezvous::from_lookup(lookup(vars)) {
            Err(e @ Error::Config { .. }) => {
                let Error::Config { var, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(var, want, "{vars:?}");
                assert!(e.to_string().contains(want), "{e}");
            }
            other => panic!("{vars:?}: expected Config error, got {other:?}"),
        }
    }
}

#[test]
fn env_four_rank_rendezvous_in_threads() {
    const W: usize = 4;
    // Rank 0 binds an ephemeral port (FERROCCL_STORE_BIND=127.0.0.1:0) and its own client follows the
    // port actually bound; the test hands that port to ranks 1..3 as MASTER_PORT.
    let r0 = EnvRendezvous::from_lookup(lookup(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "4"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "0"),
        ("FERROCCL_TOKEN", TOKEN),
        ("FERROCCL_STORE_BIND", "127.0.0.1:0"),
    ]))
    .unwrap()
    .unwrap();
    let (srv0, c0) = r0.connect(T).unwrap();
    let srv0 = srv0.expect("rank 0 hosts the store");
    let port = srv0.local_addr().port().to_string();
    let start = Arc::new(Barrier::new(W));

    let mut hs = Vec::new();
    for rank in 1..W {
        let port = port.clone();
        let start = Arc::clone(&start);
        hs.push(std::thread::spawn(move || {
            let rank_s = rank.to_string();
            let env = EnvRendezvous::from_lookup(lookup(&[
                ("RANK", &rank_s),
                ("WORLD_SIZE", "4"),
                ("LOCAL_RANK", &rank_s),
                ("MASTER_PORT", &port),
                ("FERROCCL_TOKEN", TOKEN),
            ]))
            .unwrap()
            .unwrap();
            start.wait();
            let (srv, c) = env.connect(T).unwrap();
            assert!(srv.is_none());
            c.set(
                &format!("addr/{rank}"),
                format!("host{rank}:{}", 1000 + rank).as_bytes(),
            )
            .unwrap();
            c.barrier("init", W, T).unwrap();
            let id = c.get("unique_id", T).unwrap();
            let peers: Vec<Vec<u8>> = (0..W)
                .map(|r| c.get(&format!("addr/{r}"), T).unwrap())
                .collect();
            c.barrier("init", W, T).unwrap();
            (id, peers)
        }));
    }
    start.wait();
    c0.set("unique_id", &[42u8; 128]).unwrap();
    c0.set("addr/0", b"host0:1000").unwrap();
    c0.barrier("init", W, T).unwrap();
    c0.barrier("init", W, T).unwrap();
    for h in hs {
        let (id, peers) = h.join().unwrap();
        assert_eq!(id, vec![42u8; 128]);
        for (r, p) in peers.iter().enumerate() {
            assert_eq!(p, format!("host{r}:{}", 1000 + r).as_bytes());
        }
    }
    drop(c0);
    drop(srv0);

    // A wrong token on one rank fails that rank with BadToken.
    let s = server();
    let env = EnvRendezvous::from_lookup(lookup(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_PORT", &s.local_addr().port().to_string()),
        ("FERROCCL_TOKEN", "not-the-token"),
    ]))
    .unwrap()
    .unwrap();
    assert!(matches!(env.connect(T), Err(Error::BadToken { .. })));
}
