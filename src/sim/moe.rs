//! The MoE layer's cost model in the simulator: a cluster of NVLink nodes joined by NICs.
//!
//! Defaults: 4 nodes of 8 GPUs; NVLink 450 GB/s per GPU and direction with 3 µs per message; one
//! 400 Gbit/s NIC per GPU with 8 µs per message; 3 TB/s of memory bandwidth for the 2D route's
//! permutes; experts at 400 TFLOP/s peak whose efficiency falls for small batches. The costs are
//! deliberately *not* of the α + β·bytes form the planner fits ([`crate::moe::plan`]): the 1D
//! all-to-all is the slower of its NVLink and NIC parts, each with a per-peer cost, and the expert
//! time has a batch-size efficiency curve, so a fitted model is an approximation, as on a real
//! cluster.
//!
//! - 1D all-to-all of `B` bytes per rank (spread evenly): `max((G−1)·α_nv + B(G−1)/W / bw_nv,
//!   (W−G)·α_nic + B(W−G)/W / bw_nic)`.
//! - 2D: within the node `(G−1)·α_nv + B(G−1)/G / bw_nv`, a permute `2B / bw_mem`, across nodes
//!   `(N−1)·α_nic + B(N−1)/N / bw_nic` (one message per node, `G` times larger).
//! - experts: `rows · flops_per_row / (peak · rows / (rows + half_rows))` plus a launch cost.
//! - dense all-reduce of `B` bytes (hierarchical ring): `2(N−1)·α_nic + 2B(N−1)/N / bw_nic`.

/// A cluster for the MoE cost model; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MoeCluster {
    /// GPUs per node `G`.
    pub gpus_per_node: usize,
    /// Nodes `N`.
    pub nodes: usize,
    /// NVLink bytes/s per GPU and direction.
    pub nvlink_bw: f64,
    /// Seconds per NVLink message.
    pub nvlink_alpha: f64,
    /// NIC bytes/s per GPU.
    pub nic_bw: f64,
    /// Seconds per NIC message.
    pub nic_alpha: f64,
    /// Memory bytes/s (permutes of the 2D route).
    pub mem_bw: f64,
    /// Peak expert FLOP/s.
    pub flops: f64,
    /// Rows at which expert efficiency is half the peak.
    pub half_rows: f64,
    /// Seconds per expert launch.
    pub launch: f64,
}

impl Default for MoeCluster {
    fn default() -> Self {
        MoeCluster {
            gpus_per_node: 8,
            nodes: 4,
            nvlink_bw: 450e9,
            nvlink_alpha: 3e-6,
            nic_bw: 400e9 / 8.0,
            nic_alpha: 8e-6,
            mem_bw: 3e12,
            flops: 400e12,
            half_rows: 256.0,
            launch: 10e-6,
        }
    }
}

impl MoeCluster {
    /// Ranks `W = G · N`.
    pub fn world(&self) -> usize {
        self.gpus_per_node * self.nodes
    }

    /// One all-to-all of `bytes` per rank, 1D or 2D.
    pub fn all_to_all(&self, bytes: f64, hierarchical: bool) -> f64 {
        let (g, n) = (self.gpus_per_node as f64, self.nodes as f64);
        let w = g * n;
        if bytes <= 0.0 {
            return 0.0;
        }
        if !hierarchical {
            let intra = (g - 1.0) * self.nvlink_alpha + bytes * (g - 1.0) / w / self.nvlink_bw;
            let inter = (w - g) * self.nic_alpha + bytes * (w - g) / w / self.nic_bw;
            intra.max(inter)
        } else {
            let intra = (g - 1.0) * self.nvlink_alpha + bytes * (g - 1.0) / g / self.nvlink_bw;
            let permute = 2.0 * bytes / self.mem_bw;
            let inter = (n - 1.0) * self.nic_alpha + bytes * (n - 1.0) / n / self.nic_bw;
            intra + permute + inter
        }
    }

    /// The experts of one rank on `rows` rows of `flops_per_row`.
    pub fn expert(&self, rows: f64, flops_per_row: f64) -> f64 {
        if rows <= 0.0 {
            return 0.0;
        }
        let eff = rows / (rows + self.half_rows);
        self.launch + rows * flops_per_row / (self.flops * eff)
    }

    /// A dense all-reduce of `bytes`.
    pub fn all_reduce(&self, bytes: f64) -> f64 {
        if bytes <= 0.0 {
            return 0.0;
        }
        let n = self.nodes as f64;
        let g = self.gpus_per_node as f64;
        // intra-node reduce-scatter/all-gather over NVLink, inter-node ring over the NICs
        2.0 * (n - 1.0) * self.nic_alpha
            + 2.0 * bytes * (n - 1.0) / n / g / self.nic_bw
            + 2.0 * (g - 1.0) * self.nvlink_alpha
            + 2.0 * bytes * (g - 1.0) / g / self.nvlink_bw
    }
}
