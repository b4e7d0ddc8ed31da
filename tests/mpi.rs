//! Integration test of the MPI backend. It must run under an MPI launcher with 4 ranks; started any
//! other way (as `cargo test --features mpi` does) it re-executes itself under
//! `mpirun -np 4 --oversubscribe [--allow-run-as-root]` and exits with mpirun's status.
//!
//! Every collective is checked against a naive reference computed locally: each rank can compute every
//! other rank's input from `(rank, index)`. Inputs are small integers, so every dtype and reduction
//! order gives exact results. An optional argument runs only the checks whose name contains it.
//! Set `MPIRUN` to use another launcher binary.

#[cfg(not(feature = "mpi"))]
fn main() {
    eprintln!("tests/mpi.rs needs `--features mpi`; nothing to run");
}

#[cfg(feature = "mpi")]
fn main() {
    std::process::exit(imp::main());
}

#[cfg(feature = "mpi")]
mod imp {
    use ferroccl::dtype::{finish_avg, reduce_into};
    use ferroccl::mpi::{launched_by_mpirun, raw_allreduce_f32, raw_allreduce_into_f32, MpiComm};
    use ferroccl::prelude::*;
    use ferroccl::{Config, Element};
    use half::{bf16, f16};
    use std::process::Command;
    use std::time::Duration;

    type R = std::result::Result<(), Box<dyn std::error::Error>>;

    const WORLD: usize = 4;
    const LENS: [usize; 5] = [0, 1, 7, 1031, 1 << 16];
    const BLOCKS: [usize; 4] = [0, 1, 7, 1031];

    macro_rules! ensure {
        ($cond:expr, $($fmt:tt)+) => {
            if !$cond {
                return Err(format!($($fmt)+).into());
            }
        };
    }

    /// Run `$f::<T>(args)` for every element type (a block of type `R`).
    macro_rules! each_dtype {
        ($f:ident($($a:expr),*)) => {{
            $f::<f32>($($a),*)?;
            $f::<f64>($($a),*)?;
            $f::<f16>($($a),*)?;
            $f::<bf16>($($a),*)?;
            $f::<i32>($($a),*)?;
            $f::<i64>($($a),*)?;
            $f::<u8>($($a),*)?;
            Ok(())
        }};
    }

    /// Element types built from small integers.
    trait TE: Element + Copy {
        fn of(v: i64) -> Self;
    }
    impl TE for f32 {
        fn of(v: i64) -> Self {
            v as f32
        }
    }
    impl TE for f64 {
        fn of(v: i64) -> Self {
            v as f64
        }
    }
    impl TE for f16 {
        fn of(v: i64) -> Self {
            f16::from_f32(v as f32)
        }
    }
    impl TE for bf16 {
        fn of(v: i64) -> Self {
            bf16::from_f32(v as f32)
        }
    }
    impl TE for i32 {
        fn of(v: i64) -> Self {
            v as i32
        }
    }
    impl TE for i64 {
        fn of(v: i64) -> Self {
            v
        }
    }
    impl TE for u8 {
        fn of(v: i64) -> Self {
            v as u8
        }
    }

    /// SplitMix64's finaliser: the source of the reference data, so that it has no period.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A hash of index `i` under `salt`.
    fn hash(salt: u64, i: usize) -> u64 {
        mix(mix(salt ^ 0xfe44_0cc1_5eed_2024) ^ i as u64)
    }

