//! A waiter's turn in the stores that are told of changes by their server (PostgreSQL's
//! LISTEN/NOTIFY, Redis's pub/sub), with polling when they cannot be told.

use std::future::Future;
use std::time::Duration;

use crate::error::StoreError;

/// One turn of [`Store::wait`](crate::Store::wait): first registers `interest` in the key's
/// notification (`None` when it cannot be had now), then looks at the lease (`lease_left`,
/// `None` when the key is no longer in progress), then waits for the notification, or sleeps
/// `poll_interval` without one, never past the lease or `max`.
///
/// Listen first, then look: a notification sent after the look is always heard, so no
/// completion can slip between the look and the wait.
pub(crate) async fn wait_turn<N>(
    interest: impl Future<Output = Option<N>>,
    lease_left: impl Future<Output = Result<Option<Duration>, StoreError>>,
    max: Duration,
    poll_interval: Duration,
) -> Result<(), StoreError>
where
    N: Future<Output = ()>,
{
    let notified = interest.await;
    let Some(left) = lease_left.await? else {
        return Ok(());
    };
    let limit = max.min(left);
    match notified {
        Some(notified) => {
            let _ = tokio::time::timeout(limit, notified).await;
        }
        None => tokio::time::sleep(limit.min(poll_interval)).await,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::future::{pending, ready};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_key_not_in_progress_ends_the_turn_at_once() {
        let started = tokio::time::Instant::now();
        let turn = wait_turn(
            ready(Some(pending::<()>())),
            ready(Ok(None)),
            Duration::from_secs(5),
            Duration::from_millis(50),
        );
        assert!(turn.await.is_ok());
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_notification_is_waited_for_up_to_the_lease_and_max() {
        let started = tokio::time::Instant::now();
        let turn = wait_turn(
            ready(Some(pending::<()>())),
            ready(Ok(Some(Duration::from_millis(300)))),
            Duration::from_secs(5),
            Duration::from_millis(50),
        );
        assert!(turn.await.is_ok());
        assert_eq!(started.elapsed(), Duration::from_millis(300));

        let started = tokio::time::Instant::now();
        let turn = wait_turn(
            ready(Some(ready(()))),
            ready(Ok(Some(Duration::from_millis(300)))),
            Duration::from_secs(5),
            Duration::from_millis(50),
        );
        assert!(turn.await.is_ok());
        assert_eq!(started.elapsed(), Duration::ZERO, "woken at once");
    }

    #[tokio::test(start_paused = true)]
    async fn without_notifications_the_turn_sleeps_the_poll_interval() {
        let started = tokio::time::Instant::now();
        let turn = wait_turn(
            ready(None::<std::future::Ready<()>>),
            ready(Ok(Some(Duration::from_millis(300)))),
            Duration::from_secs(5),
            Duration::from_millis(50),
        );
        assert!(turn.await.is_ok());
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_look_is_the_turns_error() {
        let turn = wait_turn(
            ready(Some(pending::<()>())),
            ready(Err(StoreError::Unavailable {
                message: "down".to_string(),
                source: None,
            })),
            Duration::from_secs(5),
            Duration::from_millis(50),
        );
        assert!(matches!(turn.await, Err(StoreError::Unavailable { .. })));
    }
}
