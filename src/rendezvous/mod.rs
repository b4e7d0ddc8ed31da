//! Rendezvous: how the processes of one job find each other.
//!
//! Before any collective can run, the ranks of a job launched torchrun-style (one process per GPU,
//! configured through `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) have to agree
//! on a few small values: the NCCL unique id that rank 0 generates, the listening address of each rank's
//! TCP transport, and "everybody is here" barriers. This module provides a small TCP key/value store
//! for that, in the spirit of PyTorch's `TCPStore`:
//!
//! 1. Rank 0 hosts a [`StoreServer`] (background threads; dropping it stops it).
//! 2. Every rank, rank 0 included, opens a [`StoreClient`] to `MASTER_ADDR:MASTER_PORT`.
//!    [`StoreClient::connect`] retries until the server is up, so start order does not matter.
//! 3. Ranks exchange values with [`set`](StoreClient::set) / [`get`](StoreClient::get) (`get` blocks
//!    until the key exists), count with [`add`](StoreClient::add), and meet at
//!    [`barrier`](StoreClient::barrier)s.
//!
//! [`EnvRendezvous`] does steps 1 and 2 from the torchrun environment variables:
//!
//! ```no_run
//! use std::time::Duration;
//! use ferroccl::rendezvous::EnvRendezvous;
//!
//! # fn main() -> ferroccl::Result<()> {
//! let Some(env) = EnvRendezvous::from_env()? else {
//!     return Ok(()); // not launched torchrun-style (RANK / WORLD_SIZE unset): run single-process
//! };
//! // Keep `_server` alive for as long as other ranks may still talk to the store.
//! let (_server, store) = env.connect(Duration::from_secs(300))?;
//! if env.rank == 0 {
//!     store.set("nccl/unique_id", b"...128 bytes...")?;
//! }
//! let id = store.get("nccl/unique_id", Duration::from_secs(60))?;
//! store.barrier("init", env.world_size, Duration::from_secs(60))?;
//! # let _ = id;
//! # Ok(())
//! # }
//! ```
//!
//! # Protocol
//!
//! One TCP connection per client; every message is a length-prefixed binary frame
//! `[magic 0xFC][version 1][opcode u8][payload length u32 BE][payload]` with payloads of at most
//! 64 MiB (see the [`frame`] module for the opcode table). Each request gets exactly one reply.
//!
//! * The first frame of a connection must be `AUTH` carrying the shared token (`FERROCCL_TOKEN`, at
//!   most 4 KiB), which the server compares in constant time. A wrong token is answered with
//!   `AUTH_FAILED` ([`Error::BadToken`] on the client) and the connection is closed. The
//!   empty token means "no secret"; it only keeps mismatched jobs apart, it does not keep anyone out,
//!   so without a token [`EnvRendezvous`] binds the store (and the TCP transport its port) to
//!   loopback only unless `FERROCCL_STORE_BIND` (`FERROCCL_TCP_BIND`) names an address, and warns.
//! * A connection that sends nothing within 3 s, sends a frame before `AUTH` or an `AUTH` longer than
//!   a token (refused on the header, before anything is allocated), an unknown opcode, an oversize
//!   length, a truncated frame, a key that is not UTF-8 or plain garbage is answered with an `ERROR`
//!   frame where possible and closed, with a `tracing::warn!`; every other connection keeps being
//!   served (one thread per connection).
//! * [`StoreLimits`] bound what clients can take: authenticated connections (1024; one more is sent
//!   an `ERROR` frame after its AUTH and closed, and a [`StoreClient`] retries under its timeout),
//!   unauthenticated ones separately (256, read by the accept thread without blocking; past it the
//!   oldest is closed, so silent sockets cannot lock the ranks out), the memory of partly received
//!   frames over 64 KiB (128 MiB over all connections, reserved on the header; a frame that does
//!   not fit is discarded with an `ERROR` reply), stored keys and bytes (a `SET`/`ADD` over the limit gets an `ERROR`
//!   reply, [`Error::Rendezvous`] on the client, and the connection stays usable), and the longest
//!   wait of one `GET`.
//! * `GET` waits on the server (a condition variable woken by every `SET`/`ADD`; the map lock is not
//!   held while waiting) and replies `TIMEOUT` when its wait, or the server's limit, runs out; a
//!   waiting `GET` whose client disconnects ends within 50 ms.
//! * On the client, every socket read and write has a timeout (the client's timeout beyond the wait
//!   a request asked for); a store that goes away gives [`Error::Rendezvous`] or [`Error::Io`] saying
//!   the store at ADDR closed, one that stops answering gives [`Error::Timeout`], and a garbled reply
//!   gives [`Error::BadFrame`].
//!
//! The store is meant for a handful of small values per rank, not for data: there is no persistence,
//! no replication, and everything lives in rank 0's memory.