    /// Rank `r`'s input for a reduction with `op`, as in tests/common: for Prod one of four factors
    /// per (rank, index) (u8 {1, 2, 3, 5}, wrapping like the library; signed {-1, 2, -2, 3}; floats
    /// {2, -1, 1, -2}: products of 4 ranks exact everywhere); else `(a·r + b) mod 32` with `a` odd and
    /// `b` hashed from `i` (minus 16 for signed and float types), so the ranks differ at every index
    /// and reductions vary along the vector. Sums of 4 ranks stay exact in bf16.
    fn input<T: TE>(r: usize, len: usize, op: ReduceOp) -> Vec<T> {
        (0..len)
            .map(|i| {
                let h = hash(1, i);
                if op == ReduceOp::Prod {
                    let l = ((h >> (2 * (r % 32))) & 3) as usize;
                    return T::of(match T::DTYPE {
                        DType::U8 => [1, 2, 3, 5][l],
                        DType::I32 | DType::I64 => [-1, 2, -2, 3][l],
                        _ => [2, -1, 1, -2][l],
                    });
                }
                let (a, b) = ((h % 32) | 1, (h >> 8) % 32);
                let x = ((a * r as u64 + b) % 32) as i64;
                T::of(if T::DTYPE == DType::U8 { x } else { x - 16 })
            })
            .collect()
    }

    /// The reduction of every rank's input, computed locally.
    fn reference<T: TE>(len: usize, op: ReduceOp) -> Result<Vec<T>> {
        reference_of::<T>(WORLD, len, op)
    }

    /// The reduction of the inputs of ranks `0..n`, computed locally.
    fn reference_of<T: TE>(n: usize, len: usize, op: ReduceOp) -> Result<Vec<T>> {
        let mut acc = input::<T>(0, len, op);
        for r in 1..n {
            let x = input::<T>(r, len, op);
            reduce_into(
                T::DTYPE,
                op,
                bytemuck::cast_slice_mut(&mut acc),
                bytemuck::cast_slice(&x),
            )?;
        }
        finish_avg(T::DTYPE, op, bytemuck::cast_slice_mut(&mut acc), n)?;
        Ok(acc)
    }

