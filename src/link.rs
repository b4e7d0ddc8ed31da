//! The link model: what a slow network and slow ranks cost, without a slow network.
//!
//! Each directed link `src → dst` has a bandwidth (bytes/s) and a latency. A message of `b` bytes sent at
//! time `t` leaves when the sender's link to `dst` is free (`depart = max(t, free[dst])`), occupies it for
//! `b / bandwidth` (`free[dst] = depart + b / bandwidth`), and arrives `latency` later:
//! `arrive = free[dst] + latency`. The receiver's clock becomes `max(clock, arrive)` when it takes the
//! message. This is the classic α–β (latency–bandwidth) model with per-link serialisation: a ring
//! all-reduce of `S` bytes over `N` ranks then costs `2(N−1)(α + S/(N·β))`, as the textbooks say.
//!
//! Ranks also have a compute model: [`crate::LinkClock::compute`]`(d)` charges
//! `d × slowdown[rank] + delay[rank]`, so stragglers can be injected.
//!
//! Two clocks: [`TimeMode::Virtual`] advances per-rank virtual clocks only (fast, deterministic; read them
//! with [`crate::LinkClock::virtual_time`]); [`TimeMode::Real`] sleeps so wall-clock measurements see
//! the modelled network (use it to show overlap of real compute with modelled communication).
//!
//! A model is validated when a world is created ([`LinkModel::validate`]): a zero, negative or NaN
//! bandwidth or an infinite slowdown would make times infinite or NaN. Valid values can still make
//! times very large (a latency of years); conversions to [`Duration`] saturate instead of panicking,
//! and real-mode sleeps on the worker are bounded by the operation's deadline, so a modelled arrival
//! later than the timeout is a [`crate::Error::Timeout`], not a sleep past it.

use crate::{Error, Result};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How modelled time is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeMode {
    /// Per-rank virtual clocks; nothing sleeps.
    Virtual,
    /// Real sleeps until the modelled arrival time.
    Real,
}

/// One link's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Bytes per second.
    pub bandwidth: f64,
    /// One-way latency.
    pub latency: Duration,
}

impl Link {
    /// A link of `gbit` gigabits per second and `latency`.
    pub fn gbit(gbit: f64, latency: Duration) -> Link {
        Link {
            bandwidth: gbit * 1e9 / 8.0,
            latency,
        }
    }
}

/// The whole model: a default link, optional per-link overrides, per-rank compute slowdown and delay.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkModel {
    /// Virtual or real time.
    pub mode: TimeMode,
    /// The link between any two ranks unless overridden.
    pub default: Link,
    /// Overrides for `(src, dst)` pairs.
    pub overrides: Vec<((usize, usize), Link)>,
    /// Multiplier on charged compute per rank (missing ranks: 1.0).
    pub slowdown: Vec<f64>,
    /// Extra time added to every compute charge per rank (missing ranks: zero).
    pub delay: Vec<Duration>,
}

impl LinkModel {
    /// Uniform links, no stragglers.
    pub fn uniform(mode: TimeMode, link: Link) -> LinkModel {
        LinkModel {
            mode,
            default: link,
            overrides: Vec::new(),
            slowdown: Vec::new(),
            delay: Vec::new(),
        }
    }

    /// Builder: override one directed link.
    pub fn with_link(mut self, src: usize, dst: usize, link: Link) -> Self {
        self.overrides.push(((src, dst), link));
        self
    }

    /// Builder: make `rank` compute `factor` times slower.
    pub fn with_slowdown(mut self, rank: usize, factor: f64) -> Self {
        if self.slowdown.len() <= rank {
            self.slowdown.resize(rank + 1, 1.0);
        }
        self.slowdown[rank] = factor;
        self
    }

    /// Builder: add `d` to every compute charge of `rank`.
    pub fn with_delay(mut self, rank: usize, d: Duration) -> Self {
        if self.delay.len() <= rank {
            self.delay.resize(rank + 1, Duration::ZERO);
        }
        self.delay[rank] = d;
        self
    }

    /// The link from `src` to `dst`.
    pub fn link(&self, src: usize, dst: usize) -> Link {
        self.overrides
            .iter()
            .rev()
            .find(|(k, _)| *k == (src, dst))
            .map(|(_, l)| *l)
            .unwrap_or(self.default)
    }

