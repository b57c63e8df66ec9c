//! How an idempotent call behaves: how long records live, how long a claim holds, what a
//! concurrent retry does.

use std::time::Duration;

use crate::error::Error;
use crate::store::MAX_DURATION;

/// What a call does when another call with the same key is still running.
///
/// ```
/// use idempotent_core::OnConflict;
/// use std::time::Duration;
///
/// let wait = OnConflict::Wait { timeout: Duration::from_secs(10) };
/// assert_ne!(wait, OnConflict::Reject);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Wait (without polling where the store can notify) for the other call to finish, then
    /// replay its result, or run if it released the key; give up with
    /// [`Error::Conflict`] after `timeout`.
    Wait {
        /// The longest time to wait in total.
        timeout: Duration,
    },
    /// Return [`Error::Conflict`] at once, with the time the other call's lease still runs
    /// (an HTTP layer answers `409 Conflict` with `Retry-After`).
    Reject,
}

/// What a running body does when its lease can no longer be renewed: the store stopped
/// answering its heartbeat, or another caller took the key over.
///
/// A lease is what keeps a second caller out. Once it is gone, another caller may run the same
/// body while this one still runs. [`Continue`](OnLeaseLoss::Continue) (the default) lets the
/// body finish (its `complete` is then fenced, and the caller gets
/// [`Outcome::Unrecorded`](crate::Outcome::Unrecorded)); [`Cancel`](OnLeaseLoss::Cancel)
/// drops the body before the lease runs out, as lease-based locks do, so two bodies never run
/// at once. Fence side effects beyond the store with
/// [`CallContext`](crate::CallContext) either way.
///
/// ```
/// use idempotent_core::{OnLeaseLoss, Options};
/// let options = Options::new().with_on_lease_loss(OnLeaseLoss::Cancel);
/// assert_eq!(options.on_lease_loss(), OnLeaseLoss::Cancel);
/// assert_eq!(Options::new().on_lease_loss(), OnLeaseLoss::Continue);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLeaseLoss {
    /// Let the body run on.
    #[default]
    Continue,
    /// Cancel the body (drop its future) when the lease was taken over, or when renewals have
    /// failed until a sixth of the lease is left; the call returns
    /// [`Error::LeaseLost`](crate::Error::LeaseLost). The body may be stopped part way, at
    /// any `.await`.
    Cancel,
}

/// The settings of an idempotent call.
///
/// ```
/// use idempotent_core::{OnConflict, Options};
/// use std::time::Duration;
///
/// let options = Options::default()
///     .with_ttl(Duration::from_secs(3600))
///     .with_lease(Duration::from_secs(10))
///     .with_on_conflict(OnConflict::Reject)
///     .with_max_output_bytes(64 * 1024);
/// assert_eq!(options.ttl(), Duration::from_secs(3600));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    ttl: Duration,
    lease: Duration,
    on_conflict: OnConflict,
    on_lease_loss: OnLeaseLoss,
    max_output_bytes: usize,
}

impl Options {
    /// Records are kept 24 hours by default: Stripe's window for retries.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
    /// A crashed caller's claim is taken over after 30 seconds by default; a live caller's
    /// claim is renewed in the background, however long its body runs.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
    /// A concurrent retry waits up to 60 seconds by default: longer than the default lease, so
    /// a retry outlasts a crashed holder and then runs.
    pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
    /// Outputs over 1 MiB are refused by default.
    pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1024 * 1024;

    /// The defaults, as a `const` (for generated code).
    ///
    /// ```
    /// use idempotent_core::Options;
    /// const OPTIONS: Options = Options::new();
    /// assert_eq!(OPTIONS, Options::default());
    /// ```
    pub const fn new() -> Self {
        Self {
            ttl: Self::DEFAULT_TTL,
            lease: Self::DEFAULT_LEASE,
            on_conflict: OnConflict::Wait {
                timeout: Self::DEFAULT_WAIT,
            },
            on_lease_loss: OnLeaseLoss::Continue,
            max_output_bytes: Self::DEFAULT_MAX_OUTPUT_BYTES,
        }
    }

