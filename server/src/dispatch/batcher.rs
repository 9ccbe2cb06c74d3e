//! Group commit: callers from every stream submit single items; one loop
//! gathers whatever is waiting into a batch and runs one statement for it.
//!
//! There is no artificial delay: while up to `max_concurrent_flushes` batches
//! are in the database, new items queue up, and the next batch takes all of
//! them (up to `max_batch_weight`). Under light load a batch is one item and
//! latency is one statement; under heavy load batches grow by themselves.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store;

/// The error every caller of a failed batch receives.
pub type SharedError = Arc<store::Error>;

/// Why a submitted item got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The batch failed in the database.
    #[error(transparent)]
    Store(SharedError),
    /// The batcher is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
}

struct Pending<Item, Output> {
    item: Item,
    reply: oneshot::Sender<Result<Output, SharedError>>,
}

/// The handle callers submit to. Cheap to clone.
pub struct Batcher<Item, Output> {
    sender: mpsc::Sender<Pending<Item, Output>>,
}

impl<Item, Output> Clone for Batcher<Item, Output> {
    fn clone(&self) -> Self {
        Self { sender: self.sender.clone() }
    }
}

impl<Item, Output> Batcher<Item, Output> {
    /// Submits one item and waits for its answer.
    pub async fn submit(&self, item: Item) -> Result<Output, SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.sender.send(Pending { item, reply }).await.map_err(|_| SubmitError::ShuttingDown)?;
        match answer.await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(error)) => Err(SubmitError::Store(error)),
            Err(_) => Err(SubmitError::ShuttingDown),
        }
    }
}

/// Limits of one batcher.
#[derive(Clone, Copy, Debug)]
pub struct BatcherLimits {
    /// Largest total weight of one batch (items weigh what `weigh` says).
    pub max_batch_weight: usize,
    /// Batches in the database at once.
    pub max_concurrent_flushes: usize,
    /// Items waiting beyond the running batches before submitters wait.
    pub queue_capacity: usize,
}

/// The loop behind a [`Batcher`].
pub struct BatcherLoop<Item, Output, Flush> {
    name: &'static str,
    receiver: mpsc::Receiver<Pending<Item, Output>>,
    flush: Flush,
    weigh: fn(&Item) -> usize,
    limits: BatcherLimits,
}

/// Creates a batcher and the loop that must be run for it.
pub fn batcher<Item, Output, Flush, FlushFuture>(
    name: &'static str,
    limits: BatcherLimits,
    weigh: fn(&Item) -> usize,
    flush: Flush,
) -> (Batcher<Item, Output>, BatcherLoop<Item, Output, Flush>)
where
    Flush: Fn(Vec<Item>) -> FlushFuture,
    FlushFuture: Future<Output = store::Result<Vec<Output>>>,
{
    let (sender, receiver) = mpsc::channel(limits.queue_capacity.max(1));
    (Batcher { sender }, BatcherLoop { name, receiver, flush, weigh, limits })
}

impl<Item, Output, Flush, FlushFuture> BatcherLoop<Item, Output, Flush>
where
    Item: Send + 'static,
    Output: Send + 'static,
    Flush: Fn(Vec<Item>) -> FlushFuture + Send + 'static,
    FlushFuture: Future<Output = store::Result<Vec<Output>>> + Send + 'static,
{
    /// Runs until `shutdown`; then answers what is already queued and waits
    /// for running batches. Items submitted after that get `ShuttingDown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.limits.max_concurrent_flushes.max(1)));
        let flushes = TaskTracker::new();
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let first = tokio::select! {
                pending = self.receiver.recv() => pending,
                () = shutdown.cancelled() => {
                    self.receiver.close();
                    self.receiver.recv().await
                }
            };
            let Some(first) = first else { break };
            let mut weight = (self.weigh)(&first.item);
            let mut batch = vec![first];
            while weight < self.limits.max_batch_weight {
                match self.receiver.try_recv() {
                    Ok(pending) => {
                        weight += (self.weigh)(&pending.item);
                        batch.push(pending);
                    }
                    Err(_) => break,
                }
            }
            let (items, replies): (Vec<Item>, Vec<_>) =
                batch.into_iter().map(|pending| (pending.item, pending.reply)).unzip();
            let flush = (self.flush)(items);
            let name = self.name;
            flushes.spawn(async move {
                let expected = replies.len();
                match flush.await {
                    Ok(outputs) if outputs.len() == expected => {
                        for (reply, output) in replies.into_iter().zip(outputs) {
                            let _ = reply.send(Ok(output));
                        }
                    }
                    Ok(outputs) => {
                        tracing::error!(
                            batcher = name,
                            expected,
                            got = outputs.len(),
                            "batch answered the wrong number of items"
                        );
                        let error =
                            Arc::new(store::Error::Conflict("batch answered the wrong number of items".to_owned()));
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                    Err(error) => {
                        tracing::warn!(batcher = name, items = expected, %error, "batch failed");
                        let error = Arc::new(error);
                        for reply in replies {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
                drop(permit);
            });
        }
        flushes.close();
        flushes.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn answers_every_item_in_order_and_coalesces_under_load() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counter = batches.clone();
        let limits = BatcherLimits { max_batch_weight: 100, max_concurrent_flushes: 1, queue_capacity: 1000 };
        let (handle, batch_loop) = batcher(
            "test",
            limits,
            |_: &u32| 1,
            move |items: Vec<u32>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    Ok(items.into_iter().map(|item| item * 2).collect())
                }
            },
        );
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(batch_loop.run(shutdown.clone()));
        let calls: Vec<_> = (0..200u32)
            .map(|item| {
                let handle = handle.clone();
                tokio::spawn(async move { handle.submit(item).await })
            })
            .collect();
        for (item, call) in calls.into_iter().enumerate() {
            let doubled = call.await.expect("task").expect("answer");
            assert_eq!(doubled, u32::try_from(item).expect("small") * 2);
        }
        assert!(batches.load(Ordering::SeqCst) < 200, "items were not coalesced");
        shutdown.cancel();
        running.await.expect("loop ends");
        assert!(matches!(handle.submit(1).await, Err(SubmitError::ShuttingDown)));
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_items() {
        let limits = BatcherLimits { max_batch_weight: 10, max_concurrent_flushes: 1, queue_capacity: 10 };
        let (handle, batch_loop) = batcher(
            "test",
            limits,
            |_: &u32| 1,
            |_items: Vec<u32>| async { Err::<Vec<u32>, _>(store::Error::Unavailable("down".to_owned())) },
        );
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(batch_loop.run(shutdown.clone()));
        assert!(matches!(handle.submit(1).await, Err(SubmitError::Store(_))));
        shutdown.cancel();
        running.await.expect("loop ends");
    }
}
