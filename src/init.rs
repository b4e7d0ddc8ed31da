//! `ferroccl::init()`: one binary, any launcher.
//!
//! Order of choice (the first that applies):
//! 1. `FERROCCL_BACKEND` = `local` | `tcp` | `mpi` | `nccl`;
//! 2. feature `cuda`, launched by mpirun or torchrun-style, GPUs present and at most one rank per GPU
//!    on this node (`LOCAL_WORLD_SIZE` / `OMPI_COMM_WORLD_LOCAL_SIZE` ≤ device count) → NCCL;
//! 3. launched by `mpirun`/`srun` (feature `mpi`) → MPI;
//! 4. `RANK` and `WORLD_SIZE` set (torchrun-style), or without the `mpi` feature mpirun's own
//!    variables (`OMPI_COMM_WORLD_*`, `PMI_*`) → the env rendezvous, then the TCP transport;
//! 5. otherwise in-process with world size 1.
//!
//! For several in-process ranks use [`crate::local::run`], which hands each thread its communicator.

use crate::rendezvous::EnvRendezvous;
use crate::{Communicator, Config, Error, Result};
use std::sync::Arc;

/// The backends `init` can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In-process (world size 1 through `init`; use `local::run` for more threads).
    Local,
    /// Torchrun-style env rendezvous + TCP transport.
    Tcp,
    /// MPI (feature `mpi`).
    Mpi,
    /// NCCL on device buffers (feature `cuda`).
    Nccl,
}

impl Backend {
    /// Parse `FERROCCL_BACKEND`.
    pub fn parse(s: &str) -> Result<Backend> {
        match s.trim().to_ascii_lowercase().as_str() {
            "local" | "inprocess" | "in-process" => Ok(Backend::Local),
            "tcp" | "env" => Ok(Backend::Tcp),
            "mpi" => Ok(Backend::Mpi),
            "nccl" => Ok(Backend::Nccl),
            other => Err(Error::Config {
                var: "FERROCCL_BACKEND".into(),
                value: other.into(),
                why: "expected local, tcp, mpi or nccl".into(),
            }),
        }
    }

    /// What the environment asks for (see the module docs), before anything is started.
    pub fn detect() -> Result<Backend> {
        #[cfg(feature = "cuda")]
        let gpus = crate::device::device_count();
        #[cfg(not(feature = "cuda"))]
        let gpus = 0;
        Self::detect_from(|k| std::env::var(k).ok(), gpus)
    }

