//! Group commit: callers from every stream submit single items; one loop
//! gathers whatever is waiting into a batch and runs one statement for it.
//!
//! There is no artificial delay for items submitted with
//! [`Batcher::submit`]: while batches are in the database, new items wait,
//! and the next batch takes all of them (up to `max_batch_weight`). Under
//! light load a batch is one item and latency is one statement; under heavy
//! load batches grow by themselves. Items submitted with
//! [`Batcher::submit_patient`] (acks no other job waits on) may linger a
//! little for company when they are few (see [`BatcherLimits::linger`]).
//!
//! A batch starts when nothing is in flight, or, up to
//! `max_concurrent_flushes`, when what waits weighs at least `overlap_weight`:
//! small items then wait for the running batch and go together into the next
//! (fewer, larger statements: the cheapest use of the database's CPU), while
//! heavy work runs side by side on several connections.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    arrived: Instant,
    /// The item may wait up to the linger for others (see [`BatcherLimits`]).
    patient: bool,
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
        self.submit_with(item, false).await
    }

    /// Submits one item that nothing waits for, and waits for its answer: a
    /// light batch of such items waits up to the linger for others to join.
    pub async fn submit_patient(&self, item: Item) -> Result<Output, SubmitError> {
        self.submit_with(item, true).await
    }

    async fn submit_with(&self, item: Item, patient: bool) -> Result<Output, SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Pending { item, arrived: Instant::now(), patient, reply })
            .await
            .map_err(|_| SubmitError::ShuttingDown)?;
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
    /// Weight of waiting items that starts a batch while another one runs.
    pub overlap_weight: usize,
    /// Items waiting beyond the running batches before submitters wait.
    pub queue_capacity: usize,
    /// A batch of patient items (see [`Batcher::submit_patient`]) lighter
    /// than `linger_weight` waits until its oldest item is `linger` old, so
    /// that fewer, larger statements commit (zero: never waits). One
    /// impatient item starts it at once.
    pub linger: Duration,
    /// See `linger`.
    pub linger_weight: usize,
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
        let mut flushes: JoinSet<()> = JoinSet::new();
        let mut waiting: VecDeque<Pending<Item, Output>> = VecDeque::new();
        let mut waiting_weight = 0;
        let mut receiving = true;
        let mut closing = false;
        loop {
            while let Some(batch) = self.next_batch(&mut waiting, &mut waiting_weight, flushes.len(), closing) {
                flushes.spawn(self.flush(batch));
            }
            if !receiving && waiting.is_empty() && flushes.is_empty() {
                break;
            }
            let lingering = self.lingering(&waiting, waiting_weight, flushes.len(), closing);
            tokio::select! {
                () = tokio::time::sleep_until(lingering.unwrap_or_else(Instant::now)), if lingering.is_some() => {}
                received = self.receiver.recv(), if receiving => match received {
                    Some(pending) => {
                        waiting_weight += (self.weigh)(&pending.item);
                        waiting.push_back(pending);
                        // Take whatever else is already there before deciding.
                        while waiting_weight < self.limits.max_batch_weight {
                            let Ok(pending) = self.receiver.try_recv() else { break };
                            waiting_weight += (self.weigh)(&pending.item);
                            waiting.push_back(pending);
                        }
                    }
                    None => receiving = false,
                },
                Some(_) = flushes.join_next(), if !flushes.is_empty() => {}
                () = shutdown.cancelled(), if !closing => {
                    closing = true;
                    self.receiver.close();
                }
            }
        }
    }

    /// Whether the concurrency policy lets a batch start beside `in_flight`
    /// running ones.
    fn may_start(&self, waiting_weight: usize, in_flight: usize) -> bool {
        in_flight == 0
            || (in_flight < self.limits.max_concurrent_flushes && waiting_weight >= self.limits.overlap_weight)
    }

    /// When the waiting items, which the policy would start now, may start
    /// if they linger: all patient and light.
    fn lingering(
        &self,
        waiting: &VecDeque<Pending<Item, Output>>,
        waiting_weight: usize,
        in_flight: usize,
        closing: bool,
    ) -> Option<Instant> {
        let oldest = waiting.front()?;
        let lingers = self.may_start(waiting_weight, in_flight)
            && !closing
            && !self.limits.linger.is_zero()
            && waiting_weight < self.limits.linger_weight
            && waiting.iter().all(|pending| pending.patient);
        lingers.then(|| oldest.arrived + self.limits.linger)
    }

    /// The next batch to start, if the policy says one starts now.
    fn next_batch(
        &self,
        waiting: &mut VecDeque<Pending<Item, Output>>,
        waiting_weight: &mut usize,
        in_flight: usize,
        closing: bool,
    ) -> Option<Vec<Pending<Item, Output>>> {
        if waiting.is_empty() || !self.may_start(*waiting_weight, in_flight) {
            return None;
        }
        if self.lingering(waiting, *waiting_weight, in_flight, closing).is_some_and(|until| until > Instant::now()) {
            return None;
        }
        let mut batch = Vec::new();
        let mut weight = 0;
        while let Some(pending) = waiting.front() {
            let item_weight = (self.weigh)(&pending.item);
            if !batch.is_empty() && weight + item_weight > self.limits.max_batch_weight {
                break;
            }
            weight += item_weight;
            batch.extend(waiting.pop_front());
        }
        *waiting_weight -= weight;
        Some(batch)
    }

    /// Runs one batch and answers each of its items.
    fn flush(&self, batch: Vec<Pending<Item, Output>>) -> impl Future<Output = ()> + Send + 'static {
        let (items, replies): (Vec<Item>, Vec<_>) =
            batch.into_iter().map(|pending| (pending.item, pending.reply)).unzip();
        let flush = (self.flush)(items);
        let name = self.name;
        async move {
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
                    let error = Arc::new(store::Error::Conflict("batch answered the wrong number of items".to_owned()));
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Limits without a linger.
    fn limits(
        max_batch_weight: usize,
        max_concurrent_flushes: usize,
        overlap_weight: usize,
        queue_capacity: usize,
    ) -> BatcherLimits {
        BatcherLimits {
            max_batch_weight,
            max_concurrent_flushes,
            overlap_weight,
            queue_capacity,
            linger: Duration::ZERO,
            linger_weight: 0,
        }
    }

    #[tokio::test]
    async fn answers_every_item_in_order_and_coalesces_under_load() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counter = batches.clone();
        let limits = limits(100, 1, 1, 1000);
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

    /// Runs `items` (each weighing its value) through a batcher that allows
    /// two flushes but overlaps only from weight 10; returns the most flushes
    /// seen in flight at once.
    async fn most_in_flight(items: Vec<usize>) -> usize {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (counter, peak) = (in_flight.clone(), most.clone());
        let limits = limits(15, 2, 10, 100);
        let (handle, batch_loop) = batcher(
            "test",
            limits,
            |item: &usize| *item,
            move |items: Vec<usize>| {
                let (counter, peak) = (counter.clone(), peak.clone());
                async move {
                    let now = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    counter.fetch_sub(1, Ordering::SeqCst);
                    Ok(items)
                }
            },
        );
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(batch_loop.run(shutdown.clone()));
        let calls: Vec<_> = items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                let handle = handle.clone();
                tokio::spawn(async move {
                    // One by one, 3 ms apart: they arrive while a flush runs.
                    tokio::time::sleep(std::time::Duration::from_millis(3 * index as u64)).await;
                    handle.submit(item).await
                })
            })
            .collect();
        for call in calls {
            call.await.expect("task").expect("answer");
        }
        shutdown.cancel();
        running.await.expect("loop ends");
        most.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn light_items_wait_for_the_running_batch_and_heavy_ones_overlap_it() {
        assert_eq!(most_in_flight(vec![1; 6]).await, 1, "light items wait for the running batch");
        assert_eq!(most_in_flight(vec![1, 12, 12, 12]).await, 2, "heavy items overlap, up to the limit");
    }

    /// Submits `(delay, patient)` items, each `delay` after the start, to a
    /// batcher lingering 50 ms below weight 10 (on the paused test clock);
    /// returns the sizes of its batches and when each started.
    async fn linger_batches(items: Vec<(u64, bool)>) -> Vec<(usize, Duration)> {
        let started = Instant::now();
        let batches = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = batches.clone();
        let limits = BatcherLimits { linger: Duration::from_millis(50), linger_weight: 10, ..limits(100, 1, 1, 100) };
        let (handle, batch_loop) = batcher(
            "test",
            limits,
            |_: &u32| 1,
            move |items: Vec<u32>| {
                seen.lock().expect("lock").push((items.len(), started.elapsed()));
                async move { Ok(items) }
            },
        );
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(batch_loop.run(shutdown.clone()));
        let calls: Vec<_> = items
            .into_iter()
            .map(|(delay, patient)| {
                let handle = handle.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    if patient { handle.submit_patient(1).await } else { handle.submit(1).await }
                })
            })
            .collect();
        for call in calls {
            call.await.expect("task").expect("answer");
        }
        shutdown.cancel();
        running.await.expect("loop ends");
        batches.lock().expect("lock").clone()
    }

    #[tokio::test(start_paused = true)]
    async fn patient_items_linger_for_company_until_an_impatient_or_heavy_batch_starts_them() {
        let ms = Duration::from_millis;
        // Light and patient: one batch, when the first is 50 ms old.
        assert_eq!(linger_batches(vec![(0, true), (10, true), (20, true)]).await, vec![(3, ms(50))]);
        // An impatient item starts the waiting ones with it.
        assert_eq!(linger_batches(vec![(0, true), (10, false)]).await, vec![(2, ms(10))]);
        // Impatient items never wait.
        assert_eq!(linger_batches(vec![(0, false)]).await, vec![(1, ms(0))]);
        // Ten patient items weigh enough to start at once.
        assert_eq!(linger_batches(vec![(0, true); 10]).await, vec![(10, ms(0))]);
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_items() {
        let limits = limits(10, 1, 1, 10);
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