pub mod frame;
mod store;

pub use store::{
    StoreClient, StoreLimits, StoreServer, DEFAULT_AUTH_TIMEOUT, DEFAULT_MAX_BYTES,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_MAX_KEYS,
    DEFAULT_MAX_UNAUTHENTICATED,
};

use std::time::Duration;

use crate::{Error, Result};

/// Default `MASTER_PORT`, the same as torchrun's.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// The torchrun-style launch environment of this process: who it is and where the store lives.
///
/// | variable              | field         | default                       |
/// |-----------------------|---------------|-------------------------------|
/// | `RANK`                | `rank`        | required (or mpirun's, below) |
/// | `WORLD_SIZE`          | `world_size`  | required (or mpirun's, below) |
/// | `LOCAL_RANK`          | `local_rank`  | `0`                           |
///
/// Without `RANK`/`WORLD_SIZE`, Open MPI's `OMPI_COMM_WORLD_RANK`/`_SIZE`/`_LOCAL_RANK` (or
/// `PMI_RANK`/`PMI_SIZE`/`MPI_LOCALRANKID`) stand in for them (see [`EnvRendezvous::from_env`]).
///
/// | variable              | field         | default                       |
/// |-----------------------|---------------|-------------------------------|
/// | `MASTER_ADDR`         | `master_addr` | `127.0.0.1`                   |
/// | `MASTER_PORT`         | `master_port` | `29500`                       |
/// | `FERROCCL_TOKEN`      | `token`       | empty (no secret)             |
/// | `FERROCCL_STORE_BIND` | `bind`        | `0.0.0.0:<MASTER_PORT>`; without a token `127.0.0.1:<MASTER_PORT>` |
///
/// Without `FERROCCL_TOKEN` the store (and the TCP transport) listen on loopback only, unless
/// `FERROCCL_STORE_BIND` (`FERROCCL_TCP_BIND`) names an address; a `MASTER_ADDR` that is not a
/// loopback address then needs a token or an explicit bind, else [`EnvRendezvous::from_env`] is an
/// [`Error::Config`] naming `FERROCCL_TOKEN` and both fixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvRendezvous {
    /// This process's rank, `0..world_size` (`RANK`).
    pub rank: usize,
    /// Number of processes in the job (`WORLD_SIZE`).
    pub world_size: usize,
    /// Rank within this node, typically the GPU index to use (`LOCAL_RANK`, default 0).
    pub local_rank: usize,
    /// Host of rank 0, where the store runs (`MASTER_ADDR`, default `127.0.0.1`).
    pub master_addr: String,
    /// Port of the store (`MASTER_PORT`, default 29500).
    pub master_port: u16,
    /// Shared secret presented to the store (`FERROCCL_TOKEN`). The default, the empty string, means
    /// "no secret": any process that can reach the port can join, which is why the default bind is
    /// then loopback only; set a token for multi-node jobs.
    pub token: String,
    /// Address rank 0's store binds (`FERROCCL_STORE_BIND`, default `0.0.0.0:<MASTER_PORT>` with a
    /// token, loopback without one).
    pub bind: String,
}

fn config(var: &str, value: &str, why: impl Into<String>) -> Error {
    Error::Config {
        var: var.to_string(),
        value: value.to_string(),
        why: why.into(),
    }
}

fn parse_num<T: std::str::FromStr>(var: &str, raw: &str, what: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    raw.trim()
        .parse::<T>()
        .map_err(|e| config(var, raw, format!("expected {what} ({e})")))
}

