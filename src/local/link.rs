//! The link model: what a slow network and slow ranks cost, without a slow network.
//!
//! Each directed link `src → dst` has a bandwidth (bytes/s) and a latency. A message of `b` bytes sent at
//! time `t` leaves when the sender's link to `dst` is free (`depart = max(t, free[dst])`), occupies it for
//! `b / bandwidth` (`free[dst] = depart + b / bandwidth`), and arrives `latency` later:
//! `arrive = free[dst] + latency`. The receiver's clock becomes `max(clock, arrive)` when it takes the
//! message. This is the classic α–β (latency–bandwidth) model with per-link serialisation: a ring
//! all-reduce of `S` bytes over `N` ranks then costs `2(N−1)(α + S/(N·β))`, as the textbooks say.
//!
//! Ranks also have a compute model: [`crate::Communicator::compute`]`(d)` charges
//! `d × slowdown[rank] + delay[rank]`, so stragglers can be injected.
//!
//! Two clocks: [`TimeMode::Virtual`] advances per-rank virtual clocks only (fast, deterministic; read them
//! with [`crate::Communicator::virtual_time`]); [`TimeMode::Real`] sleeps so wall-clock measurements see
//! the modelled network (use it to show overlap of real compute with modelled communication).

use std::time::Duration;

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

    /// Compute time charged to `rank` for nominal `d`.
    pub fn compute_cost(&self, rank: usize, d: Duration) -> Duration {
        let s = self.slowdown.get(rank).copied().unwrap_or(1.0).max(0.0);
        d.mul_f64(s) + self.delay.get(rank).copied().unwrap_or(Duration::ZERO)
    }

    /// Model time (seconds) for `n` bytes over a link: `latency + n / bandwidth`.
    pub fn transfer_time(link: Link, n: usize) -> f64 {
        link.latency.as_secs_f64() + n as f64 / link.bandwidth
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

    /// Take a message that arrives at `arrive`.
    pub fn recv(&mut self, arrive: f64) {
        match self.model.mode {
            TimeMode::Virtual => self.now = self.now.max(arrive),
            TimeMode::Real => {
                let now = self.current();
                if arrive > now {
                    std::thread::sleep(Duration::from_secs_f64(arrive - now));
                }
                self.current();
            }
        }
    }

    /// Charge nominal compute `d`.
    pub fn compute(&mut self, d: Duration) {
        let c = self.model.compute_cost(self.rank, d);
        match self.model.mode {
            TimeMode::Virtual => self.now += c.as_secs_f64(),
            TimeMode::Real => {
                std::thread::sleep(c);
                self.current();
            }
        }
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
        c.recv(0.010);
        assert_eq!(c.now, 0.010);
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
