//! Run-time settings read from the environment.

use crate::{Error, Result};
use std::time::Duration;

/// Default bound on every blocking call: 300 s, as torch.distributed's default process-group timeout
/// is in the same range and a hung job is far costlier than a slow one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest timeout accepted (about three years): deadlines are `now + timeout`, and an `Instant` that
/// far out still fits; [`Config::with_timeout`] clamps to it, `FERROCCL_TIMEOUT` refuses more.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(100_000_000);

/// `now + d`, saturating: a timeout too large for an `Instant` (a `Duration::MAX` set on
/// [`Config::timeout`] by hand) waits [`MAX_TIMEOUT`] instead of panicking.
pub fn deadline_after(d: Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_add(d.min(MAX_TIMEOUT)).unwrap_or(now)
}

/// `start + d`, saturating like [`deadline_after`] (for deadlines counted from an earlier instant).
pub fn deadline_from(start: std::time::Instant, d: Duration) -> std::time::Instant {
    start
        .checked_add(d.min(MAX_TIMEOUT))
        .unwrap_or_else(|| deadline_after(d))
}

/// Settings shared by every backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Bound on every blocking call (`FERROCCL_TIMEOUT`, seconds, fractional allowed).
    pub timeout: Duration,
    /// Checked mode (`FERROCCL_CHECK=1`): ranks compare each collective's signature before running it.
    pub check: bool,
    /// Stream-ordered completion on device buffers (`FERROCCL_STREAM_ORDERED=1`, NCCL backend): a
    /// blocking call returns once the operation is enqueued on its buffers' CUDA stream, as with
    /// NCCL and `torch.distributed`, so the host can run ahead; later work on that stream sees the
    /// result, [`Communicator::synchronize`](crate::Communicator::synchronize) waits for it (with
    /// the timeout), and an asynchronous NCCL error surfaces at the next call. Off by default: then
    /// every blocking call has returned only after the GPU finished it, under the timeout.
    pub stream_ordered: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: DEFAULT_TIMEOUT,
            check: false,
            stream_ordered: false,
        }
    }
}

impl Config {
    /// Read `FERROCCL_TIMEOUT`, `FERROCCL_CHECK` and `FERROCCL_STREAM_ORDERED`.
    pub fn from_env() -> Result<Config> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Same as [`Config::from_env`] with a custom lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut c = Config::default();
        if let Some(v) = get("FERROCCL_TIMEOUT") {
            let secs: f64 = v.trim().parse().map_err(|_| Error::Config {
                var: "FERROCCL_TIMEOUT".into(),
                value: v.clone(),
                why: "expected a number of seconds, e.g. 300 or 0.5".into(),
            })?;
            if !(secs.is_finite() && secs > 0.0 && secs <= MAX_TIMEOUT.as_secs_f64()) {
                return Err(Error::Config {
                    var: "FERROCCL_TIMEOUT".into(),
                    value: v,
                    why: format!(
                        "must be a positive number of seconds, at most {}",
                        MAX_TIMEOUT.as_secs()
                    ),
                });
            }
            c.timeout = Duration::from_secs_f64(secs);
        }
        if let Some(v) = get("FERROCCL_CHECK") {
            c.check = flag("FERROCCL_CHECK", v)?;
        }
        if let Some(v) = get("FERROCCL_STREAM_ORDERED") {
            c.stream_ordered = flag("FERROCCL_STREAM_ORDERED", v)?;
        }
        Ok(c)
    }

    /// Builder: set the timeout (clamped to [`MAX_TIMEOUT`]).
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t.min(MAX_TIMEOUT);
        self
    }

    /// Builder: set checked mode.
    pub fn with_check(mut self, on: bool) -> Self {
        self.check = on;
        self
    }

    /// Builder: set stream-ordered completion (NCCL on device buffers).
    pub fn with_stream_ordered(mut self, on: bool) -> Self {
        self.stream_ordered = on;
        self
    }
}

/// A boolean variable: 1/true/yes/on or 0/false/no/off (or empty).
fn flag(var: &str, v: String) -> Result<bool> {
    match v.trim() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(Error::Config {
            var: var.into(),
            value: v,
            why: "expected 1 or 0".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let c = Config::from_lookup(|k| match k {
            "FERROCCL_TIMEOUT" => Some("2.5".into()),
            "FERROCCL_CHECK" => Some("1".into()),
            "FERROCCL_STREAM_ORDERED" => Some("yes".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert!(c.check);
        assert!(c.stream_ordered);
        assert!(!Config::default().stream_ordered);
        let e =
            Config::from_lookup(|k| (k == "FERROCCL_TIMEOUT").then(|| "soon".into())).unwrap_err();
        assert!(e.to_string().contains("FERROCCL_TIMEOUT"), "{e}");
        assert!(Config::from_lookup(|k| (k == "FERROCCL_TIMEOUT").then(|| "-1".into())).is_err());
        for huge in ["1e300", "inf", "NaN", "200000000"] {
            let e = Config::from_lookup(|k| (k == "FERROCCL_TIMEOUT").then(|| huge.into()));
            assert!(
                e.is_err(),
                "FERROCCL_TIMEOUT={huge} must be refused, not panic"
            );
        }
        assert_eq!(
            Config::default().with_timeout(Duration::MAX).timeout,
            MAX_TIMEOUT
        );
        let far = deadline_after(Duration::MAX);
        assert!(far > std::time::Instant::now() + Duration::from_secs(1000));
        assert!(Config::from_lookup(|k| (k == "FERROCCL_CHECK").then(|| "maybe".into())).is_err());
        let e = Config::from_lookup(|k| (k == "FERROCCL_STREAM_ORDERED").then(|| "2".into()))
            .unwrap_err();
        assert!(e.to_string().contains("FERROCCL_STREAM_ORDERED"), "{e}");
    }
}