impl EnvRendezvous {
    /// Read the launch environment from the process environment variables.
    ///
    /// Returns `Ok(None)` when `RANK` or `WORLD_SIZE` is unset and no MPI launcher's variables stand in
    /// for them (the process was not launched as part of a multi-process job), and [`Error::Config`]
    /// naming the variable when a value cannot be used.
    ///
    /// Under `mpirun` without torchrun's variables, Open MPI's `OMPI_COMM_WORLD_RANK`,
    /// `OMPI_COMM_WORLD_SIZE` and `OMPI_COMM_WORLD_LOCAL_RANK` (or PMI's `PMI_RANK`, `PMI_SIZE` and
    /// `MPI_LOCALRANKID`) are used instead, with `MASTER_ADDR` and `MASTER_PORT` defaulting as below:
    /// enough for a single-node job, whose rank 0 then hosts the store on 127.0.0.1.
    pub fn from_env() -> Result<Option<EnvRendezvous>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`EnvRendezvous::from_env`], but reading variables through `f` (for tests and for
    /// launchers that keep their configuration somewhere other than the environment).
    pub fn from_lookup(f: impl Fn(&str) -> Option<String>) -> Result<Option<EnvRendezvous>> {
        // torchrun-style variables first; else what mpirun (Open MPI, or a PMI launcher such as
        // MPICH's hydra) sets for every process, so that a binary built without the `mpi` feature
        // still runs under `mpirun` on one node (the NCCL unique id then travels through the store).
        let (rank_var, world_var, local_vars): (&str, &str, &[&str]) =
            match (f("RANK"), f("WORLD_SIZE")) {
                (Some(_), Some(_)) => ("RANK", "WORLD_SIZE", &["LOCAL_RANK"]),
                _ if f("OMPI_COMM_WORLD_RANK").is_some() && f("OMPI_COMM_WORLD_SIZE").is_some() => {
                    (
                        "OMPI_COMM_WORLD_RANK",
                        "OMPI_COMM_WORLD_SIZE",
                        &["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"],
                    )
                }
                _ if f("PMI_RANK").is_some() && f("PMI_SIZE").is_some() => (
                    "PMI_RANK",
                    "PMI_SIZE",
                    &["LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"],
                ),
                _ => return Ok(None),
            };
        let (Some(rank_raw), Some(world_raw)) = (f(rank_var), f(world_var)) else {
            return Ok(None);
        };
        let rank: usize = parse_num(rank_var, &rank_raw, "a non-negative integer")?;
        let world_size: usize = parse_num(world_var, &world_raw, "a positive integer")?;
        if world_size == 0 {
            return Err(config(world_var, &world_raw, "must be at least 1"));
        }
        if rank >= world_size {
            return Err(config(
                rank_var,
                &rank_raw,
                format!("must be below {world_var}={world_size} (ranks are 0..{world_size})"),
            ));
        }
        let mut local_rank = 0;
        for var in local_vars {
            if let Some(raw) = f(var) {
                local_rank = parse_num(var, &raw, "a non-negative integer")?;
                break;
            }
        }
        let master_addr = match f("MASTER_ADDR") {
            Some(raw) if raw.trim().is_empty() => {
                return Err(config(
                    "MASTER_ADDR",
                    &raw,
                    "expected a host name or IP address",
                ))
            }
            Some(raw) => raw.trim().to_string(),
            None => "127.0.0.1".to_string(),
        };
        let master_port: u16 = match f("MASTER_PORT") {
            Some(raw) => parse_num("MASTER_PORT", &raw, "a TCP port number 1..=65535")?,
            None => DEFAULT_MASTER_PORT,
        };
        if master_port == 0 && rank != 0 {
            return Err(config(
                "MASTER_PORT",
                "0",
                "port 0 (an ephemeral port) can only be used by rank 0; other ranks need the real port",
            ));
        }
        let token = f("FERROCCL_TOKEN").unwrap_or_default();
        let bind = match f("FERROCCL_STORE_BIND") {
            Some(raw) if raw.trim().is_empty() => {
                return Err(config(
                    "FERROCCL_STORE_BIND",
                    &raw,
                    "expected host:port, e.g. 0.0.0.0:29500",
                ))
            }
            Some(raw) => raw.trim().to_string(),
            // The safe default (issue 19): without a secret, listen on loopback only, so nobody
            // off this machine can join the job or flood the store.
            None if token.is_empty() => {
                if !is_loopback_host(&master_addr) {
                    return Err(config(
                        "FERROCCL_TOKEN",
                        "",
                        format!(
                            "unset while MASTER_ADDR={master_addr} is not a loopback address: without a token, anyone who can reach the store's and transport's ports could join the job, so ferroccl only listens on loopback then; set FERROCCL_TOKEN to the same secret on every rank (e.g. export FERROCCL_TOKEN=$(openssl rand -hex 16) in the launch script), or set FERROCCL_STORE_BIND=0.0.0.0:{master_port} to run without one on a network you trust"
                        ),
                    ));
                }
                join_host_port(loopback_of(&master_addr), master_port)
            }
            None => format!("0.0.0.0:{master_port}"),
        };
        Ok(Some(EnvRendezvous {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            token,
            bind,
        }))
    }

    /// `host:port` of the store as the clients see it.
    pub fn store_addr(&self) -> String {
        join_host_port(&self.master_addr, self.master_port)
    }

    /// Start the store on rank 0 and connect this rank's client to it.
    ///
    /// Rank 0 binds a [`StoreServer`] on `bind` and returns it as `Some(server)`: keep it alive until
    /// every rank is done with the store (dropping it closes every client's connection). Every rank then
    /// connects a [`StoreClient`] to `master_addr:master_port`, retrying for up to `timeout`.
    ///
    /// Pass `Config::timeout` (`FERROCCL_TIMEOUT`): it also bounds every store reply to the client
    /// (beyond the wait a request asks for) and, on rank 0, the longest wait of one `GET` on the
    /// server ([`StoreLimits::max_wait`]).
    ///
    /// If `bind` asks for port 0, rank 0's server gets an ephemeral port and rank 0's own client
    /// connects to `master_addr:<the port actually bound>`; read it from
    /// [`StoreServer::local_addr`] and hand it to the other ranks as their `MASTER_PORT` (this is how
    /// single-machine tests avoid fixed ports).
    pub fn connect(&self, timeout: Duration) -> Result<(Option<StoreServer>, StoreClient)> {
        if self.token.is_empty() {
            tracing::warn!(
                rank = self.rank,
                bind = %self.bind,
                "ferroccl: FERROCCL_TOKEN is not set, so the store and the TCP transport accept anyone who can reach their ports; by default they listen on loopback only (set FERROCCL_TOKEN on every rank for a multi-node job)"
            );
        }
        if self.rank == 0 {
            // every rank keeps its client for the communicator's lifetime (splits open more):
            // room for the whole job whatever its size, plus strangers and retries
            let limits = StoreLimits {
                max_wait: timeout,
                max_connections: store::DEFAULT_MAX_CONNECTIONS
                    .max(self.world_size.saturating_mul(2).saturating_add(64)),
                ..StoreLimits::default()
            };
            let server = StoreServer::bind_with_limits(&self.bind, &self.token, limits)?;
            let port = match bind_port(&self.bind) {
                Some(0) | None => server.local_addr().port(),
                Some(_) => self.master_port,
            };
            let addr = join_host_port(&self.master_addr, port);
            let client = StoreClient::connect(&addr, &self.token, timeout)?;
            Ok((Some(server), client))
        } else {
            let client = StoreClient::connect(&self.store_addr(), &self.token, timeout)?;
            Ok((None, client))
        }
    }
}

