//! Every collective against the naive reference of `common`, through the `Communicator` trait only,
//! so each backend runs the same checks.
#![allow(dead_code)]

use super::*;
use ferroccl::prelude::*;
use ferroccl::Communicator;

/// The checker of every test: `got` must equal `want` element for element (NaN equals nothing).
pub fn eq<T: TestElem>(what: &str, got: &[T], want: &[T]) -> Result<()> {
    if got.len() != want.len() {
        return Err(Error::InvalidArgument(format!(
            "{what}: length {} vs {}",
            got.len(),
            want.len()
        )));
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        return Err(Error::InvalidArgument(format!(
            "{what}: element {i}: got {:?}, want {:?}",
            got[i], want[i]
        )));
    }
    Ok(())
}

/// Run every collective for dtype T and length n; returns the number of checks made.
pub fn collectives_t<T: TestElem + Default>(
    c: &dyn Communicator,
    n: usize,
    ops: &[ReduceOp],
) -> Result<usize> {
    let (r, w) = (c.rank(), c.world_size());
    let mut checks = 0;
    let sfx =
        |s: &str, op: ReduceOp| format!("{s} {} {} n={n} world={w} rank={r}", T::DTYPE, op.name());
    for &op in ops {
        let want: Vec<T> = reduced_vec(w, n, op);
        // all_reduce in place
        let mut v: Vec<T> = input(r, n, op);
        c.all_reduce(&mut v, op)?;
        eq(&sfx("all_reduce", op), &v, &want)?;
        // out of place
        let inp: Vec<T> = input(r, n, op);
        let mut out = vec![T::poison(); n];
        c.all_reduce_into(&inp, &mut out, op)?;
        eq(&sfx("all_reduce_into", op), &out, &want)?;
        eq(
            &sfx("all_reduce_into left send alone", op),
            &inp,
            &input::<T>(r, n, op),
        )?;
        // non-blocking, two in flight at once
        let w1 = c.iall_reduce(input::<T>(r, n, op), op)?;
        let w2 = c.iall_reduce_into(input::<T>(r, n, op), vec![T::poison(); n], op)?;
        eq(&sfx("iall_reduce", op), &w1.wait()?, &want)?;
        eq(&sfx("iall_reduce_into", op), &w2.wait()?.1, &want)?;
        // reduce_scatter: send is w blocks of n; block b of rank r = input(r, w*n)[b*n..]
        let send: Vec<T> = input(r, w * n, op);
        let want_rs: Vec<T> = reduce_scatter_want(w, r, n, op);
        let mut out = vec![T::poison(); n];
        c.reduce_scatter(&send, &mut out, op)?;
        eq(&sfx("reduce_scatter", op), &out, &want_rs)?;
        let (_, out2) = c.ireduce_scatter(send, vec![T::poison(); n], op)?.wait()?;
        eq(&sfx("ireduce_scatter", op), &out2, &want_rs)?;
        // reduce to a rotating root
        let root = (n + 1) % w;
        let send: Vec<T> = input(r, n, op);
        let mut out = vec![T::poison(); n];
        c.reduce(&send, (r == root).then_some(&mut out), op, root)?;
        if r == root {
            eq(&sfx("reduce", op), &out, &want)?;
        }
        let (_, out2) = c
            .ireduce(send, (r == root).then(|| vec![T::poison(); n]), op, root)?
            .wait()?;
        if r == root {
            eq(&sfx("ireduce", op), &out2.unwrap_or_default(), &want)?;
        }
        checks += 8;
    }
    let op = ReduceOp::Sum;
    // all_gather
    let mine: Vec<T> = input(r, n, op);
    let want: Vec<T> = all_gather_want(w, n, op);
    let mut out = vec![T::poison(); w * n];
    c.all_gather(&mine, &mut out)?;
    eq(&sfx("all_gather", op), &out, &want)?;
    let (_, out2) = c.iall_gather(mine, vec![T::poison(); w * n])?.wait()?;
    eq(&sfx("iall_gather", op), &out2, &want)?;
    // broadcast from the last rank
    let root = w - 1;
    let mut b: Vec<T> = if r == root {
        input(root, n, op)
    } else {
        vec![T::poison(); n]
    };
    c.broadcast(&mut b, root)?;
    eq(&sfx("broadcast", op), &b, &input::<T>(root, n, op))?;
    let b2 = c
        .ibroadcast(
            if r == root {
                input::<T>(root, n, op)
            } else {
                vec![T::poison(); n]
            },
            root,
        )?
        .wait()?;
    eq(&sfx("ibroadcast", op), &b2, &input::<T>(root, n, op))?;
    // all_to_all: block j of rank i's send = input(i, w*n)[j*n..]
    let send: Vec<T> = input(r, w * n, op);
    let want: Vec<T> = all_to_all_want(w, r, n, op);
    let mut out = vec![T::poison(); w * n];
    c.all_to_all(&send, &mut out)?;
    eq(&sfx("all_to_all", op), &out, &want)?;
    let (_, out2) = c.iall_to_all(send, vec![T::poison(); w * n])?.wait()?;
    eq(&sfx("iall_to_all", op), &out2, &want)?;
    // all_to_allv: rank i sends (i + j + n) % 4 elements to rank j
    let counts: Vec<Vec<usize>> = (0..w)
        .map(|i| (0..w).map(|j| (i + j + n) % 4).collect())
        .collect();
    let (send, sc, rc, want) = all_to_allv_case::<T>(&counts, r, op);
    let mut out = vec![T::poison(); rc.iter().sum()];
    c.all_to_allv(&send, &sc, &mut out, &rc)?;
    eq(&sfx("all_to_allv", op), &out, &want)?;
    let (_, out2) = c
        .iall_to_allv(
            send,
            sc.clone(),
            vec![T::poison(); rc.iter().sum()],
            rc.clone(),
        )?
        .wait()?;
    eq(&sfx("iall_to_allv", op), &out2, &want)?;
    // send/recv around the ring, irecv posted before the send
    let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
    let pending = c.irecv(vec![T::poison(); n], prev, 7)?;
    c.send(&input::<T>(r, n, op), next, 7)?;
    eq(
        &sfx("send/irecv", op),
        &pending.wait()?,
        &input::<T>(prev, n, op),
    )?;
    let s = c.isend(input::<T>(r, n, op), next, 8)?;
    let mut got = vec![T::poison(); n];
    c.recv(&mut got, prev, 8)?;
    s.wait()?;
    eq(&sfx("isend/recv", op), &got, &input::<T>(prev, n, op))?;
    c.barrier()?;
    c.ibarrier()?.wait()?;
    Ok(checks + 10)
}

/// All dtypes and ops at length n.
pub fn all_dtypes(c: &dyn Communicator, n: usize) -> Result<usize> {
    let ops = ReduceOp::ALL;
    Ok(collectives_t::<f32>(c, n, &ops)?
        + collectives_t::<f64>(c, n, &ops)?
        + collectives_t::<half::f16>(c, n, &ops)?
        + collectives_t::<half::bf16>(c, n, &ops)?
        + collectives_t::<i32>(c, n, &ops)?
        + collectives_t::<i64>(c, n, &ops)?
        + collectives_t::<u8>(c, n, &ops)?)
}