    /// [`Backend::detect`] over variables read through `get`, with `gpus` CUDA devices visible
    /// (only the `cuda` feature looks at them): the same rules, testable without touching the
    /// process environment.
    pub fn detect_from(get: impl Fn(&str) -> Option<String>, gpus: usize) -> Result<Backend> {
        if let Some(v) = get("FERROCCL_BACKEND") {
            return Backend::parse(&v);
        }
        #[cfg(feature = "mpi")]
        let mpirun = crate::mpi::LAUNCHER_VARS.iter().any(|v| get(v).is_some());
        #[cfg(not(feature = "mpi"))]
        let mpirun = false;
        // torchrun-style variables, or (without the `mpi` feature) Open MPI's / PMI's own, which
        // the env rendezvous reads in their place
        let env_launch = EnvRendezvous::from_lookup(&get)?.is_some();
        #[cfg(feature = "cuda")]
        {
            if mpirun || env_launch {
                let local: usize = [
                    "LOCAL_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_SIZE",
                    "MPI_LOCALNRANKS",
                    "SLURM_NTASKS_PER_NODE",
                ]
                .iter()
                .find_map(|v| get(v)?.parse().ok())
                .unwrap_or(1);
                if gpus > 0 && local <= gpus {
                    return Ok(Backend::Nccl);
                }
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = gpus;
        if mpirun {
            return Ok(Backend::Mpi);
        }
        if env_launch {
            return Ok(Backend::Tcp);
        }
        Ok(Backend::Local)
    }
}

/// Pick the backend from the environment and start it.
pub fn init() -> Result<Box<dyn Communicator>> {
    init_with(Backend::detect()?)
}

/// Start a given backend with settings from the environment.
pub fn init_with(b: Backend) -> Result<Box<dyn Communicator>> {
    let cfg = Config::from_env()?;
    tracing::info!(backend = ?b, "ferroccl init");
    match b {
        Backend::Local => {
            let mut w = crate::local::world(
                1,
                &crate::local::Options {
                    config: Some(cfg),
                    ..Default::default()
                },
            )?;
            let c = w
                .pop()
                .ok_or_else(|| Error::InvalidArgument("internal: empty world".into()))?;
            Ok(Box::new(c))
        }
        Backend::Tcp => {
            let env = EnvRendezvous::from_env()?.ok_or_else(|| Error::Config {
                var: "RANK/WORLD_SIZE".into(),
                value: String::new(),
                why: "the tcp backend needs torchrun-style RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT".into(),
            })?;
            let (server, store) = env.connect(cfg.timeout)?;
            let master = env.store_addr();
            let c = crate::tcp::TcpComm::connect(
                Arc::new(store),
                Arc::new(server),
                &master,
                "tcp/world",
                env.rank,
                env.world_size,
                &env.token,
                cfg,
            )?;
            Ok(Box::new(c))
        }
        Backend::Nccl => {
            #[cfg(feature = "cuda")]
            {
                #[cfg(feature = "mpi")]
                if crate::mpi::launched_by_mpirun() {
                    return Ok(Box::new(crate::nccl::NcclComm::from_mpi(cfg)?));
                }
                if EnvRendezvous::from_env()?.is_some() {
                    Ok(Box::new(crate::nccl::NcclComm::from_env(cfg)?))
                } else {
                    Ok(Box::new(crate::nccl::NcclComm::single(0, cfg)?))
                }
            }
            #[cfg(not(feature = "cuda"))]
            {
                Err(Error::Unsupported(
                    "FERROCCL_BACKEND=nccl but ferroccl was built without the `cuda` feature; rebuild with --features cuda".into(),
                ))
            }
        }
        Backend::Mpi => {
            #[cfg(feature = "mpi")]
            {
                Ok(Box::new(crate::mpi::MpiComm::world(cfg)?))
            }
            #[cfg(not(feature = "mpi"))]
            {
                Err(Error::Unsupported(
                    "FERROCCL_BACKEND=mpi but ferroccl was built without the `mpi` feature; rebuild with --features mpi".into(),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect(vars: &[(&str, &str)], gpus: usize) -> Result<Backend> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Backend::detect_from(|k| m.get(k).cloned(), gpus)
    }

    #[test]
    fn the_environment_picks_the_backend_in_the_documented_order() {
        let torchrun = [
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let mpirun = [
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
        ];
        // nothing set: one in-process rank
        assert_eq!(detect(&[], 0).unwrap(), Backend::Local);
        // an explicit choice wins over any launcher, and a bad one is a named error
        let forced: Vec<_> = torchrun
            .iter()
            .copied()
            .chain([("FERROCCL_BACKEND", " Local ")])
            .collect();
        assert_eq!(detect(&forced, 8).unwrap(), Backend::Local);
        let e = detect(&[("FERROCCL_BACKEND", "gloo")], 0).unwrap_err();
        assert!(e.to_string().contains("FERROCCL_BACKEND"), "{e}");
        // torchrun-style without GPUs: the env rendezvous and TCP
        assert_eq!(detect(&torchrun, 0).unwrap(), Backend::Tcp);
        // mpirun: MPI with the feature, else the env rendezvous reads mpirun's variables
        let want = if cfg!(feature = "mpi") {
            Backend::Mpi
        } else {
            Backend::Tcp
        };
        assert_eq!(detect(&mpirun, 0).unwrap(), want);
        // GPUs and at most one rank per GPU: NCCL (feature cuda); more ranks than GPUs: not NCCL
        let gpu = if cfg!(feature = "cuda") {
            Backend::Nccl
        } else {
            Backend::Tcp
        };
        assert_eq!(detect(&torchrun, 4).unwrap(), gpu);
        let crowded: Vec<_> = torchrun
            .iter()
            .copied()
            .chain([("LOCAL_WORLD_SIZE", "8")])
            .collect();
        assert_eq!(detect(&crowded, 4).unwrap(), Backend::Tcp);
        // a malformed launcher variable is an error, not a silent fallback to world size 1
        assert!(detect(&[("RANK", "x"), ("WORLD_SIZE", "4")], 0).is_err());
    }
}