/// Whether `host` names this machine's loopback interface (`localhost`, 127.0.0.0/8, `::1`).
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The loopback address of the same family as `host` (a loopback host, see [`is_loopback_host`]).
fn loopback_of(host: &str) -> &'static str {
    if host.contains(':') {
        "::1"
    } else {
        "127.0.0.1"
    }
}

/// The port of a `host:port` bind address, if it parses.
fn bind_port(bind: &str) -> Option<u16> {
    bind.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// `host:port`, bracketing bare IPv6 addresses.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn mpirun_variables_stand_in_for_torchrun_ones() {
        // Open MPI under mpirun, nothing torchrun-style: defaults for the store.
        let ompi = [
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ];
        let e = EnvRendezvous::from_lookup(lookup(&ompi)).unwrap().unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 4, 1));
        assert_eq!(e.store_addr(), format!("127.0.0.1:{DEFAULT_MASTER_PORT}"));
        // no token: loopback only
        assert_eq!(e.bind, format!("127.0.0.1:{DEFAULT_MASTER_PORT}"));
        // MASTER_* still apply; an explicit LOCAL_RANK wins over Open MPI's.
        let mut v = ompi.to_vec();
        v.extend([
            ("FERROCCL_TOKEN", "t"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "31000"),
            ("LOCAL_RANK", "2"),
        ]);
        let e = EnvRendezvous::from_lookup(lookup(&v)).unwrap().unwrap();
        assert_eq!((e.rank, e.local_rank), (3, 2));
        assert_eq!(e.store_addr(), "10.0.0.7:31000");
        // torchrun's variables win when both are set.
        let mut v = ompi.to_vec();
        v.extend([("RANK", "0"), ("WORLD_SIZE", "2")]);
        let e = EnvRendezvous::from_lookup(lookup(&v)).unwrap().unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (0, 2, 0));
        // PMI (MPICH's hydra and others).
        let pmi = [
            ("PMI_RANK", "1"),
            ("PMI_SIZE", "2"),
            ("MPI_LOCALRANKID", "1"),
        ];
        let e = EnvRendezvous::from_lookup(lookup(&pmi)).unwrap().unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (1, 2, 1));
        // Half a set is no launch; bad values name Open MPI's variable.
        assert_eq!(
            EnvRendezvous::from_lookup(lookup(&[("OMPI_COMM_WORLD_RANK", "0")])).unwrap(),
            None
        );
        let bad = [("OMPI_COMM_WORLD_RANK", "4"), ("OMPI_COMM_WORLD_SIZE", "4")];
        match EnvRendezvous::from_lookup(lookup(&bad)) {
            Err(Error::Config { var, .. }) => assert_eq!(var, "OMPI_COMM_WORLD_RANK"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }
}
