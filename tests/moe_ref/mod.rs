//! Shared by tests/moe.rs (in-process and TCP ranks) and tests/moe_mpi.rs (mpirun): scenarios of
//! routed tokens, a single-process reference MoE layer, and the distributed layer through
//! `ferroccl::moe`, compared on every rank.
#![allow(dead_code)]

use ferroccl::kernels::CpuKernels;
use ferroccl::moe::{DropPolicy, Layout, LayoutConfig, Moe, Placement, Wire};
use ferroccl::sim::rng::Rng;
use ferroccl::{Communicator, Result};

/// One routing situation, the same on every rank (each rank can rebuild every rank's input).
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub placement: Placement,
    pub capacity: Option<(f64, DropPolicy)>,
    /// Tokens of rank r.
    pub tokens: fn(usize, usize) -> usize,
    /// Expert choices of a token: (rng, experts, top_k) → ids.
    pub route: fn(&mut Rng, usize, usize) -> Vec<i64>,
}

fn distinct(rng: &mut Rng, e: usize, k: usize) -> Vec<i64> {
    rng.subset(e, k).into_iter().map(|x| x as i64).collect()
}

fn skewed(rng: &mut Rng, e: usize, k: usize) -> Vec<i64> {
    // low experts far more popular; distinct per token
    let mut out: Vec<i64> = Vec::new();
    while out.len() < k {
        let u = rng.uniform();
        let id = ((u * u * u) * e as f64) as i64;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

fn even_only(rng: &mut Rng, e: usize, k: usize) -> Vec<i64> {
    rng.subset(e / 2, k)
        .into_iter()
        .map(|x| 2 * x as i64)
        .collect()
}

fn all_to_zero(_: &mut Rng, _: usize, k: usize) -> Vec<i64> {
    (0..k as i64).collect()
}

fn uneven(r: usize, _w: usize) -> usize {
    // rank 1 has none, others 3..=25
    if r == 1 {
        0
    } else {
        3 + (r * 7) % 23
    }
}

fn fixed(_: usize, _: usize) -> usize {
    12
}

/// The scenarios of issue 21's test list for a world of `w` ranks.
pub fn scenarios(w: usize) -> Vec<Scenario> {
    let mut v = vec![
        Scenario {
            name: "uneven top-2 (skewed load, a rank with zero tokens)",
            experts: 2 * w,
            top_k: 2,
            hidden: 8,
            placement: Placement::Even,
            capacity: None,
            tokens: uneven,
            route: skewed,
        },
        Scenario {
            name: "empty experts (only even ids)",
            experts: 2 * w,
            top_k: 1,
            hidden: 5,
            placement: Placement::Even,
            capacity: None,
            tokens: fixed,
            route: even_only,
        },
        Scenario {
            name: "all tokens to one expert (top-1)",
            experts: w,
            top_k: 1,
            hidden: 4,
            placement: Placement::Even,
            capacity: None,
            tokens: uneven,
            route: all_to_zero,
        },
        Scenario {
            name: "capacity drops by position",
            experts: 2 * w,
            top_k: 2,
            hidden: 6,
            placement: Placement::Even,
            capacity: Some((0.6, DropPolicy::Position)),
            tokens: uneven,
            route: skewed,
        },
        Scenario {
            name: "capacity drops by probability",
            experts: 2 * w,
            top_k: 2,
            hidden: 6,
            placement: Placement::Even,
            capacity: Some((0.6, DropPolicy::Probability)),
            tokens: fixed,
            route: skewed,
        },
        Scenario {
            name: "top-8",
            experts: 8 * w.max(2),
            top_k: 8,
            hidden: 3,
            placement: Placement::Even,
            capacity: None,
            tokens: uneven,
            route: distinct,
        },
    ];
    // explicit placement, rank 0 holds no expert, the last rank holds three
    let e = w + 1;
    let owner: Vec<usize> = (0..e)
        .map(|i| if i < w - 1 { i + 1 } else { w - 1 })
        .collect();
    v.push(Scenario {
        name: "explicit placement (rank 0 holds none)",
        experts: e,
        top_k: 2,
        hidden: 7,
        placement: Placement::Explicit(owner),
        capacity: None,
        tokens: uneven,
        route: distinct,
    });
    v
}

/// Rank r's router output and input rows.
pub struct Input {
    pub ids: Vec<i64>,
    pub weights: Vec<f32>,
    pub x: Vec<f32>,
    pub layout: Layout,
}

/// Dyadic weights (multiples of 1/8) keep products with small-integer rows exact.
pub fn input(s: &Scenario, w: usize, r: usize, dyadic: bool) -> Input {
    let mut rng = Rng::new(1000 + r as u64 * 7919 + s.experts as u64);
    let t = (s.tokens)(r, w);
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for _ in 0..t {
        ids.extend((s.route)(&mut rng, s.experts, s.top_k));
        for _ in 0..s.top_k {
            weights.push(if dyadic {
                (1 + rng.below(8)) as f32 / 8.0
            } else {
                0.1 + rng.uniform() as f32
            });
        }
    }
    let x = (0..t * s.hidden)
        .map(|_| {
            if dyadic {
                rng.below(33) as f32 - 16.0
            } else {
                rng.normal() as f32
            }
        })
        .collect();
    let mut cfg = LayoutConfig {
        experts: s.experts,
        world: w,
        placement: s.placement.clone(),
        capacity: ferroccl::moe::Capacity::Dropless,
    };
    if let Some((f, p)) = s.capacity {
        cfg = cfg.with_capacity(f, p);
    }
    let layout = Layout::new(&ids, &weights, s.top_k, &cfg).expect("layout");
    Input {
        ids,
        weights,
        x,
        layout,
    }
}

/// Expert e's parameters: W (h×h, row-major) and b (h).
pub fn expert_params(s: &Scenario, e: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(77 + e as u64);
    let h = s.hidden;
    let w = (0..h * h).map(|_| rng.normal() as f32 * 0.5).collect();
    let b = (0..h).map(|_| rng.normal() as f32 * 0.1).collect();
    (w, b)
}

fn matvec(w: &[f32], x: &[f32], b: &[f32]) -> Vec<f32> {
    let h = x.len();
    (0..h)
        .map(|i| b[i] + (0..h).map(|j| w[i * h + j] * x[j]).sum::<f32>())
        .collect()
}

fn matvec_t(w: &[f32], g: &[f32]) -> Vec<f32> {
    let h = g.len();
    (0..h)
        .map(|j| (0..h).map(|i| w[i * h + j] * g[i]).sum::<f32>())
        .collect()
}

/// The gradient of the loss `Σ out · G` where `G` is a fixed random tensor (so ∂out = G).
pub fn grad_out(s: &Scenario, r: usize, tokens: usize) -> Vec<f32> {
    let mut rng = Rng::new(5555 + r as u64);
    (0..tokens * s.hidden)
        .map(|_| rng.normal() as f32)
        .collect()
}

/// Reference results of rank `me`: out, ∂x, ∂weights (its tokens) and ∂W, ∂b of its experts.
pub struct Reference {
    pub out: Vec<f32>,
    pub grad_x: Vec<f32>,
    pub grad_w: Vec<f32>,
    pub grad_params: Vec<(Vec<f32>, Vec<f32>)>,
}

/// The single-process MoE layer over every rank's tokens (kept slots per the layouts).
pub fn reference(s: &Scenario, w: usize, me: usize, dyadic: bool) -> Reference {
    let h = s.hidden;
    let inputs: Vec<Input> = (0..w).map(|r| input(s, w, r, dyadic)).collect();
    let params: Vec<_> = (0..s.experts).map(|e| expert_params(s, e)).collect();
    let mine = &inputs[me];
    let t = mine.layout.tokens();
    let g = grad_out(s, me, t);
    let mut out = vec![0f32; t * h];
    let mut grad_x = vec![0f32; t * h];
    let mut grad_w = vec![0f32; t * s.top_k];
    for tok in 0..t {
        for j in 0..s.top_k {
            let slot = tok * s.top_k + j;
            if mine.layout.slot_row(slot).is_none() {
                continue;
            }
            let e = mine.ids[slot] as usize;
            let (pw, pb) = &params[e];
            let xv = &mine.x[tok * h..(tok + 1) * h];
            let y = matvec(pw, xv, pb);
            let wt = mine.weights[slot];
            let gv = &g[tok * h..(tok + 1) * h];
            for i in 0..h {
                out[tok * h + i] += wt * y[i];
            }
            let scaled: Vec<f32> = gv.iter().map(|v| wt * v).collect();
            let gx = matvec_t(pw, &scaled);
            for i in 0..h {
                grad_x[tok * h + i] += gx[i];
            }
            grad_w[slot] = gv.iter().zip(&y).map(|(a, b)| a * b).sum();
        }
    }
    let my_experts = mine.layout.experts_of(me).to_vec();
    let mut grad_params = Vec::new();
    for &e in &my_experts {
        let mut gw = vec![0f32; h * h];
        let mut gb = vec![0f32; h];
        for (r, inp) in inputs.iter().enumerate() {
            let gr = grad_out(s, r, inp.layout.tokens());
            for tok in 0..inp.layout.tokens() {
                for j in 0..s.top_k {
                    let slot = tok * s.top_k + j;
                    if inp.layout.slot_row(slot).is_none() || inp.ids[slot] as usize != e {
                        continue;
                    }
                    let wt = inp.weights[slot];
                    for i in 0..h {
                        let gy = wt * gr[tok * h + i];
                        gb[i] += gy;
                        for jj in 0..h {
                            gw[i * h + jj] += gy * inp.x[tok * h + jj];
                        }
                    }
                }
            }
        }
        grad_params.push((gw, gb));
    }
    Reference {
        out,
        grad_x,
        grad_w,
        grad_params,
    }
}

/// The distributed layer on `comm`, forward and backward, as a trainer would run it.
pub fn distributed<C: Communicator + ?Sized>(
    comm: &C,
    s: &Scenario,
    per_node: Option<usize>,
    wire: Wire,
    dyadic: bool,
) -> Result<Reference> {
    let (w, me) = (comm.world_size(), comm.rank());
    let h = s.hidden;
    let k = CpuKernels;
    let inp = input(s, w, me, dyadic);
    let mut moe = Moe::new(comm);
    moe.set_wire(wire);
    moe.set_hierarchical(per_node)?;
    let d = moe.dispatch(&k, &inp.x, h, &inp.layout)?;
    let experts = inp.layout.experts_of(me).to_vec();
    assert_eq!(d.expert_counts.len(), experts.len());
    let params: Vec<_> = experts.iter().map(|&e| expert_params(s, e)).collect();
    let mut y = vec![0f32; d.rows.len()];
    let mut off = 0;
    for (i, &n) in d.expert_counts.iter().enumerate() {
        for r in off..off + n {
            let v = matvec(&params[i].0, &d.rows[r * h..(r + 1) * h], &params[i].1);
            y[r * h..(r + 1) * h].copy_from_slice(&v);
        }
        off += n;
    }
    let (out, rows) = moe.combine_with_rows(&k, &y, &d.handle)?;
    let g = grad_out(s, me, inp.layout.tokens());
    let grad_w = ferroccl::moe::weight_grad(&inp.layout, &d.handle, &g, &rows)?;
    let gy = moe.combine_backward(&k, &g, &d.handle)?;
    let mut grad_rows = vec![0f32; gy.len()];
    let mut grad_params = Vec::new();
    let mut off = 0;
    for (i, &n) in d.expert_counts.iter().enumerate() {
        let mut gw = vec![0f32; h * h];
        let mut gb = vec![0f32; h];
        for r in off..off + n {
            let gv = &gy[r * h..(r + 1) * h];
            let xv = &d.rows[r * h..(r + 1) * h];
            for a in 0..h {
                gb[a] += gv[a];
                for b in 0..h {
                    gw[a * h + b] += gv[a] * xv[b];
                }
            }
            let gx = matvec_t(&params[i].0, gv);
            grad_rows[r * h..(r + 1) * h].copy_from_slice(&gx);
        }
        grad_params.push((gw, gb));
        off += n;
    }
    let grad_x = moe.dispatch_backward(&k, &grad_rows, &d.handle)?;
    Ok(Reference {
        out,
        grad_x,
        grad_w,
        grad_params,
    })
}

/// `|a - b| <= tol · (1 + |b|)` everywhere, or a message naming the first difference.
pub fn close(what: &str, a: &[f32], b: &[f32], tol: f32) -> std::result::Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{what}: length {} vs {}", a.len(), b.len()));
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let ok = (x - y).abs() <= tol * (1.0 + y.abs());
        if !ok {
            return Err(format!("{what}[{i}]: {x} vs reference {y}"));
        }
    }
    Ok(())
}

