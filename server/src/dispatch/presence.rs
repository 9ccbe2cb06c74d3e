//! Which other replicas listen: a replica alone on its database need not
//! announce its jobs to nobody.
//!
//! Every replica's [`super::heartbeat::Heartbeat`] sends a heartbeat,
//! `present:<origin>` on `workbroker_leases`, every [`HEARTBEAT_INTERVAL`]
//! and as soon as its listener (re)connects. Each listener records the
//! heartbeats it hears, its own included, in [`Presence`], and so does every
//! job announcement from another replica. A replica skips announcing new
//! jobs only when all of these hold:
//!
//! - its listener has been connected for [`PRESENCE_TTL`] without a break,
//!   long enough to have heard every live replica's heartbeat;
//! - it heard its own heartbeat within [`OWN_HEARTBEAT_TTL`], so the path
//!   from the database to its listener works;
//! - it heard no other replica within [`PRESENCE_TTL`].
//!
//! A replica that joins listens before its first heartbeat, so jobs
//! enqueued between its `LISTEN` and the moment the others hear it could go
//! unannounced: each replica keeps the queues it skipped for
//! [`SKIPPED_RETENTION`] and announces them after all when it first hears a
//! replica it did not know. Announcements stay wake-up hints either way:
//! a stream that misses one finds its jobs at its idle re-check.
//!
//! A heartbeat costs one notification a second per replica; at one job per
//! call an announcement follows nearly every enqueue statement, so a lone
//! replica saves a statement (and a wake-up of its own listener) per
//! enqueue batch.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// How often a replica sends its heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long another replica's heartbeat counts: three intervals, so one
/// late or lost heartbeat does not make a replica look gone.
pub const PRESENCE_TTL: Duration = Duration::from_secs(3);
/// How long a replica's own heartbeat counts. Shorter than
/// [`PRESENCE_TTL`]: when the listener goes deaf without noticing (a lost
/// connection not yet seen), the own heartbeat, which was at most an
/// interval newer than any other replica's, must lapse first, so that the
/// replica announces again before it could take the others for gone.
pub const OWN_HEARTBEAT_TTL: Duration = Duration::from_secs(2);
/// How long skipped announcements are kept for a replica that turns up.
pub const SKIPPED_RETENTION: Duration = Duration::from_secs(5);
/// Prefix of a heartbeat's payload on `workbroker_leases`.
pub const HEARTBEAT_PREFIX: &str = "present:";

/// The heartbeat payload of the replica with this notification origin.
pub fn heartbeat_payload(origin: &str) -> String {
    format!("{HEARTBEAT_PREFIX}{origin}")
}

/// What a replica knows about who listens; see the module documentation.
#[derive(Debug, Default)]
pub struct Presence {
    /// Since when the listener has been connected without a break (`None`:
    /// not connected).
    listening_since: Option<Instant>,
    /// When this replica last heard its own heartbeat.
    own_heard_at: Option<Instant>,
    /// Other replicas by origin, with when each was last heard.
    others: HashMap<String, Instant>,
    /// Queues whose announcement was skipped, with when it last was.
    skipped: HashMap<String, Instant>,
}

impl Presence {
    /// The listener (re)connected now: it may have missed heartbeats.
    pub fn listening_started(&mut self, now: Instant) {
        self.listening_since = Some(now);
    }

    /// The listener is not connected.
    pub fn listening_stopped(&mut self) {
        self.listening_since = None;
    }

    /// Records that the replica with `origin` was heard (`own`: this
    /// replica). When it is another replica not heard within
    /// [`PRESENCE_TTL`], returns the queues skipped within
    /// [`SKIPPED_RETENTION`], to be announced now.
    pub fn heard(&mut self, origin: &str, own: bool, now: Instant) -> Vec<String> {
        if own {
            self.own_heard_at = Some(now);
            // Once a second: forget what no replica turning up would get.
            self.skipped.retain(|_, at| now.duration_since(*at) < SKIPPED_RETENTION);
            return Vec::new();
        }
        let known = self.others.insert(origin.to_owned(), now).is_some_and(|at| now.duration_since(at) < PRESENCE_TTL);
        if known {
            return Vec::new();
        }
        self.others.retain(|_, at| now.duration_since(*at) < PRESENCE_TTL);
        self.skipped
            .drain()
            .filter(|(_, at)| now.duration_since(*at) < SKIPPED_RETENTION)
            .map(|(queue, _)| queue)
            .collect()
    }

    /// Whether another replica may be listening: true unless this replica
    /// is sure that none is.
    pub fn others_may_listen(&self, now: Instant) -> bool {
        let settled = self.listening_since.is_some_and(|since| now.duration_since(since) >= PRESENCE_TTL);
        let hears_itself = self.own_heard_at.is_some_and(|at| now.duration_since(at) < OWN_HEARTBEAT_TTL);
        let hears_others = self.others.values().any(|at| now.duration_since(*at) < PRESENCE_TTL);
        !settled || !hears_itself || hears_others
    }