    /// Compute time charged to `rank` for nominal `d`; saturates at [`Duration::MAX`] (a huge
    /// slowdown times a long compute does not fit a `Duration`; `Duration::mul_f64` would panic).
    pub fn compute_cost(&self, rank: usize, d: Duration) -> Duration {
        let s = self.slowdown.get(rank).copied().unwrap_or(1.0).max(0.0);
        secs(d.as_secs_f64() * s)
            .saturating_add(self.delay.get(rank).copied().unwrap_or(Duration::ZERO))
    }

    /// Check every value the model computes with: each bandwidth (default and overrides) must be
    /// positive (`f64::INFINITY` is allowed: no bandwidth cost), each slowdown finite and `>= 0`.
    /// Latencies and delays are `Duration`s and always valid. Called when a world is created, so a bad
    /// model is an [`Error::InvalidArgument`] naming the field rather than a panic on a worker.
    /// Overrides and per-rank entries for ranks outside a world are allowed (they never apply; one
    /// model serves a world and its smaller `split` groups).
    pub fn validate(&self) -> Result<()> {
        fn bandwidth(field: String, bw: f64) -> Result<()> {
            if bw > 0.0 {
                return Ok(()); // false for NaN, zero and negatives
            }
            Err(Error::InvalidArgument(format!(
                "link model: {field} = {bw} bytes/s; a bandwidth must be a positive number of \
                 bytes per second (Link::gbit(10.0, ..) is 1.25e9)"
            )))
        }
        bandwidth("default.bandwidth".into(), self.default.bandwidth)?;
        for (i, ((src, dst), l)) in self.overrides.iter().enumerate() {
            bandwidth(
                format!("overrides[{i}] (link {src} -> {dst}) bandwidth"),
                l.bandwidth,
            )?;
        }
        for (rank, &f) in self.slowdown.iter().enumerate() {
            if !(f.is_finite() && f >= 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "link model: slowdown[{rank}] = {f}; a compute slowdown must be a finite \
                     factor >= 0 (1.0 = nominal speed)"
                )));
            }
        }
        Ok(())
    }

    /// Model time (seconds) for `n` bytes over a link: `latency + n / bandwidth`.
    pub fn transfer_time(link: Link, n: usize) -> f64 {
        link.latency.as_secs_f64() + n as f64 / link.bandwidth
    }
}

/// One rank's clock under a link model, shared by its communicator and its engine worker: what
/// [`crate::LinkClock`] charges and reads ([`crate::Communicator::link_clock`] hands it out). Made by
/// the in-process backend for each rank of a world with a model.
#[derive(Debug, Clone)]
pub struct RankClock(pub(crate) Arc<Mutex<Clock>>);

impl RankClock {
    /// Charge nominal compute `d`: `d × slowdown + delay` of this rank, on the virtual clock or as a
    /// real sleep (see [`crate::LinkClock::compute`]).
    pub fn charge(&self, d: Duration) {
        charge(&self.0, d)
    }

    /// This rank's model time now, saturating to `Duration::MAX`.
    pub fn now(&self) -> Duration {
        secs(self.0.lock().unwrap_or_else(|e| e.into_inner()).now)
    }

    /// This rank's model time in seconds.
    pub(crate) fn seconds(&self) -> f64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).now
    }
}

/// A rank's clock and link occupancy under a model.
#[derive(Debug)]
pub(crate) struct Clock {
    pub model: LinkModel,
    pub rank: usize,
    /// Virtual time now (seconds), or for real mode, seconds since `epoch`.
    pub now: f64,
    pub link_free: Vec<f64>,
    pub epoch: std::time::Instant,
}

impl Clock {
    pub fn new(model: LinkModel, rank: usize, size: usize, epoch: std::time::Instant) -> Clock {
        Clock {
            model,
            rank,
            now: 0.0,
            link_free: vec![0.0; size],
            epoch,
        }
    }

    fn current(&mut self) -> f64 {
        if self.model.mode == TimeMode::Real {
            self.now = self.epoch.elapsed().as_secs_f64();
        }
        self.now
    }