/// Compare the distributed layer with the reference on this rank.
pub fn check<C: Communicator + ?Sized>(
    comm: &C,
    s: &Scenario,
    per_node: Option<usize>,
    wire: Wire,
) -> std::result::Result<(), String> {
    let got =
        distributed(comm, s, per_node, wire, false).map_err(|e| format!("{}: {e}", s.name))?;
    let want = reference(s, comm.world_size(), comm.rank(), false);
    let tol = if wire == Wire::Bf16 { 3e-2 } else { 1e-4 };
    let n = s.name;
    close(&format!("{n}: out"), &got.out, &want.out, tol)?;
    close(&format!("{n}: grad_x"), &got.grad_x, &want.grad_x, tol)?;
    close(
        &format!("{n}: grad_weights"),
        &got.grad_w,
        &want.grad_w,
        tol,
    )?;
    if got.grad_params.len() != want.grad_params.len() {
        return Err(format!("{n}: expert count differs"));
    }
    for (i, (g, w)) in got.grad_params.iter().zip(&want.grad_params).enumerate() {
        close(&format!("{n}: expert {i} grad_W"), &g.0, &w.0, tol)?;
        close(&format!("{n}: expert {i} grad_b"), &g.1, &w.1, tol)?;
    }
    Ok(())
}

