//! MoE dispatch/combine (issue 21): the distributed layer, forward and backward, against a
//! single-process reference on 2–8 in-process ranks and on TCP; identity experts exactly; the
//! layout against hand-computed cases; every bad input a named error on every rank.
mod moe_ref;

use ferroccl::kernels::CpuKernels;
use ferroccl::moe::{DropPolicy, Layout, LayoutConfig, Moe, MoeError, Placement, Wire};
use ferroccl::prelude::*;
use ferroccl::rendezvous::{StoreClient, StoreServer};
use ferroccl::tcp::TcpComm;
use ferroccl::Config;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn local_2_to_8_ranks_match_the_reference() {
    for w in 2..=8 {
        ferroccl::local::run(w, |comm| {
            moe_ref::check_all(comm).map_err(Error::InvalidArgument)
        })
        .unwrap_or_else(|e| panic!("world {w}: {e}"));
    }
}

#[test]
fn single_rank_world() {
    ferroccl::local::run(1, |comm| {
        for s in moe_ref::scenarios(1).into_iter().take(5) {
            moe_ref::identity(comm, &s, None, Wire::Native).map_err(Error::InvalidArgument)?;
            moe_ref::check(comm, &s, None, Wire::Native).map_err(Error::InvalidArgument)?;
        }
        Ok(())
    })
    .unwrap();
}