    /// All-reduce on a communicator of `sub.world_size()` ranks (a non-power of two exercises the
    /// fold of the point-to-point paths of blocking all-reduces): lengths for recursive doubling
    /// (≤ 8 KiB) and halving/doubling above, in place and out of place.
    fn all_reduce_on<T: TE>(sub: &dyn Communicator) -> R {
        let (me, n) = (sub.rank(), sub.world_size());
        for len in [1usize, 5, 300, 3001, 9000, 40_000] {
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg] {
                let want = reference_of::<T>(n, len, op)?;
                let mut v = input::<T>(me, len, op);
                sub.all_reduce(&mut v, op)?;
                let what = format!("{n} ranks: all_reduce {} {} len {len}", T::DTYPE, op.name());
                same(&v, &want, &what)?;
                let send = input::<T>(me, len, op);
                let mut recv = vec![T::of(0); len];
                sub.all_reduce_into(&send, &mut recv, op)?;
                same(&recv, &want, &format!("{what} out of place"))?;
            }
        }
        Ok(())
    }

    /// Value of element `k` of the block that rank `src` sends to rank `dst` (all-to-all tests):
    /// `(a·(src·WORLD + dst) + b) mod 64` with `a` odd and `b` hashed from `k`, so the blocks of all
    /// (src, dst) pairs differ at every position (a bijection of Z/64), and along each block.
    fn a2a<T: TE>(src: usize, dst: usize, k: usize) -> T {
        let h = hash(2, k);
        let (a, b) = ((h % 64) | 1, (h >> 8) % 64);
        T::of(((a * (src * WORLD + dst) as u64 + b) % 64) as i64)
    }

    fn same<T: TE>(got: &[T], want: &[T], what: &str) -> R {
        ensure!(
            got.len() == want.len(),
            "{what}: length {} != {}",
            got.len(),
            want.len()
        );
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            return Err(
                format!("{what}: element {i}: got {:?}, want {:?}", got[i], want[i]).into(),
            );
        }
        Ok(())
    }

    fn all_reduce<T: TE>(c: &MpiComm) -> R {
        let me = c.rank();
        for len in LENS {
            for op in ReduceOp::ALL {
                let want = reference::<T>(len, op)?;
                let mut v = input::<T>(me, len, op);
                c.all_reduce(&mut v, op)?;
                same(
                    &v,
                    &want,
                    &format!("all_reduce {} {} len {len} in place", T::DTYPE, op.name()),
                )?;
                let send = input::<T>(me, len, op);
                let mut recv = vec![T::of(0); len];
                c.all_reduce_into(&send, &mut recv, op)?;
                same(
                    &recv,
                    &want,
                    &format!(
                        "all_reduce {} {} len {len} out of place",
                        T::DTYPE,
                        op.name()
                    ),
                )?;
            }
        }
        Ok(())
    }

    fn reduce_scatter<T: TE>(c: &MpiComm) -> R {
        let me = c.rank();
        for block in BLOCKS {
            for op in ReduceOp::ALL {
                let want = reference::<T>(WORLD * block, op)?;
                let send = input::<T>(me, WORLD * block, op);
                let mut recv = vec![T::of(0); block];
                c.reduce_scatter(&send, &mut recv, op)?;
                same(
                    &recv,
                    &want[me * block..(me + 1) * block],
                    &format!("reduce_scatter {} {} block {block}", T::DTYPE, op.name()),
                )?;
            }
        }
        Ok(())
    }

    fn all_gather<T: TE>(c: &MpiComm) -> R {
        for len in LENS {
            let send = input::<T>(c.rank(), len, ReduceOp::Sum);
            let mut recv = vec![T::of(0); WORLD * len];
            c.all_gather(&send, &mut recv)?;
            let want: Vec<T> = (0..WORLD)
                .flat_map(|r| input::<T>(r, len, ReduceOp::Sum))
                .collect();
            same(&recv, &want, &format!("all_gather {} len {len}", T::DTYPE))?;
        }
        Ok(())
    }

    fn broadcast<T: TE>(c: &MpiComm) -> R {
        for root in [3, 0] {
            for len in LENS {
                let want = input::<T>(root, len, ReduceOp::Sum);
                let mut buf = if c.rank() == root {
                    want.clone()
                } else {
                    vec![T::of(0); len]
                };
                c.broadcast(&mut buf, root)?;
                same(
                    &buf,
                    &want,
                    &format!("broadcast {} root {root} len {len}", T::DTYPE),
                )?;
            }
        }
        Ok(())
    }

    fn reduce<T: TE>(c: &MpiComm) -> R {
        for root in [2, 0] {
            for len in LENS {
                for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg] {
                    let send = input::<T>(c.rank(), len, op);
                    if c.rank() == root {
                        let mut recv = vec![T::of(0); len];
                        c.reduce(&send, Some(&mut recv), op, root)?;
                        let want = reference::<T>(len, op)?;
                        same(
                            &recv,
                            &want,
                            &format!("reduce {} {} root {root} len {len}", T::DTYPE, op.name()),
                        )?;
                    } else {
                        c.reduce(&send, None::<&mut Vec<T>>, op, root)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn all_to_all<T: TE>(c: &MpiComm) -> R {
        let me = c.rank();
        for block in BLOCKS {
            let send: Vec<T> = (0..WORLD * block)
                .map(|x| a2a(me, x / block.max(1), x % block.max(1)))
                .collect();
            let mut recv = vec![T::of(0); WORLD * block];
            c.all_to_all(&send, &mut recv)?;
            let want: Vec<T> = (0..WORLD * block)
                .map(|x| a2a(x / block.max(1), me, x % block.max(1)))
                .collect();
            same(
                &recv,
                &want,
                &format!("all_to_all {} block {block}", T::DTYPE),
            )?;
        }
        Ok(())
    }

    /// Uneven counts, zeros included: rank `src` sends `count(src, dst) * scale` elements to `dst`.
    fn a2av_count(src: usize, dst: usize, scale: usize) -> usize {
        ((src * 3 + dst * 2 + 1) % 5) * scale
    }

    fn a2av_data<T: TE>(me: usize, scale: usize) -> (Vec<T>, Vec<usize>, Vec<usize>, Vec<T>) {
        let send_counts: Vec<usize> = (0..WORLD).map(|d| a2av_count(me, d, scale)).collect();
        let recv_counts: Vec<usize> = (0..WORLD).map(|s| a2av_count(s, me, scale)).collect();
        let send: Vec<T> = (0..WORLD)
            .flat_map(|d| (0..send_counts[d]).map(move |k| a2a(me, d, k)))
            .collect();
        let want: Vec<T> = (0..WORLD)
            .flat_map(|s| (0..recv_counts[s]).map(move |k| a2a(s, me, k)))
            .collect();
        (send, send_counts, recv_counts, want)
    }

    fn all_to_allv<T: TE>(c: &MpiComm) -> R {
        for scale in [1, 3, 257] {
            let (send, sc, rc, want) = a2av_data::<T>(c.rank(), scale);
            let mut recv = vec![T::of(0); want.len()];
            c.all_to_allv(&send, &sc, &mut recv, &rc)?;
            same(
                &recv,
                &want,
                &format!("all_to_allv {} scale {scale} counts {sc:?}", T::DTYPE),
            )?;
        }
        Ok(())
    }

    fn nonblocking(c: &MpiComm) -> R {
        let me = c.rank();
        let n = 1031;
        // Two all-reduces in flight at once, then the rest of the family.
        let w1 = c.iall_reduce(input::<f32>(me, n, ReduceOp::Sum), ReduceOp::Sum)?;
        let w2 = c.iall_reduce_into(
            input::<f16>(me, n, ReduceOp::Max),
            vec![f16::ZERO; n],
            ReduceOp::Max,
        )?;
        let (_, r2) = w2.wait()?;
        let mut w1 = w1;
        while !w1.is_done() {
            std::thread::yield_now();
        }
        same(
            &w1.wait()?,
            &reference::<f32>(n, ReduceOp::Sum)?,
            "iall_reduce f32 sum",
        )?;
        same(
            &r2,
            &reference::<f16>(n, ReduceOp::Max)?,
            "iall_reduce_into f16 max",
        )?;

        let (_, rs) = c
            .ireduce_scatter(
                input::<bf16>(me, WORLD * 7, ReduceOp::Avg),
                vec![bf16::ZERO; 7],
                ReduceOp::Avg,
            )?
            .wait()?;
        same(
            &rs,
            &reference::<bf16>(WORLD * 7, ReduceOp::Avg)?[me * 7..me * 7 + 7],
            "ireduce_scatter bf16 avg",
        )?;

        let (_, ag) = c
            .iall_gather(input::<i64>(me, 5, ReduceOp::Sum), vec![0i64; WORLD * 5])?
            .wait()?;
        let want: Vec<i64> = (0..WORLD)
            .flat_map(|r| input::<i64>(r, 5, ReduceOp::Sum))
            .collect();
        same(&ag, &want, "iall_gather i64")?;

        let buf = if me == 3 {
            input::<u8>(3, 100, ReduceOp::Sum)
        } else {
            vec![0u8; 100]
        };
        same(
            &c.ibroadcast(buf, 3)?.wait()?,
            &input::<u8>(3, 100, ReduceOp::Sum),
            "ibroadcast u8 root 3",
        )?;

        let recv = (me == 1).then(|| vec![0f64; 64]);
        let (_, red) = c
            .ireduce(input::<f64>(me, 64, ReduceOp::Avg), recv, ReduceOp::Avg, 1)?
            .wait()?;
        ensure!(
            red.is_some() == (me == 1),
            "ireduce: receive buffer on the wrong ranks"
        );
        if let Some(r) = red {
            same(
                &r,
                &reference::<f64>(64, ReduceOp::Avg)?,
                "ireduce f64 avg root 1",
            )?;
        }

        let block = 9;
        let send: Vec<i32> = (0..WORLD * block)
            .map(|x| a2a(me, x / block, x % block))
            .collect();
        let (_, a) = c.iall_to_all(send, vec![0i32; WORLD * block])?.wait()?;
        let want: Vec<i32> = (0..WORLD * block)
            .map(|x| a2a(x / block, me, x % block))
            .collect();
        same(&a, &want, "iall_to_all i32")?;

        let (send, sc, rc, want) = a2av_data::<f32>(me, 2);
        let (_, av) = c
            .iall_to_allv(send, sc, vec![0f32; want.len()], rc)?
            .wait()?;
        same(&av, &want, "iall_to_allv f32")?;

        let next = (me + 1) % WORLD;
        let prev = (me + WORLD - 1) % WORLD;
        let r = c.irecv(vec![0i64; 3], prev, 11)?;
        let s = c.isend(vec![me as i64; 3], next, 11)?;
        same(
            &r.wait()?,
            &[prev as i64; 3],
            "irecv from the previous rank",
        )?;
        s.wait()?;
        c.ibarrier()?.wait()?;
        Ok(())
    }

    fn send_recv(c: &MpiComm) -> R {
        let me = c.rank();
        let next = (me + 1) % WORLD;
        let prev = (me + WORLD - 1) % WORLD;
        let val = |r: usize, k: usize| (r * 1000 + k) as f32;
        // Two tagged messages (small and large), received in the opposite order of sending.
        let big = 1 << 16;
        let s1 = c.isend((0..7).map(|k| val(me, k)).collect::<Vec<_>>(), next, 5)?;
        let s2 = c.isend((0..big).map(|k| val(me, k)).collect::<Vec<_>>(), next, 6)?;
        let mut b = vec![0f32; big];
        c.recv(&mut b, prev, 6)?;
        same(
            &b,
            &(0..big).map(|k| val(prev, k)).collect::<Vec<_>>(),
            "recv tag 6",
        )?;
        let mut a = vec![0f32; 7];
        c.recv(&mut a, prev, 5)?;
        same(
            &a,
            &(0..7).map(|k| val(prev, k)).collect::<Vec<_>>(),
            "recv tag 5",
        )?;
        s1.wait()?;
        s2.wait()?;
        // Blocking ring: even ranks send first, odd ranks receive first.
        let mine = vec![me as i32; 1031];
        let mut got = vec![0i32; 1031];
        if me % 2 == 0 {
            c.send(&mine, next, 0)?;
            c.recv(&mut got, prev, 0)?;
        } else {
            c.recv(&mut got, prev, 0)?;
            c.send(&mine, next, 0)?;
        }
        same(&got, &vec![prev as i32; 1031], "blocking ring")?;
        // Empty messages.
        let mut e: Vec<u8> = Vec::new();
        let s = c.isend(Vec::<u8>::new(), next, 1)?;
        c.recv(&mut e, prev, 1)?;
        s.wait()?;
        Ok(())
    }

    fn split(c: &MpiComm) -> R {
        let me = c.rank();
        // Even/odd, key reversed: the highest old rank gets new rank 0.
        let sub = c
            .split(Some((me % 2) as u32), -(me as i32))?
            .ok_or("split returned None for a colour")?;
        ensure!(sub.backend() == "mpi", "backend {}", sub.backend());
        ensure!(sub.world_size() == 2, "sub world size {}", sub.world_size());
        let want_rank = 1 - me / 2;
        ensure!(
            sub.rank() == want_rank,
            "rank {me}: new rank {} want {want_rank}",
            sub.rank()
        );
        let mut v = vec![me as i64; 10];
        sub.all_reduce(&mut v, ReduceOp::Sum)?;
        let want = if me % 2 == 0 { 2 } else { 4 };
        same(&v, &[want; 10], "all_reduce inside the split")?;
        let mut g = vec![0i64; 2];
        sub.all_gather(&[me as i64], &mut g)?;
        let want_g = if me % 2 == 0 { [2, 0] } else { [3, 1] };
        same(&g, &want_g, "all_gather inside the split (key order)")?;
        drop(sub);
        // Opting out.
        let color = (me != 3).then_some(0);
        let sub = c.split(color, me as i32)?;
        ensure!(
            sub.is_some() == (me != 3),
            "rank {me}: opted-out split returned {:?}",
            sub.is_some()
        );
        if let Some(sub) = sub {
            ensure!(
                sub.world_size() == 3 && sub.rank() == me,
                "rank {me}: {} of {}",
                sub.rank(),
                sub.world_size()
            );
            let mut x = [1u8];
            sub.all_reduce(&mut x, ReduceOp::Sum)?;
            ensure!(x[0] == 3, "sum over 3 ranks = {}", x[0]);
            all_reduce_on::<f32>(sub.as_ref())?;
            all_reduce_on::<f16>(sub.as_ref())?;
            all_reduce_on::<i64>(sub.as_ref())?;
        }
        Ok(())
    }

    fn errors(c: &MpiComm) -> R {
        let me = c.rank();
        let e = c.reduce_scatter(
            &vec![0f32; WORLD * 3 + 1],
            &mut vec![0f32; 3],
            ReduceOp::Sum,
        );
        ensure!(
            matches!(e, Err(Error::LengthMismatch { .. })),
            "reduce_scatter bad length: {e:?}"
        );
        let e = c.broadcast(&mut vec![0f32; 3], WORLD);
        ensure!(
            matches!(e, Err(Error::RankOutOfRange { .. })),
            "broadcast root 4: {e:?}"
        );
        let e = c.reduce(&[1i32], Some(&mut [0i32]), ReduceOp::Sum, 9);
        ensure!(
            matches!(e, Err(Error::RankOutOfRange { .. })),
            "reduce root 9: {e:?}"
        );
        let e = c.send(&[1u8], (me + 1) % WORLD, u32::MAX);
        ensure!(
            matches!(e, Err(Error::InvalidArgument(_))),
            "tag u32::MAX: {e:?}"
        );
        // Receive length mismatches, both ways; the message is consumed and the communicator stays usable.
        match me {
            0 => c.send(&[1f32; 5], 1, 42)?,
            1 => {
                let e = c.recv(&mut [0f32; 4], 0, 42);
                ensure!(
                    matches!(
                        e,
                        Err(Error::LengthMismatch {
                            expected: 4,
                            got: 5,
                            ..
                        })
                    ),
                    "longer message: {e:?}"
                );
            }
            2 => c.send(&[1f32; 3], 3, 42)?,
            _ => {
                let e = c.recv(&mut [0f32; 6], 2, 42);
                ensure!(
                    matches!(
                        e,
                        Err(Error::LengthMismatch {
                            expected: 6,
                            got: 3,
                            ..
                        })
                    ),
                    "shorter message: {e:?}"
                );
            }
        }
        c.barrier()?;
        let mut v = [me as i32];
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        ensure!(v[0] == 6, "all_reduce after errors: {}", v[0]);
        Ok(())
    }

    fn checked(c: &MpiComm) -> R {
        let me = c.rank();
        let cc = MpiComm::world(
            Config::default()
                .with_timeout(Duration::from_secs(60))
                .with_check(true),
        )?;
        let len = if me == 0 { 5 } else { 6 };
        let e = cc.all_reduce(&mut vec![1f32; len], ReduceOp::Sum);
        ensure!(
            matches!(e, Err(Error::CollectiveMismatch { .. })),
            "count mismatch: {e:?}"
        );
        let e = if me == 1 {
            cc.all_reduce(&mut vec![1f64; 6], ReduceOp::Sum)
        } else {
            cc.all_reduce(&mut vec![1f32; 6], ReduceOp::Sum)
        };
        ensure!(
            matches!(e, Err(Error::CollectiveMismatch { .. })),
            "dtype mismatch: {e:?}"
        );
        let e = cc.broadcast(&mut [0u8; 4], if me == 2 { 1 } else { 0 });
        ensure!(
            matches!(e, Err(Error::CollectiveMismatch { .. })),
            "root mismatch: {e:?}"
        );
        // No MPI call was made with mismatched arguments: the communicator still works.
        let mut v = vec![1f32; 6];
        cc.all_reduce(&mut v, ReduceOp::Sum)?;
        same(&v, &[4.0; 6], "all_reduce after mismatches")?;
        Ok(())
    }

    fn recv_timeout(c: &MpiComm) -> R {
        let me = c.rank();
        // Only rank 0 has a short timeout; its receive never matches, so nothing is left in flight.
        let t = if me == 0 {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(60)
        };
        let tc = MpiComm::world(Config::default().with_timeout(t))?;
        if me == 0 {
            let e = tc.recv(&mut [0u8; 4], 1, 777);
            ensure!(
                matches!(
                    e,
                    Err(Error::Timeout {
                        waiting_for: Some(1),
                        ..
                    })
                ),
                "recv that never matches: {e:?}"
            );
        }
        c.barrier()?;
        let mut v = [1i64];
        tc.all_reduce(&mut v, ReduceOp::Sum)?;
        ensure!(v[0] == 4, "all_reduce after a receive timeout: {}", v[0]);
        Ok(())
    }

    fn bytes_sent(c: &MpiComm) -> R {
        let before = c.bytes_sent();
        c.all_reduce(&mut vec![0f32; 1000], ReduceOp::Sum)?;
        let d = c.bytes_sent() - before;
        ensure!(
            d == 6000,
            "all_reduce of 4000 bytes on 4 ranks counted {d}, want 2*3/4*4000"
        );
        let before = c.bytes_sent();
        c.all_gather(&[0u8; 10], &mut [0u8; 40])?;
        let d = c.bytes_sent() - before;
        ensure!(d == 30, "all_gather counted {d}, want 30");
        let before = c.bytes_sent();
        c.iall_reduce(vec![0f64; 100], ReduceOp::Max)?.wait()?;
        let d = c.bytes_sent() - before;
        ensure!(d == 1200, "iall_reduce counted {d}, want 1200");
        // the per-kind counters (stats): calls and bytes received, by the module docs' formulas
        c.reset_stats();
        c.all_reduce(&mut vec![0f32; 1000], ReduceOp::Sum)?;
        let mut b = [0u8; 40];
        c.broadcast(&mut b, 0)?;
        if c.rank() == 0 {
            c.send(&[1i32; 5], 1, 9)?;
        } else if c.rank() == 1 {
            c.recv(&mut [0i32; 5], 0, 9)?;
        }
        let s = c.stats();
        use ferroccl::stats::OpKind as K;
        let ar = s.op(K::AllReduce);
        ensure!(
            (ar.calls, ar.bytes_sent, ar.bytes_received) == (1, 6000, 6000),
            "all_reduce stats {ar:?}"
        );
        let bc = s.op(K::Broadcast);
        let want_recv = if c.rank() == 0 { 0 } else { 40 };
        let want_sent = if c.rank() == 3 { 0 } else { 40 };
        ensure!(
            (bc.calls, bc.bytes_sent, bc.bytes_received) == (1, want_sent, want_recv),
            "broadcast stats {bc:?}"
        );
        let (sd, rv) = (s.op(K::Send), s.op(K::Recv));
        let want = match c.rank() {
            0 => ((1, 20, 0), (0, 0, 0)),
            1 => ((0, 0, 0), (1, 0, 20)),
            _ => ((0, 0, 0), (0, 0, 0)),
        };
        ensure!(
            (
                (sd.calls, sd.bytes_sent, sd.bytes_received),
                (rv.calls, rv.bytes_sent, rv.bytes_received)
            ) == want,
            "p2p stats {sd:?} {rv:?}"
        );
        Ok(())
    }

    fn raw_baseline(c: &MpiComm) -> R {
        let mut a: Vec<f32> = input(c.rank(), 4099, ReduceOp::Sum);
        let mut b = a.clone();
        raw_allreduce_f32(c, &mut a)?;
        c.all_reduce(&mut b, ReduceOp::Sum)?;
        same(&a, &b, "raw rsmpi all_reduce vs ferroccl")?;
        same(
            &a,
            &reference::<f32>(4099, ReduceOp::Sum)?,
            "raw rsmpi all_reduce vs reference",
        )?;
        let send: Vec<f32> = input(c.rank(), 4099, ReduceOp::Sum);
        let mut recv = vec![0f32; 4099];
        raw_allreduce_into_f32(c, &send, &mut recv)?;
        same(&recv, &a, "raw rsmpi all_reduce_into")?;
        Ok(())
    }

    fn relaunch() -> i32 {
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("cannot find the test binary to relaunch under mpirun: {e}");
                return 2;
            }
        };
        let mpirun = std::env::var("MPIRUN").unwrap_or_else(|_| "mpirun".into());
        let open_mpi = Command::new(&mpirun)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("Open MPI"))
            .unwrap_or(false);
        let mut cmd = Command::new(&mpirun);
        cmd.args(["-np", &WORLD.to_string()]);
        if open_mpi {
            cmd.arg("--oversubscribe");
            if is_root() {
                cmd.arg("--allow-run-as-root");
            }
        }
        cmd.arg(exe).args(std::env::args().skip(1));
        eprintln!("not under an MPI launcher: running {cmd:?}");
        match cmd.status() {
            Ok(s) => s.code().unwrap_or(1),
            Err(e) => {
                eprintln!("cannot run {mpirun:?} ({e}); install MPI (e.g. apt-get install openmpi-bin libopenmpi-dev) or set MPIRUN");
                2
            }
        }
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
            })
            .unwrap_or_else(|| std::env::var("USER").is_ok_and(|u| u == "root"))
    }

    type Check = (&'static str, fn(&MpiComm) -> R);

    pub fn main() -> i32 {
        if !launched_by_mpirun() {
            return relaunch();
        }
        let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
        let comm = match MpiComm::world(Config::default().with_timeout(Duration::from_secs(60))) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("MpiComm::world failed: {e}");
                return 1;
            }
        };
        if comm.world_size() != WORLD {
            eprintln!("run with {WORLD} ranks (got {})", comm.world_size());
            return 1;
        }
        let me = comm.rank();
        let checks: Vec<Check> = vec![
            ("all_reduce", |c| each_dtype!(all_reduce(c))),
            ("reduce_scatter", |c| each_dtype!(reduce_scatter(c))),
            ("all_gather", |c| each_dtype!(all_gather(c))),
            ("broadcast", |c| each_dtype!(broadcast(c))),
            ("reduce", |c| each_dtype!(reduce(c))),
            ("all_to_all", |c| each_dtype!(all_to_all(c))),
            ("all_to_allv", |c| each_dtype!(all_to_allv(c))),
            ("nonblocking", nonblocking),
            ("send_recv", send_recv),
            ("split", split),
            ("errors", errors),
            ("checked_mode", checked),
            ("recv_timeout", recv_timeout),
            ("bytes_sent", bytes_sent),
            ("raw_baseline", raw_baseline),
        ];
        if me == 0 {
            println!(
                "MPI: {} ranks, {:?}, {}",
                comm.world_size(),
                comm.threading(),
                comm.library_version().lines().next().unwrap_or("")
            );
        }
        let (mut passed, mut failed) = (0, 0);
        for (name, f) in checks {
            if filter.as_deref().is_some_and(|p| !name.contains(p)) {
                continue;
            }
            let t0 = std::time::Instant::now();
            let r = f(&comm);
            if let Err(e) = &r {
                eprintln!("rank {me}: {name}: {e}");
            }
            // Agree on the outcome (min over ranks of "ok").
            let mut ok = [i32::from(r.is_ok())];
            if let Err(e) = comm.all_reduce(&mut ok, ReduceOp::Min) {
                eprintln!("rank {me}: agreeing on {name}: {e}");
                ok[0] = 0;
            }
            if ok[0] == 1 {
                passed += 1;
            } else {
                failed += 1;
            }
            if me == 0 {
                let verdict = if ok[0] == 1 { "ok" } else { "FAILED" };
                println!(
                    "test {name} ... {verdict} ({:.2}s)",
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        drop(comm); // the last communicator: MPI_Finalize
        if me == 0 {
            println!("{passed} passed, {failed} failed");
        }
        i32::from(failed > 0)
    }
}
