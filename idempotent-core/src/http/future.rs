//! The service's response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use super::body::ResponseBody;

/// An idempotent request's whole run: its body read, the engine, the handler, the record.
pub(crate) type Run<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project! {
    /// The response future of [`Idempotent`](super::Idempotent): the inner service's own
    /// future for a request the layer passes through, the layer's answer, or the run of an
    /// idempotent request.
    ///
    /// An idempotent request runs here, in the connection's task, but is never cancelled with
    /// it: dropped before it finished (a client that disconnected), this future hands the run
    /// to a task of its own, which records its response (or releases its key) as if the client
    /// had waited.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }

    impl<F, B, E> PinnedDrop for ResponseFuture<F, B, E> {
        fn drop(this: Pin<&mut Self>) {
            if let KindProjection::Idempotent { run, detach } = this.project().kind.project()
                && let Some(run) = run.take()
            {
                detach(run);
            }
        }
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind<F, B, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        // `detach` is `detach::<B, E>`, chosen where its bounds are known (a `Drop` impl may
        // not add any).
        Idempotent { run: Option<Run<B, E>>, detach: fn(Run<B, E>) },
    }
}

/// Finishes `run` on a task of its own. Outside a Tokio runtime (it is shutting down) there is
/// none to spawn on: the run is dropped, and the engine releases the key of a handler that had
/// not returned.
fn detach<B: 'static, E: 'static>(run: Run<B, E>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            // The response has no one to go to; its record is what the retry gets.
            let _ = run.await;
        });
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn idempotent(run: Run<B, E>) -> Self
    where
        B: 'static,
        E: 'static,
    {
        Self {
            kind: Kind::Idempotent {
                run: Some(run),
                detach: detach::<B, E>,
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProjection::Passthrough { future } => Poll::Ready(
                ready!(future.poll(cx)).map(|response| response.map(ResponseBody::streaming)),
            ),
            KindProjection::Ready { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
            KindProjection::Idempotent { run, .. } => match run.as_mut() {
                Some(future) => {
                    let output = ready!(future.as_mut().poll(cx));
                    // Finished: nothing is left to detach when this future is dropped.
                    *run = None;
                    Poll::Ready(output)
                }
                None => Poll::Pending,
            },
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