fn tcp_mesh<T: Send>(n: usize, f: impl Fn(&TcpComm) -> Result<T> + Sync) -> Vec<T> {
    const TOKEN: &str = "moe";
    let server = StoreServer::bind("127.0.0.1:0", TOKEN).unwrap();
    let addr = server.local_addr().to_string();
    let server = Arc::new(Some(server));
    let cfg = Config::default().with_timeout(Duration::from_secs(60));
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (addr, server, cfg, f) = (addr.clone(), server.clone(), cfg.clone(), &f);
                s.spawn(move || {
                    let store =
                        Arc::new(StoreClient::connect(&addr, TOKEN, Duration::from_secs(10))?);
                    let c = TcpComm::connect(store, server, &addr, "moe", r, n, TOKEN, cfg)?;
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

#[test]
fn tcp_4_ranks_match_the_reference() {
    tcp_mesh(4, |comm| {
        moe_ref::check_all(comm).map_err(Error::InvalidArgument)
    });
}

#[test]
fn layout_by_hand() {
    // 4 tokens, top-2, 4 experts on 2 ranks (0,1 | 2,3)
    let ids = [0, 2, 2, 3, 0, 1, -1, 2];
    let w = [0.5, 0.25, 0.75, 1.0, 0.125, 0.5, 0.0, 2.0];
    let l = Layout::new(&ids, &w, 2, &LayoutConfig::even(4, 2)).unwrap();
    assert_eq!(l.tokens_per_expert(), &[2, 1, 3, 1]);
    assert_eq!(l.rows_per_rank(), &[3, 4]);
    assert_eq!(l.tokens_per_rank(), &[2, 3]); // rank 0: tokens 0, 2; rank 1: tokens 0, 1, 3
    assert!(l.is_token_in_rank(0, 1) && !l.is_token_in_rank(1, 0));
    // send order: expert 0 (slots 0, 4), expert 1 (slot 5), expert 2 (slots 1, 2, 7), expert 3 (3)
    let rows: Vec<_> = (0..8).map(|s| l.slot_row(s)).collect();
    assert_eq!(
        rows,
        vec![
            Some(0),
            Some(3),
            Some(4),
            Some(6),
            Some(1),
            Some(2),
            None,
            Some(5)
        ]
    );
    assert_eq!(l.dropped(), 0);
    // capacity ceil(4·2·0.5/4) = 1: by position keeps the first slot of each expert
    let cfg = LayoutConfig::even(4, 2).with_capacity(0.5, DropPolicy::Position);
    let p = Layout::new(&ids, &w, 2, &cfg).unwrap();
    assert_eq!(p.capacity(), Some(1));
    assert_eq!(p.tokens_per_expert(), &[1, 1, 1, 1]);
    assert_eq!(p.dropped(), 3);
    assert_eq!(p.dropped_per_expert(), vec![1, 0, 2, 0]);
    assert_eq!(p.slot_row(0), Some(0));
    assert_eq!(p.slot_row(4), None);
    assert_eq!(p.slot_row(1), Some(2));
    // by probability: expert 0 keeps slot 0 (0.5 > 0.125), expert 2 keeps slot 7 (weight 2.0)
    let cfg = LayoutConfig::even(4, 2).with_capacity(0.5, DropPolicy::Probability);
    let q = Layout::new(&ids, &w, 2, &cfg).unwrap();
    assert_eq!(q.slot_row(0), Some(0));
    assert_eq!(q.slot_row(7), Some(2));
    assert_eq!(q.slot_row(1), None);
    assert_eq!(q.slot_row(2), None);
    assert_eq!(q.dropped(), 3);
}

#[test]
fn layout_matches_a_naive_count() {
    // random layouts: counts and rows agree with counting by hand
    let mut rng = ferroccl::sim::rng::Rng::new(3);
    for trial in 0..50 {
        let (e, world, k) = (8, [1, 2, 4, 8][trial % 4], 1 + trial % 4);
        let t = rng.below(40);
        let ids: Vec<i64> = (0..t * k).map(|_| rng.below(e + 1) as i64 - 1).collect();
        let w: Vec<f32> = (0..t * k).map(|_| rng.uniform() as f32).collect();
        let cap = 0.25 + rng.uniform() * 2.0;
        let cfg = LayoutConfig::even(e, world).with_capacity(cap, DropPolicy::Position);
        let l = Layout::new(&ids, &w, k, &cfg).unwrap();
        let c = ((t * k) as f64 * cap / e as f64).ceil() as usize;
        let mut seen = vec![0usize; e];
        for (s, &id) in ids.iter().enumerate() {
            if id < 0 {
                assert_eq!(l.slot_row(s), None);
                continue;
            }
            let kept = seen[id as usize] < c;
            seen[id as usize] += 1;
            assert_eq!(l.slot_row(s).is_some(), kept, "trial {trial} slot {s}");
            if let Some(r) = l.slot_row(s) {
                assert_eq!(l.row_expert(r), id as usize);
                assert_eq!(l.row_slot(r), s);
                assert_eq!(l.row_weight(r), w[s]);
            }
        }
        let routed: usize = seen.iter().sum();
        let kept: usize = seen.iter().map(|&n| n.min(c)).sum();
        assert_eq!(l.dropped(), routed - kept);
        assert_eq!(l.send_rows(), kept);
        // chunks keep exactly the parent's rows
        let half = t / 2;
        let (a, b) = (l.chunk(0..half).unwrap(), l.chunk(half..t).unwrap());
        assert_eq!(a.send_rows() + b.send_rows(), kept);
    }
}

#[test]
fn bad_router_output_is_a_named_error() {
    let cfg = LayoutConfig::even(4, 2);
    let e = Layout::new(&[0, 4], &[1.0, 1.0], 1, &cfg).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Moe(MoeError::ExpertOutOfRange {
                token: 1,
                id: 4,
                ..
            })
        ),
        "{e}"
    );
    let e = Layout::new(&[0, -2], &[1.0, 1.0], 1, &cfg).unwrap_err();
    assert!(
        matches!(e, Error::Moe(MoeError::ExpertOutOfRange { .. })),
        "{e}"
    );
    let e = Layout::new(&[0, 1], &[1.0], 1, &cfg).unwrap_err();
    assert!(matches!(e, Error::Moe(MoeError::Shape { .. })), "{e}");
    let e = Layout::new(&[0, 1, 2], &[1.0; 3], 2, &cfg).unwrap_err();
    assert!(matches!(e, Error::Moe(MoeError::Shape { .. })), "{e}");
    let e = Layout::new(&[0, 1], &[1.0, f32::NAN], 1, &cfg).unwrap_err();
    assert!(
        matches!(e, Error::Moe(MoeError::BadWeight { token: 1, .. })),
        "{e}"
    );
    let e = Layout::new(&[0], &[1.0], 1, &LayoutConfig::even(3, 2)).unwrap_err();
    assert!(matches!(e, Error::Moe(MoeError::Config(_))), "{e}");
    let bad = LayoutConfig {
        placement: Placement::Explicit(vec![0, 1, 2, 0]),
        ..LayoutConfig::even(4, 2)
    };
    assert!(Layout::new(&[0], &[1.0], 1, &bad).is_err());
}

#[test]
fn bad_input_fails_on_every_rank_before_rows_move() {
    let out = ferroccl::local::run(3, |comm| {
        let k = CpuKernels;
        let me = comm.rank();
        let cfg = LayoutConfig::even(3, 3);
        let ids = vec![((me + 1) % 3) as i64; 4];
        let layout = Layout::new(&ids, &[1.0; 4], 1, &cfg)?;
        let x = vec![1.0f32; 4 * 2];
        let mut moe = Moe::new(comm);
        let mut errs = Vec::new();
        // rank 2 passes the wrong x length: rank 2 gets LengthMismatch, the others PeerInvalid
        let xb = if me == 2 { vec![1.0f32; 7] } else { x.clone() };
        errs.push(moe.dispatch(&k, &xb, 2, &layout).unwrap_err().to_string());
        // hidden sizes differ across ranks
        let h = if me == 1 { 4 } else { 2 };
        let xh = vec![1.0f32; 4 * h];
        let e = moe.dispatch(&k, &xh, h, &layout).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Moe(MoeError::Mismatch {
                    what: "hidden size",
                    ..
                })
            ),
            "{e}"
        );
        // a good dispatch, then misuse of its handle
        let d = moe.dispatch(&k, &x, 2, &layout)?;
        let e = moe.combine(&k, &vec![0f32; 3], &d.handle).unwrap_err();
        assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
        let other = Layout::new(&[((me + 2) % 3) as i64; 4], &[1.0; 4], 1, &cfg)?;
        let e = moe.dispatch_cached(&k, &x, &other, &d.handle).unwrap_err();
        assert!(
            matches!(e, Error::Moe(MoeError::HandleMismatch { .. })),
            "{e}"
        );
        // after a wire change the handle is stale
        moe.set_wire(Wire::Bf16);
        let e = moe.combine(&k, &d.rows, &d.handle).unwrap_err();
        assert!(matches!(e, Error::Moe(MoeError::StaleHandle { .. })), "{e}");
        moe.set_wire(Wire::Native);
        let e = moe.combine(&k, &d.rows, &d.handle).unwrap_err();
        assert!(matches!(e, Error::Moe(MoeError::StaleHandle { .. })), "{e}");
        // only rank 0 misuses; the others get PeerInvalid
        let d = moe.dispatch(&k, &x, 2, &layout)?;
        let y = if me == 0 {
            vec![0f32; 1]
        } else {
            d.rows.clone()
        };
        errs.push(moe.combine(&k, &y, &d.handle).unwrap_err().to_string());
        // and the communicator still works
        let back = moe.combine(&k, &d.rows, &d.handle)?;
        assert_eq!(back, x);
        Ok(errs)
    })
    .unwrap();
    assert!(out[2][0].contains("dispatch: x must hold"), "{}", out[2][0]);
    assert!(
        out[0][0].contains("rank 2 reported invalid input"),
        "{}",
        out[0][0]
    );
    assert!(out[0][1].contains("expected"), "{}", out[0][1]);
    assert!(
        out[1][1].contains("rank 0 reported invalid input"),
        "{}",
        out[1][1]
    );
}

