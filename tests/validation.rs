//! Views that lie about their memory, counts that overflow, and integer averages over many ranks:
//! each is a named error (or the right value) before anything is sent, never a panic or an
//! out-of-bounds access. The checks run on every rank, so no peer is left waiting.

use ferroccl::buffer::{Buf, BufMut, Mem, MemMut};
use ferroccl::prelude::*;
use ferroccl::{Collective, DType};

fn invalid(e: &Error, needle: &str) -> bool {
    matches!(e, Error::InvalidArgument(m) if m.contains(needle))
}

#[test]
fn a_view_whose_length_disagrees_with_its_memory_is_refused() {
    ferroccl::local::run(2, |c| {
        // 6 bytes are not a whole number of f32s (Buf::host rounds the count down to 1)
        let six = [0u8; 6];
        let mut eight = [0u8; 8];
        let e = c
            .run(Collective::AllGather {
                send: Buf::host(DType::F32, &six),
                recv: BufMut::host(DType::F32, &mut eight),
            })
            .unwrap_err();
        assert!(
            invalid(
                &e,
                "all_gather: the send view claims 1 float elements but has 6 bytes"
            ),
            "{e}"
        );
        // a hand-built view claiming more elements than its slice holds
        let mut small = [0u8; 8];
        let e = c
            .run(Collective::Broadcast {
                buf: BufMut {
                    dtype: DType::F32,
                    len: 1 << 20,
                    mem: MemMut::Host(&mut small),
                },
                root: 0,
            })
            .unwrap_err();
        assert!(
            invalid(&e, "broadcast: the buffer view claims 1048576"),
            "{e}"
        );
        // a length whose byte size overflows usize
        let e = c
            .run(Collective::Send {
                buf: Buf {
                    dtype: DType::F64,
                    len: usize::MAX / 2,
                    mem: Mem::Host(&[]),
                },
                peer: 1 - c.rank(),
                tag: 0,
            })
            .unwrap_err();
        assert!(invalid(&e, "send: the buffer view"), "{e}");
        // the communicator is still fine afterwards: nothing was sent
        let mut v = vec![c.rank() as f32 + 1.0; 5];
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        assert_eq!(v, vec![3.0; 5]);
        Ok(())
    })
    .unwrap();
}

#[test]
fn counts_that_overflow_are_refused() {
    ferroccl::local::run(2, |c| {
        // [usize::MAX, 1] sums to 0 when it wraps: it must not pass for an empty exchange
        let e = c
            .all_to_allv(&[0f32; 0], &[usize::MAX, 1], &mut [0f32; 0], &[0, 0])
            .unwrap_err();
        assert!(invalid(&e, "send_counts: the counts' sum overflows"), "{e}");
        let e = c
            .all_to_allv(&[0f32; 0], &[0, 0], &mut [0f32; 0], &[1, usize::MAX])
            .unwrap_err();
        assert!(invalid(&e, "recv_counts: the counts' sum overflows"), "{e}");
        // world × recv.len overflowing in reduce_scatter's length rule
        let e = c
            .run(Collective::ReduceScatter {
                send: Buf::host(DType::U8, &[]),
                recv: BufMut {
                    dtype: DType::U8,
                    len: usize::MAX,
                    mem: MemMut::Host(&mut []),
                },
                op: ReduceOp::Sum,
            })
            .unwrap_err();
        assert!(invalid(&e, "reduce_scatter"), "{e}");
        c.barrier()?;
        Ok(())
    })
    .unwrap();
}

#[test]
fn u8_average_over_more_than_255_ranks_is_the_integer_mean() {
    // 300 ranks: `300 as u8` is 44, so a division by the truncated count would give 44 / 44 = 1;
    // the sum wraps like NCCL's u8 (300 → 44) and the integer mean over 300 ranks is 0.
    let n = 300;
    let out = ferroccl::local::run(n, |c| {
        let mut v = vec![1u8, u8::from(c.rank() == 0) * 200];
        c.all_reduce(&mut v, ReduceOp::Avg)?;
        let mut i = vec![c.rank() as i32];
        c.all_reduce(&mut i, ReduceOp::Avg)?;
        Ok((v, i))
    })
    .unwrap();
    let mean = (0..n as i32).sum::<i32>() / n as i32; // 149
    for (v, i) in &out {
        assert_eq!(v, &vec![0u8, 0]);
        assert_eq!(i, &vec![mean]);
    }
}
