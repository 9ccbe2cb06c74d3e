//! The `Admin` service.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use workbroker_api::v1;
use workbroker_api::v1::admin_server::Admin;

use super::error::Error;
use super::{Shared, convert, validate};
use crate::store::{ListParams, QueueSettingsPatch};

/// Default and largest page of ListJobs.
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
/// Most jobs one RedriveDeadLetters moves.
const MAX_REDRIVE: u32 = 10_000;
/// Longest retention.
const MAX_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest backoff cap.
const MAX_BACKOFF: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn optional_duration(
    field: &str,
    value: Option<&prost_types::Duration>,
    min: Duration,
    max: Duration,
) -> Result<Option<Duration>, Error> {
    value.map(|duration| validate::duration_in(field, duration, min, max)).transpose()
}

fn settings_patch(request: &v1::ConfigureQueueRequest) -> Result<QueueSettingsPatch, Error> {
    let max_attempts = match request.max_attempts {
        None => None,
        Some(attempts @ 1..=1000) => Some(i32::try_from(attempts).unwrap_or(1000)),
        Some(_) => return Err(Error::invalid("max_attempts", "must be 1 to 1000")),
    };
    let backoff_multiplier = match request.backoff_multiplier {
        None => None,
        Some(multiplier) if (1.0..=10.0).contains(&multiplier) => Some(multiplier),
        Some(_) => return Err(Error::invalid("backoff_multiplier", "must be 1.0 to 10.0")),
    };
    let backoff_jitter = match request.backoff_jitter {
        None => None,
        Some(jitter) if (0.0..=1.0).contains(&jitter) => Some(jitter),
        Some(_) => return Err(Error::invalid("backoff_jitter", "must be 0.0 to 1.0")),
    };
    let patch = QueueSettingsPatch {
        max_attempts,
        lease_duration: optional_duration(
            "lease_duration",
            request.lease_duration.as_ref(),
            validate::MIN_LEASE,
            validate::MAX_LEASE,
        )?,
        backoff_initial: optional_duration(
            "backoff_initial",
            request.backoff_initial.as_ref(),
            Duration::ZERO,
            MAX_BACKOFF,
        )?,
        backoff_max: optional_duration("backoff_max", request.backoff_max.as_ref(), Duration::ZERO, MAX_BACKOFF)?,
        backoff_multiplier,
        backoff_jitter,
        completed_retention: optional_duration(
            "completed_retention",
            request.completed_retention.as_ref(),
            Duration::ZERO,
            MAX_RETENTION,
        )?,
    };
    if let (Some(initial), Some(max)) = (patch.backoff_initial, patch.backoff_max)
        && max < initial
    {
        return Err(Error::invalid("backoff_max", "must not be below backoff_initial"));
    }
    Ok(patch)
}

