//! Hand counts of the traffic counters (`Communicator::stats`) for the engine's algorithms (local and
//! tcp), world 4. Every figure below is worked out from the algorithm, not read back from the library:
//!
//! - all_reduce below 64 KiB: recursive doubling, log2(4) = 2 exchanges of the whole buffer `S`:
//!   sent 2S, received 2S.
//! - all_reduce above: ring reduce-scatter + all-gather (2·(n−1) chunks of S/n) or the two-shot (the
//!   same counted bytes): sent 1.5S, received 1.5S.
//! - all_gather of a block `B`: sent 3B, received 3B.
//! - broadcast of `S` from root 0 down the binomial tree 0→2, 0→1, 2→3: sent 2S on 0, S on 2, 0 on 1
//!   and 3; received S everywhere but the root.
//! - send/recv of `P` bytes 0 → 1: P sent on 0 (send), P received on 1 (recv, blocking or not).
//! - barrier: one call, no payload.
#![allow(dead_code)]

use ferroccl::prelude::*;
use ferroccl::stats::OpKind;

/// Run the sequence on rank `c`, checking every counter after each step; returns the checks made.
pub fn hand_count<C: Communicator + ?Sized>(c: &C) -> Result<usize> {
    assert_eq!(c.world_size(), 4, "the hand count is for world 4");
    let r = c.rank();
    c.reset_stats();
    assert_eq!(c.stats(), Default::default());
    let mut checks = 0;
    let mut expect = |kind: OpKind, calls: u64, sent: u64, recv: u64| {
        let s = c.stats().op(kind);
        assert_eq!(
            (s.calls, s.bytes_sent, s.bytes_received),
            (calls, sent, recv),
            "rank {r}, {}: (calls, sent, received)",
            kind.name()
        );
        checks += 1;
    };
    // small all-reduce: 16 f32 = 64 B
    let mut small = vec![1.0f32; 16];
    c.all_reduce(&mut small, ReduceOp::Sum)?;
    assert_eq!(small, vec![4.0; 16]);
    expect(OpKind::AllReduce, 1, 128, 128);
    // large all-reduce: 64 Ki f32 = 256 KiB, over the bandwidth path
    let mut large = vec![1.0f32; 64 << 10];
    c.all_reduce(&mut large, ReduceOp::Sum)?;
    let s = 256u64 << 10;
    expect(OpKind::AllReduce, 2, 128 + 3 * s / 2, 128 + 3 * s / 2);
    // non-blocking large all-reduce counts the same
    let large = c.iall_reduce(large, ReduceOp::Sum)?.wait()?;
    assert_eq!(large[0], 16.0);
    expect(OpKind::AllReduce, 3, 128 + 3 * s, 128 + 3 * s);
    // all-gather of 8 f32 = 32 B per rank
    let mut all = vec![0.0f32; 32];
    c.all_gather(&vec![r as f32; 8], &mut all)?;
    expect(OpKind::AllGather, 1, 96, 96);
    // broadcast of 40 B from 0
    let mut b = vec![r as u8; 40];
    c.broadcast(&mut b, 0)?;
    assert_eq!(b, vec![0u8; 40]);
    let sent = match r {
        0 => 80,
        2 => 40,
        _ => 0,
    };
    expect(OpKind::Broadcast, 1, sent, if r == 0 { 0 } else { 40 });
    // point-to-point, blocking then non-blocking: 0 → 1, 12 B each
    if r == 0 {
        c.send(&[7i32; 3], 1, 5)?;
        c.isend(vec![8i32; 3], 1, 6)?.wait()?;
        expect(OpKind::Send, 2, 24, 0);
    } else if r == 1 {
        let mut m = [0i32; 3];
        c.recv(&mut m, 0, 5)?;
        let m2 = c.irecv(vec![0i32; 3], 0, 6)?.wait()?;
        assert_eq!((m, m2), ([7; 3], vec![8; 3]));
        expect(OpKind::Recv, 2, 0, 24);
    }
    c.barrier()?;
    expect(OpKind::Barrier, 1, 0, 0);
    let total = c.stats();
    let p2p = match r {
        0 | 1 => 24,
        _ => 0,
    };
    assert_eq!(
        total.bytes_sent(),
        128 + 3 * s + 96 + sent + if r == 0 { p2p } else { 0 }
    );
    assert_eq!(
        total.bytes_received(),
        128 + 3 * s + 96 + if r == 0 { 0 } else { 40 } + if r == 1 { p2p } else { 0 }
    );
    assert_eq!(
        c.bytes_sent(),
        total.bytes_sent(),
        "bytes_sent is the total"
    );
    assert_eq!(total.calls(), 6 + if r < 2 { 2 } else { 0 });
    c.reset_stats();
    assert_eq!(c.stats().calls(), 0);
    assert_eq!(c.bytes_sent(), 0);
    Ok(checks + 1)
}