    /// How long a completed record is kept (and replayed). Must be more than zero and at least
    /// the lease.
    ///
    /// ```
    /// # use idempotent_core::Options; use std::time::Duration;
    /// let options = Options::new().with_ttl(Duration::from_secs(60));
    /// # assert_eq!(options.ttl(), Duration::from_secs(60));
    /// ```
    pub const fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a claim holds before another caller may take the key over, should the holder
    /// crash. Renewed every third of itself while the body runs. Must be more than zero.
    ///
    /// ```
    /// # use idempotent_core::Options; use std::time::Duration;
    /// let options = Options::new().with_lease(Duration::from_secs(5));
    /// # assert_eq!(options.lease(), Duration::from_secs(5));
    /// ```
    pub const fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// What a call does while another call with its key runs.
    ///
    /// ```
    /// # use idempotent_core::{OnConflict, Options};
    /// let options = Options::new().with_on_conflict(OnConflict::Reject);
    /// # assert_eq!(options.on_conflict(), OnConflict::Reject);
    /// ```
    pub const fn with_on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.on_conflict = on_conflict;
        self
    }

    /// What the body does when its lease can no longer be renewed; see [`OnLeaseLoss`].
    ///
    /// ```
    /// use idempotent_core::{OnLeaseLoss, Options};
    /// let options = Options::new().with_on_lease_loss(OnLeaseLoss::Cancel);
    /// ```
    pub const fn with_on_lease_loss(mut self, on_lease_loss: OnLeaseLoss) -> Self {
        self.on_lease_loss = on_lease_loss;
        self
    }

    /// The largest serialized output recorded; a larger one is refused with
    /// [`Error::OutputTooLarge`] and the key released.
    ///
    /// ```
    /// # use idempotent_core::Options;
    /// let options = Options::new().with_max_output_bytes(4096);
    /// # assert_eq!(options.max_output_bytes(), 4096);
    /// ```
    pub const fn with_max_output_bytes(mut self, limit: usize) -> Self {
        self.max_output_bytes = limit;
        self
    }

    /// The record lifetime.
    ///
    /// ```
    /// # use idempotent_core::Options;
    /// assert_eq!(Options::new().ttl(), Options::DEFAULT_TTL);
    /// ```
    pub const fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The claim lease.
    ///
    /// ```
    /// # use idempotent_core::Options;
    /// assert_eq!(Options::new().lease(), Options::DEFAULT_LEASE);
    /// ```
    pub const fn lease(&self) -> Duration {
        self.lease
    }

    /// The conflict behaviour.
    ///
    /// ```
    /// # use idempotent_core::{OnConflict, Options};
    /// assert!(matches!(Options::new().on_conflict(), OnConflict::Wait { .. }));
    /// ```
    pub const fn on_conflict(&self) -> OnConflict {
        self.on_conflict
    }

    /// What the body does when its lease can no longer be renewed.
    ///
    /// ```
    /// # use idempotent_core::{OnLeaseLoss, Options};
    /// assert_eq!(Options::new().on_lease_loss(), OnLeaseLoss::Continue);
    /// ```
    pub const fn on_lease_loss(&self) -> OnLeaseLoss {
        self.on_lease_loss
    }

    /// The output size limit.
    ///
    /// ```
    /// # use idempotent_core::Options;
    /// assert_eq!(Options::new().max_output_bytes(), Options::DEFAULT_MAX_OUTPUT_BYTES);
    /// ```
    pub const fn max_output_bytes(&self) -> usize {
        self.max_output_bytes
    }

    /// Checks the settings hold together; the engine calls it before claiming anything.
    ///
    /// ```
    /// # use idempotent_core::Options; use std::time::Duration;
    /// assert!(Options::new().validate().is_ok());
    /// assert!(Options::new().with_ttl(Duration::ZERO).validate().is_err());
    /// // Longer than any store holds (`MAX_DURATION`, about 100 years):
    /// assert!(Options::new().with_ttl(Duration::MAX).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        let problem = if self.ttl.is_zero() {
            "ttl is zero: a record that expires at once replays nothing"
        } else if self.lease.is_zero() {
            "lease is zero: a claim that expires at once protects nothing"
        } else if self.ttl > MAX_DURATION {
            "ttl is longer than idempotent_core::MAX_DURATION (36,500 days), the longest any store can hold; use at most that"
        } else if self.lease > MAX_DURATION {
            "lease is longer than idempotent_core::MAX_DURATION (36,500 days), the longest any store can hold; use at most that"
        } else if self.lease > self.ttl {
            "lease is longer than ttl: a claim would outlive the record it protects"
        } else {
            return Ok(());
        };
        Err(Error::InvalidOptions { problem })
    }
}

impl Default for Options {
    fn default() -> Self {
        Self::new()
    }
}