fn page_token(token: &str) -> Result<i64, Error> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .strip_prefix("after:")
        .and_then(|sequence| sequence.parse::<i64>().ok())
        .filter(|sequence| *sequence >= 0)
        .ok_or_else(|| Error::invalid("page_token", "is not a token from a previous ListJobs"))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_queue_stats(
        &self,
        request: Request<v1::GetQueueStatsRequest>,
    ) -> Result<Response<v1::GetQueueStatsResponse>, Status> {
        let queue = request.into_inner().queue;
        if !queue.is_empty() {
            validate::name("queue", &queue)?;
        }
        let stats =
            self.shared.store.queue_stats((!queue.is_empty()).then_some(queue.as_str())).await.map_err(Error::from)?;
        if !queue.is_empty() && stats.is_empty() {
            return Err(Error::NotFound(format!("queue {queue} not found")).into());
        }
        Ok(Response::new(v1::GetQueueStatsResponse { queues: stats.iter().map(convert::queue_stats).collect() }))
    }

    async fn list_jobs(&self, request: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        let request = request.into_inner();
        validate::name("queue", &request.queue)?;
        let state = match v1::JobState::try_from(request.state) {
            Ok(v1::JobState::Unspecified) => None,
            Ok(state) => Some(i16::try_from(state as i32).unwrap_or(0)),
            Err(_) => return Err(Error::invalid("state", "is not a JobState").into()),
        };
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size @ 1..=MAX_PAGE_SIZE => size,
            _ => {
                return Err(Error::invalid("page_size", format!("must be at most {MAX_PAGE_SIZE}")).into());
            }
        };
        let after_sequence = page_token(&request.page_token)?;
        let jobs = self
            .shared
            .store
            .jobs_list(&ListParams { queue: &request.queue, state, after_sequence, limit: page_size })
            .await
            .map_err(Error::from)?;
        let next_page_token = match jobs.last() {
            Some(last) if jobs.len() == page_size as usize => format!("after:{}", last.sequence),
            _ => String::new(),
        };
        Ok(Response::new(v1::ListJobsResponse { jobs: jobs.into_iter().map(convert::job).collect(), next_page_token }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<v1::RedriveDeadLettersRequest>,
    ) -> Result<Response<v1::RedriveDeadLettersResponse>, Status> {
        let request = request.into_inner();
        validate::name("queue", &request.queue)?;
        if request.job_ids.len() > MAX_PAGE_SIZE as usize {
            return Err(Error::invalid("job_ids", format!("must have at most {MAX_PAGE_SIZE} ids")).into());
        }
        let job_ids = request
            .job_ids
            .iter()
            .enumerate()
            .map(|(index, id)| validate::job_id(validate::Field::element("job_ids", index), id))
            .collect::<Result<Vec<i64>, Error>>()?;
        let max_attempts = match request.max_attempts {
            0 => None,
            attempts @ 1..=1000 => Some(i32::try_from(attempts).unwrap_or(1000)),
            _ => return Err(Error::invalid("max_attempts", "must be 0 (keep) to 1000").into()),
        };
        let redriven = self
            .shared
            .store
            .jobs_redrive(&request.queue, &job_ids, max_attempts, MAX_REDRIVE)
            .await
            .map_err(Error::from)?;
        self.shared.dispatcher.publish_changes(redriven.iter().copied());
        tracing::info!(queue = %request.queue, redriven = redriven.len(), "dead letters redriven");
        Ok(Response::new(v1::RedriveDeadLettersResponse {
            redriven: redriven.len() as u64,
            job_ids: redriven.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn pause_queue(&self, request: Request<v1::PauseQueueRequest>) -> Result<Response<v1::QueueInfo>, Status> {
        let queue = request.into_inner().queue;
        validate::name("queue", &queue)?;
        let record = self.shared.store.queue_set_paused(&queue, true).await.map_err(Error::from)?;
        tracing::info!(%queue, "queue paused");
        Ok(Response::new(convert::queue_info(&record)))
    }

    async fn resume_queue(&self, request: Request<v1::ResumeQueueRequest>) -> Result<Response<v1::QueueInfo>, Status> {
        let queue = request.into_inner().queue;
        validate::name("queue", &queue)?;
        let record = self.shared.store.queue_set_paused(&queue, false).await.map_err(Error::from)?;
        tracing::info!(%queue, "queue resumed");
        Ok(Response::new(convert::queue_info(&record)))
    }

    async fn configure_queue(
        &self,
        request: Request<v1::ConfigureQueueRequest>,
    ) -> Result<Response<v1::QueueInfo>, Status> {
        let request = request.into_inner();
        validate::name("queue", &request.queue)?;
        let patch = settings_patch(&request)?;
        if patch.backoff_initial.is_some() != patch.backoff_max.is_some() {
            // Check the one given against the stored other.
            if let Some(current) = self.shared.store.queue_get(&request.queue).await.map_err(Error::from)? {
                let initial = patch.backoff_initial.unwrap_or(current.backoff_initial);
                let max = patch.backoff_max.unwrap_or(current.backoff_max);
                if max < initial {
                    return Err(Error::invalid("backoff_max", "must not be below backoff_initial").into());
                }
            }
        }
        let record = self.shared.store.queue_configure(&request.queue, &patch).await.map_err(Error::from)?;
        tracing::info!(queue = %request.queue, "queue configured");
        Ok(Response::new(convert::queue_info(&record)))
    }

    async fn get_cluster_info(
        &self,
        _request: Request<v1::GetClusterInfoRequest>,
    ) -> Result<Response<v1::ClusterInfo>, Status> {
        let snapshot = self.shared.cluster.snapshot();
        let leader_id = snapshot.leader_id.clone().unwrap_or_default();
        let members = snapshot
            .members
            .iter()
            .map(|member| v1::Member {
                member_id: member.member_id.clone(),
                grpc_address: member.grpc_address.clone(),
                started_at: Some(convert::timestamp(member.started_at)),
                version: member.version.clone(),
                shards: snapshot.shard_map.shards_of(&member.member_id),
                leader: member.member_id == leader_id,
            })
            .collect();
        Ok(Response::new(v1::ClusterInfo {
            members,
            leader_id,
            shard_map_generation: snapshot.shard_map.generation,
            shard_count: self.shared.cluster.shard_count(),
            self_id: snapshot.self_id,
        }))
    }
}
