//! Random shapes, world sizes, roots, dtypes and all-to-allv counts (zeros included) against the
//! naive reference, every collective in its blocking and non-blocking form.
mod common;
use common::suite::eq;
use common::*;
use ferroccl::prelude::*;
use proptest::prelude::*;

/// One random case: every collective on `world` ranks for dtype T, blocks of `n` elements, root
/// `root`, all-to-allv counts `counts[i][j]` (rank i to rank j).
fn case<T: TestElem>(
    world: usize,
    n: usize,
    op: ReduceOp,
    root: usize,
    counts: &[Vec<usize>],
) -> Result<()> {
    let want: Vec<T> = reduced_vec(world, n, op);
    let ag_want: Vec<T> = all_gather_want(world, n, ReduceOp::Sum);
    ferroccl::local::run(world, |c| {
        let r = c.rank();
        let tag = |s: &str| format!("{s} {} {} n={n} rank {r}/{world}", T::DTYPE, op.name());
        // all_reduce, in place and out of place, and both at once non-blocking
        let mut v: Vec<T> = input(r, n, op);
        c.all_reduce(&mut v, op)?;
        eq(&tag("all_reduce"), &v, &want)?;
        let mut out = vec![T::poison(); n];
        c.all_reduce_into(&input::<T>(r, n, op), &mut out, op)?;
        eq(&tag("all_reduce_into"), &out, &want)?;
        let w1 = c.iall_reduce(input::<T>(r, n, op), op)?;
        let w2 = c.iall_reduce_into(input::<T>(r, n, op), vec![T::poison(); n], op)?;
        eq(&tag("iall_reduce"), &w1.wait()?, &want)?;
        eq(&tag("iall_reduce_into"), &w2.wait()?.1, &want)?;
        // reduce to the root
        let mut red = vec![T::poison(); n];
        c.reduce(
            &input::<T>(r, n, op),
            (r == root).then_some(&mut red),
            op,
            root,
        )?;
        let (_, ired) = c
            .ireduce(
                input::<T>(r, n, op),
                (r == root).then(|| vec![T::poison(); n]),
                op,
                root,
            )?
            .wait()?;
        if r == root {
            eq(&tag("reduce"), &red, &want)?;
            eq(&tag("ireduce"), &ired.unwrap_or_default(), &want)?;
        }
        // reduce_scatter
        let rs_want: Vec<T> = reduce_scatter_want(world, r, n, op);
        let mut rs = vec![T::poison(); n];
        c.reduce_scatter(&input::<T>(r, world * n, op), &mut rs, op)?;
        eq(&tag("reduce_scatter"), &rs, &rs_want)?;
        let (_, rs) = c
            .ireduce_scatter(input::<T>(r, world * n, op), vec![T::poison(); n], op)?
            .wait()?;
        eq(&tag("ireduce_scatter"), &rs, &rs_want)?;
        // broadcast from the root
        let bcast = |r: usize| -> Vec<T> {
            if r == root {
                input(root, n, ReduceOp::Sum)
            } else {
                vec![T::poison(); n]
            }
        };
        let mut b = bcast(r);
        c.broadcast(&mut b, root)?;
        eq(&tag("broadcast"), &b, &input::<T>(root, n, ReduceOp::Sum))?;
        let b = c.ibroadcast(bcast(r), root)?.wait()?;
        eq(&tag("ibroadcast"), &b, &input::<T>(root, n, ReduceOp::Sum))?;
        // all_gather, all_to_all: blocking, then both non-blocking in flight at once
        let mine: Vec<T> = input(r, n, ReduceOp::Sum);
        let mut ag = vec![T::poison(); world * n];
        c.all_gather(&mine, &mut ag)?;
        eq(&tag("all_gather"), &ag, &ag_want)?;
        let a2a_want: Vec<T> = all_to_all_want(world, r, n, ReduceOp::Sum);
        let a2a_send: Vec<T> = input(r, world * n, ReduceOp::Sum);
        let mut a2a = vec![T::poison(); world * n];
        c.all_to_all(&a2a_send, &mut a2a)?;
        eq(&tag("all_to_all"), &a2a, &a2a_want)?;
        let wg = c.iall_gather(mine, vec![T::poison(); world * n])?;
        let wa = c.iall_to_all(a2a_send, vec![T::poison(); world * n])?;
        eq(&tag("iall_gather"), &wg.wait()?.1, &ag_want)?;
        eq(&tag("iall_to_all"), &wa.wait()?.1, &a2a_want)?;
        // all_to_allv with the random counts
        let (send, sc, rc, v_want) = all_to_allv_case::<T>(counts, r, ReduceOp::Sum);
        let total: usize = rc.iter().sum();
        let mut v = vec![T::poison(); total];
        c.all_to_allv(&send, &sc, &mut v, &rc)?;
        eq(&tag(&format!("all_to_allv {counts:?}")), &v, &v_want)?;
        let (_, v) = c
            .iall_to_allv(send, sc, vec![T::poison(); total], rc)?
            .wait()?;
        eq(&tag(&format!("iall_to_allv {counts:?}")), &v, &v_want)
    })
    .map(|_| ())
}

/// All-to-allv counts for up to 8 ranks: a quarter of them zero.
fn counts() -> impl Strategy<Value = Vec<Vec<usize>>> {
    let count = prop_oneof![1 => Just(0usize), 3 => 1usize..300];
    prop::collection::vec(prop::collection::vec(count, 8), 8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_shapes(
        world in 1usize..=8,
        // past 64 KiB for the wider dtypes: recursive doubling and the two-shot, ragged chunks
        n in prop_oneof![3 => 0usize..600, 1 => 600usize..20_000],
        root_seed in 0usize..100,
        op_i in 0usize..5,
        dtype_i in 0usize..7,
        counts in counts(),
    ) {
        let op = ReduceOp::ALL[op_i];
        let root = root_seed % world;
        let counts: Vec<Vec<usize>> = counts[..world].iter().map(|c| c[..world].to_vec()).collect();
        let r = match DType::ALL[dtype_i] {
            DType::F32 => case::<f32>(world, n, op, root, &counts),
            DType::F64 => case::<f64>(world, n, op, root, &counts),
            DType::F16 => case::<half::f16>(world, n, op, root, &counts),
            DType::BF16 => case::<half::bf16>(world, n, op, root, &counts),
            DType::I32 => case::<i32>(world, n, op, root, &counts),
            DType::I64 => case::<i64>(world, n, op, root, &counts),
            DType::U8 => case::<u8>(world, n, op, root, &counts),
        };
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}