/// Identity experts: combine(dispatch(x)) = x · Σ kept weights, bit for bit (dyadic weights and
/// small-integer rows make every product and sum exact).
pub fn identity<C: Communicator + ?Sized>(
    comm: &C,
    s: &Scenario,
    per_node: Option<usize>,
    wire: Wire,
) -> std::result::Result<(), String> {
    let (w, me) = (comm.world_size(), comm.rank());
    let inp = input(s, w, me, true);
    let k = CpuKernels;
    let mut moe = Moe::new(comm);
    moe.set_wire(wire);
    moe.set_hierarchical(per_node).map_err(|e| e.to_string())?;
    let d = moe
        .dispatch(&k, &inp.x, s.hidden, &inp.layout)
        .map_err(|e| format!("{}: {e}", s.name))?;
    let out = moe
        .combine(&k, &d.rows, &d.handle)
        .map_err(|e| format!("{}: {e}", s.name))?;
    let h = s.hidden;
    let t = inp.layout.tokens();
    let mut want = vec![0f32; t * h];
    for tok in 0..t {
        let sw: f32 = (0..s.top_k)
            .filter(|&j| inp.layout.slot_row(tok * s.top_k + j).is_some())
            .map(|j| inp.weights[tok * s.top_k + j])
            .sum();
        for i in 0..h {
            want[tok * h + i] = inp.x[tok * h + i] * sw;
        }
    }
    if out != want {
        return Err(format!(
            "{}: identity combine(dispatch(x)) != x * sum(weights) ({:?} per-node, {wire:?})",
            s.name, per_node
        ));
    }
    Ok(())
}

/// Everything, on one communicator (every rank calls it): each scenario, identity and linear, 1D
/// and (when the world has an even split) 2D, native and bf16 wire.
pub fn check_all<C: Communicator + ?Sized>(comm: &C) -> std::result::Result<(), String> {
    let w = comm.world_size();
    let modes: Vec<Option<usize>> = if w >= 4 && w % 2 == 0 {
        vec![None, Some(2), Some(w / 2)]
    } else {
        vec![None]
    };
    for s in scenarios(w) {
        for &m in &modes {
            identity(comm, &s, m, Wire::Native)?;
            identity(comm, &s, m, Wire::Bf16)?;
            check(comm, &s, m, Wire::Native)?;
        }
        check(comm, &s, None, Wire::Bf16)?;
    }
    Ok(())
}