    /// Stamp a message of `n` bytes to `dst`: returns its arrival time.
    pub fn send(&mut self, dst: usize, n: usize) -> f64 {
        if dst == self.rank {
            return self.current();
        }
        let link = self.model.link(self.rank, dst);
        let depart = self.current().max(self.link_free[dst]);
        self.link_free[dst] = depart + n as f64 / link.bandwidth;
        self.link_free[dst] + link.latency.as_secs_f64()
    }

    /// Take a message that arrives at `arrive`: virtual time advances to it; real time returns how
    /// long to sleep until it (the caller sleeps without holding the clock's lock).
    fn recv(&mut self, arrive: f64) -> Option<Duration> {
        match self.model.mode {
            TimeMode::Virtual => {
                self.now = self.now.max(arrive);
                None
            }
            TimeMode::Real => {
                let now = self.current();
                (arrive > now).then(|| secs(arrive - now))
            }
        }
    }
}

/// Take a message arriving at model time `arrive` on `clock`. In real time this sleeps until the
/// arrival, but never past `limit`: it returns false when the arrival lies beyond it (the caller
/// reports a timeout). The sleep is taken without the lock, so the rank's user thread can charge
/// compute meanwhile (overlap) and the worker never waits on a user-chosen compute sleep.
pub(crate) fn take(clock: &Mutex<Clock>, arrive: f64, limit: Instant) -> bool {
    let wait = clock.lock().unwrap_or_else(|e| e.into_inner()).recv(arrive);
    let Some(wait) = wait else { return true };
    let left = limit.saturating_duration_since(Instant::now());
    let in_time = wait <= left;
    std::thread::sleep(wait.min(left));
    clock.lock().unwrap_or_else(|e| e.into_inner()).current();
    in_time
}

/// Charge nominal compute `d` on `clock` (the user thread's [`crate::LinkClock::compute`]). In
/// real time this sleeps the charged time, without holding the lock (see [`take`]); that sleep is what
/// the caller asked for, not a wait on a peer, so it is not bounded by the timeout.
pub(crate) fn charge(clock: &Mutex<Clock>, d: Duration) {
    let sleep = {
        let mut c = clock.lock().unwrap_or_else(|e| e.into_inner());
        let cost = c.model.compute_cost(c.rank, d);
        match c.model.mode {
            TimeMode::Virtual => {
                c.now += cost.as_secs_f64();
                None
            }
            TimeMode::Real => Some(cost),
        }
    };
    if let Some(s) = sleep {
        std::thread::sleep(s);
        clock.lock().unwrap_or_else(|e| e.into_inner()).current();
    }
}

/// Seconds as a `Duration`, saturating: negative and NaN give zero, too large gives `Duration::MAX`
/// (`Duration::from_secs_f64` panics on all three).
pub(crate) fn secs(x: f64) -> Duration {
    if x > 0.0 {
        Duration::try_from_secs_f64(x).unwrap_or(Duration::MAX)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_beta_by_hand() {
        // 1 MB over 1 GB/s with 1 ms latency: 1 ms + 1 ms. Two back-to-back messages serialise.
        let link = Link {
            bandwidth: 1e9,
            latency: Duration::from_millis(1),
        };
        let mut c = Clock::new(
            LinkModel::uniform(TimeMode::Virtual, link),
            0,
            2,
            std::time::Instant::now(),
        );
        let a = c.send(1, 1_000_000);
        let b = c.send(1, 1_000_000);
        assert!((a - 0.002).abs() < 1e-12, "{a}");
        assert!((b - 0.003).abs() < 1e-12, "{b}");
        let c = Mutex::new(c);
        assert!(take(&c, 0.010, std::time::Instant::now()));
        assert_eq!(c.lock().unwrap().now, 0.010);
        let m = LinkModel::uniform(TimeMode::Virtual, link)
            .with_slowdown(1, 3.0)
            .with_delay(1, Duration::from_millis(5));
        assert_eq!(
            m.compute_cost(1, Duration::from_millis(10)),
            Duration::from_millis(35)
        );
        assert_eq!(
            m.compute_cost(0, Duration::from_millis(10)),
            Duration::from_millis(10)
        );
    }
}
