//! The service's response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tokio::task::JoinHandle;

use super::body::ResponseBody;
use super::problem::Problem;

pin_project! {
    /// The response future of [`Idempotent`](super::Idempotent): the inner service's own
    /// future for a request the layer passes through, the layer's answer, or the task that
    /// runs an idempotent request.
    ///
    /// Dropping it (a client that disconnected) leaves that task running: the request is
    /// recorded or released as if the client had waited.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind<F, B, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        Spawned { handle: JoinHandle<Result<Response<ResponseBody<B>>, E>> },
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

    pub(crate) fn spawned(handle: JoinHandle<Result<Response<ResponseBody<B>>, E>>) -> Self {
        Self {
            kind: Kind::Spawned { handle },
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
            KindProjection::Spawned { handle } => {
                Poll::Ready(match ready!(Pin::new(handle).poll(cx)) {
                    Ok(result) => result,
                    // The handler panicked: its key was released; the panic goes on to whatever
                    // catches panics around this layer, as if the handler had run here.
                    Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                    // The runtime is shutting down.
                    Err(_) => Ok(Problem::Interrupted
                        .into_response(None)
                        .map(|body| ResponseBody::buffered(body, None))),
                })
            }
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