#[test]
fn bf16_and_f16_rows() {
    use half::{bf16, f16};
    ferroccl::local::run(4, |comm| {
        let k = CpuKernels;
        let me = comm.rank();
        let t = 5 + me;
        let ids: Vec<i64> = (0..t * 2).map(|i| ((i * 3 + me) % 8) as i64).collect();
        let ids: Vec<i64> = ids
            .chunks(2)
            .flat_map(|c| {
                if c[0] == c[1] {
                    vec![c[0], (c[1] + 1) % 8]
                } else {
                    c.to_vec()
                }
            })
            .collect();
        let w = vec![0.5f32; t * 2];
        let layout = Layout::new(&ids, &w, 2, &LayoutConfig::even(8, 4))?;
        let xs: Vec<f32> = (0..t * 4).map(|i| (i % 7) as f32 - 3.0).collect();
        let moe = Moe::new(comm);
        let xb: Vec<bf16> = xs.iter().map(|&v| bf16::from_f32(v)).collect();
        let d = moe.dispatch(&k, &xb, 4, &layout)?;
        let back = moe.combine(&k, &d.rows, &d.handle)?;
        assert_eq!(back, xb);
        let xh: Vec<f16> = xs.iter().map(|&v| f16::from_f32(v)).collect();
        let mut moe = Moe::new(comm);
        moe.set_wire(Wire::Bf16);
        let d = moe.dispatch(&k, &xh, 4, &layout)?;
        let back = moe.combine(&k, &d.rows, &d.handle)?;
        assert_eq!(back, xh);
        Ok(())
    })
    .unwrap();
}