    /// Keeps the queues of an announcement as skipped and answers true when
    /// no other replica listens; answers false, taking none of them, when
    /// another may (the announcement is to be sent).
    pub fn skip_if_alone<'a>(&mut self, queues: impl Iterator<Item = &'a str>, now: Instant) -> bool {
        if self.others_may_listen(now) {
            return false;
        }
        for queue in queues {
            match self.skipped.get_mut(queue) {
                Some(at) => *at = now,
                None => {
                    self.skipped.insert(queue.to_owned(), now);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn queues(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    /// Whether an announcement of `names` at `now` is skipped.
    fn skips(presence: &mut Presence, names: &[&str], now: Instant) -> bool {
        presence.skip_if_alone(names.iter().copied(), now)
    }

    /// A presence whose listener connected a TTL ago and has heard its own
    /// heartbeat every second since, and that moment.
    fn settled_alone() -> (Presence, Instant) {
        let start = Instant::now();
        let mut presence = Presence::default();
        presence.listening_started(start);
        for second in 0..=PRESENCE_TTL.as_secs() {
            presence.heard("@me", true, start + SECOND * u32::try_from(second).expect("small"));
        }
        (presence, start + PRESENCE_TTL)
    }

    #[test]
    fn a_replica_announces_until_it_is_sure_it_is_alone() {
        let start = Instant::now();
        let mut presence = Presence::default();
        assert!(presence.others_may_listen(start), "not listening yet");
        presence.listening_started(start);
        presence.heard("@me", true, start);
        assert!(presence.others_may_listen(start + SECOND), "listening for less than the TTL");
        let (alone, now) = settled_alone();
        assert!(!alone.others_may_listen(now));
        assert!(alone.others_may_listen(now + OWN_HEARTBEAT_TTL), "its own heartbeat stopped arriving");
    }

    #[test]
    fn a_deaf_listener_lets_its_own_heartbeat_lapse_before_another_replicas() {
        let (mut presence, now) = settled_alone();
        // Both heartbeats arrive each second; the other's came just before
        // the own one, then the listener hears nothing more.
        presence.heard("@other", false, now - SECOND + Duration::from_millis(10));
        let mut at = now;
        while at < now + PRESENCE_TTL {
            assert!(presence.others_may_listen(at), "skipped at {:?} after the last heartbeats", at - now);
            at += Duration::from_millis(100);
        }
    }

    #[test]
    fn a_lost_listener_makes_the_replica_announce_again() {
        let (mut presence, now) = settled_alone();
        presence.listening_stopped();
        assert!(presence.others_may_listen(now));
        presence.listening_started(now);
        presence.heard("@me", true, now);
        assert!(presence.others_may_listen(now + SECOND), "reconnected less than the TTL ago");
    }

    #[test]
    fn another_replica_heard_within_the_ttl_gets_announcements() {
        let (mut presence, now) = settled_alone();
        assert!(presence.heard("@other", false, now).is_empty());
        assert!(presence.others_may_listen(now + SECOND));
        assert!(!skips(&mut presence, &["a"], now + SECOND));
        presence.heard("@me", true, now + PRESENCE_TTL);
        assert!(!presence.others_may_listen(now + PRESENCE_TTL), "the other replica went quiet");
    }

    #[test]
    fn skipped_queues_are_announced_when_a_new_replica_is_heard() {
        let (mut presence, now) = settled_alone();
        assert!(skips(&mut presence, &["old"], now));
        let later = now + SKIPPED_RETENTION;
        presence.heard("@me", true, later);
        assert!(skips(&mut presence, &["a", "b"], later));
        assert!(skips(&mut presence, &["a"], later));
        let mut reannounced = presence.heard("@other", false, later + SECOND);
        reannounced.sort();
        assert_eq!(reannounced, queues(&["a", "b"]), "`old` was skipped longer ago than the retention");
        assert!(presence.heard("@other", false, later + SECOND * 2).is_empty(), "already known");
        assert!(presence.heard("@third", false, later + SECOND * 2).is_empty(), "nothing skipped since");
    }

    #[test]
    fn a_replica_heard_again_after_the_ttl_counts_as_new() {
        let (mut presence, now) = settled_alone();
        presence.heard("@other", false, now);
        let later = now + PRESENCE_TTL;
        presence.heard("@me", true, later);
        assert!(skips(&mut presence, &["q"], later));
        assert_eq!(presence.heard("@other", false, later + SECOND), queues(&["q"]));
    }
}
