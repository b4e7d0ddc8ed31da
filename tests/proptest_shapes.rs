//! Random shapes, world sizes and roots against the naive reference.
mod common;
use common::*;
use ferroccl::prelude::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_shapes(world in 1usize..7, n in 0usize..5000, root_seed in 0usize..100, op_i in 0usize..5) {
        let op = ReduceOp::ALL[op_i];
        let root = root_seed % world;
        let out = ferroccl::local::run(world, |c| {
            let r = c.rank();
            let mut v: Vec<i64> = input(r, n, op);
            c.all_reduce(&mut v, op)?;
            let mut red = vec![0i64; n];
            c.reduce(&input::<i64>(r, n, op), (r == root).then_some(&mut red), op, root)?;
            let mut rs = vec![0f64; n];
            c.reduce_scatter(&input::<f64>(r, n * world, op), &mut rs, op)?;
            let mut b: Vec<f32> = if r == root { input(root, n, op) } else { vec![0.0; n] };
            c.broadcast(&mut b, root)?;
            Ok((v, red, rs, b))
        }).unwrap();
        let want: Vec<i64> = reduced_vec(world, n, op);
        let full: Vec<f64> = reduced_vec(world, n * world, op);
        for (r, (v, red, rs, b)) in out.iter().enumerate() {
            prop_assert_eq!(v, &want);
            if r == root { prop_assert_eq!(red, &want); }
            prop_assert_eq!(&rs[..], &full[r * n..(r + 1) * n]);
            prop_assert_eq!(b, &input::<f32>(root, n, op));
        }
    }
}
