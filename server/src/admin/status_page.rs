//! The HTML status page: plain server-rendered HTML with inline CSS and no
//! scripts. Every value that comes from outside (queue and worker names,
//! error texts) is escaped.
//!
//! Sections: queues (counts, oldest waiting age, paused, completed
//! watermark), lease streams and their in-flight leases per worker, recent
//! dead letters with their last error, the cluster (members, leader, shard
//! map), the database (pool, vacuum horizon), and recent warnings and errors.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::recent_errors::RecentError;
use crate::coordination::Leadership;
use crate::service::Shared;
use crate::store::QueueStatsRecord;
use crate::store::observe::DeadLetterRecord;

/// Dead letters shown.
pub const DEAD_LETTERS_SHOWN: u32 = 20;
/// Longest error text shown in a table cell.
const MAX_ERROR_CHARS: usize = 500;

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

fn truncated(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A short human age: `0s`, `42s`, `3m 12s`, `2h 5m`, `3d 4h`.
pub fn human_age(age: Duration) -> String {
    let seconds = age.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m {}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h {}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d {}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `0-3, 8, 10-11` for a sorted shard list.
pub fn shard_ranges(shards: &[u32]) -> String {
    let mut ranges: Vec<String> = Vec::new();
    let mut index = 0;
    while index < shards.len() {
        let start = shards[index];
        let mut end = start;
        while index + 1 < shards.len() && shards[index + 1] == end + 1 {
            index += 1;
            end = shards[index];
        }
        ranges.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        index += 1;
    }
    if ranges.is_empty() { "none".to_owned() } else { ranges.join(", ") }
}

/// What the page shows; read by [`gather`], rendered by [`render`].
pub struct StatusData {
    pub queues: Result<Vec<QueueStatsRecord>, String>,
    pub dead_letters: Result<Vec<DeadLetterRecord>, String>,
    pub recent_errors: Vec<RecentError>,
    pub generated_at: DateTime<Utc>,
}

/// Reads what the page needs from the database (the rest is in memory).
pub async fn gather(shared: &Shared, recent_errors: Vec<RecentError>) -> StatusData {
    let (queues, dead_letters) =
        tokio::join!(shared.store.queue_stats(None), shared.store.dead_letters_recent(DEAD_LETTERS_SHOWN));
    StatusData {
        queues: queues.map_err(|error| error.to_string()),
        dead_letters: dead_letters.map_err(|error| error.to_string()),
        recent_errors,
        generated_at: Utc::now(),
    }
}

const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f5f6f8;color:#1d232b}\
header{background:#1f3a5f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}\
header p{margin:4px 0 0;font-size:13px;opacity:.85}main{padding:8px 24px 32px}\
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;margin:16px 0;padding:4px 16px 12px}\
h2{font-size:16px;margin:12px 0 8px}table{border-collapse:collapse;width:100%;font-size:13px}\
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eceef1;vertical-align:top}\
th{background:#f0f2f5;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.err{color:#a4262c;font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}\
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;background:#e1e5ea}\
.ok{background:#dff6dd;color:#0e700e}.warn{background:#fff4ce;color:#7a5b00}.bad{background:#fde7e9;color:#a4262c}\
.muted{color:#68727d;font-size:13px}code{font-family:ui-monospace,monospace;font-size:12px}";

fn badge(class: &str, text: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", escape(text))
}

/// Renders the page.
pub fn render(shared: &Shared, data: &StatusData) -> String {
    let snapshot = shared.cluster.snapshot();
    let mut page = String::with_capacity(16 * 1024);
    let _ = write!(
        page,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>workbroker · {member}</title><style>{STYLE}</style></head><body>\
         <header><h1>workbroker status</h1><p>member <strong>{member}</strong> · version {version} · {role} · \
         generated {generated}</p></header><main>",
        member = escape(&snapshot.self_id),
        version = escape(env!("CARGO_PKG_VERSION")),
        role = if shared.cluster.is_trusted_leader() { "leader" } else { "follower" },
        generated = time(data.generated_at),
    );
    render_queues(&mut page, data);
    render_streams(&mut page, shared);
    render_dead_letters(&mut page, data);
    render_cluster(&mut page, shared, &snapshot);
    render_database(&mut page, shared);
    render_recent_errors(&mut page, data);
    page.push_str(
        "<p class=\"muted\">Metrics: <a href=\"/metrics\">/metrics</a> · readiness: \
                   <a href=\"/readyz\">/readyz</a> · liveness: <a href=\"/healthz\">/healthz</a></p>",
    );
    page.push_str("</main></body></html>\n");
    page
}

fn render_queues(page: &mut String, data: &StatusData) {
    page.push_str("<section id=\"queues\"><h2>Queues</h2>");
    match &data.queues {
        Err(error) => {
            let _ = write!(page, "<p class=\"err\">cannot read queue stats: {}</p>", escape(error));
        }
        Ok(queues) if queues.is_empty() => page.push_str("<p class=\"muted\">No queues yet.</p>"),
        Ok(queues) => {
            page.push_str(
                "<table><thead><tr><th>queue</th><th>state</th><th>scheduled</th><th>available</th>\
                 <th>leased</th><th>completed</th><th>dead</th><th>cancelled</th><th>oldest waiting</th>\
                 <th>completed watermark</th><th>last sequence</th></tr></thead><tbody>",
            );
            for queue in queues {
                let state = if queue.paused { badge("warn", "paused") } else { badge("ok", "active") };
                let dead = if queue.dead > 0 {
                    format!("<span class=\"badge bad\">{}</span>", queue.dead)
                } else {
                    "0".to_owned()
                };
                let _ = write!(
                    page,
                    "<tr><td><code>{name}</code></td><td>{state}</td><td class=\"n\">{scheduled}</td>\
                     <td class=\"n\">{available}</td><td class=\"n\">{leased}</td><td class=\"n\">{completed}</td>\
                     <td class=\"n\">{dead}</td><td class=\"n\">{cancelled}</td><td class=\"n\">{oldest}</td>\
                     <td class=\"n\">{watermark}</td><td class=\"n\">{last}</td></tr>",
                    name = escape(&queue.queue),
                    scheduled = queue.scheduled,
                    available = queue.available,
                    leased = queue.leased,
                    completed = queue.completed,
                    cancelled = queue.cancelled,
                    oldest = if queue.available > 0 { human_age(queue.oldest_available_age) } else { "–".to_owned() },
                    watermark = queue.completed_watermark,
                    last = queue.last_sequence,
                );
            }
            page.push_str("</tbody></table>");
        }
    }
    page.push_str("</section>");
}

fn render_streams(page: &mut String, shared: &Shared) {
    let mut by_worker: BTreeMap<String, (usize, u32, usize, Vec<String>)> = BTreeMap::new();
    for stream in shared.dispatcher.streams() {
        let entry = by_worker.entry(stream.worker_id).or_default();
        entry.0 += 1;
        entry.1 = entry.1.saturating_add(stream.window);
        entry.2 += stream.held;
        for queue in stream.queues {
            if !entry.3.contains(&queue) {
                entry.3.push(queue);
            }
        }
    }
    let _ = write!(
        page,
        "<section id=\"workers\"><h2>Workers on this replica</h2><p class=\"muted\">{} lease stream(s), \
         {} lease(s) in flight</p>",
        by_worker.values().map(|worker| worker.0).sum::<usize>(),
        shared.dispatcher.held_leases(),
    );
    if by_worker.is_empty() {
        page.push_str("<p class=\"muted\">No worker is connected to this replica.</p></section>");
        return;
    }
    page.push_str(
        "<table><thead><tr><th>worker</th><th>queues</th><th>streams</th><th>window</th>\
         <th>in flight</th></tr></thead><tbody>",
    );
    for (worker, (streams, window, held, mut queues)) in by_worker {
        queues.sort();
        let queues: Vec<String> = queues.iter().map(|queue| format!("<code>{}</code>", escape(queue))).collect();
        let _ = write!(
            page,
            "<tr><td><code>{}</code></td><td>{}</td><td class=\"n\">{streams}</td><td class=\"n\">{window}</td>\
             <td class=\"n\">{held}</td></tr>",
            escape(&worker),
            queues.join(" "),
        );
    }
    page.push_str("</tbody></table></section>");
}

fn render_dead_letters(page: &mut String, data: &StatusData) {
    let _ = write!(page, "<section id=\"dead-letters\"><h2>Recent dead letters</h2>");
    match &data.dead_letters {
        Err(error) => {
            let _ = write!(page, "<p class=\"err\">cannot read dead letters: {}</p>", escape(error));
        }
        Ok(dead) if dead.is_empty() => page.push_str("<p class=\"muted\">No dead letters.</p>"),
        Ok(dead) => {
            let _ = write!(
                page,
                "<p class=\"muted\">The {} most recent; redrive with <code>workbroker dead redrive</code>.</p>\
                 <table><thead><tr><th>job</th><th>queue</th><th>kind</th><th>attempts</th><th>died</th>\
                 <th>last error</th></tr></thead><tbody>",
                dead.len()
            );
            for job in dead {
                let _ = write!(
                    page,
                    "<tr><td><code>{id}</code></td><td><code>{queue}</code></td><td><code>{kind}</code></td>\
                     <td class=\"n\">{attempt}</td><td>{finished}</td><td class=\"err\">{error}</td></tr>",
                    id = job.id,
                    queue = escape(&job.queue),
                    kind = escape(&job.kind),
                    attempt = job.attempt,
                    finished = time(job.finished_at),
                    error = escape(&truncated(job.last_error.as_deref().unwrap_or(""), MAX_ERROR_CHARS)),
                );
            }
            page.push_str("</tbody></table>");
        }
    }
    page.push_str("</section>");
}

fn render_cluster(page: &mut String, shared: &Shared, snapshot: &crate::coordination::ClusterSnapshot) {
    let leadership = match shared.cluster.leadership() {
        Leadership::Leader(term) if term.is_trusted() => badge("ok", "this replica leads"),
        Leadership::Leader(_) => badge("bad", "leader, lease not trusted"),
        Leadership::Candidate => badge("warn", "candidate"),
        Leadership::Follower => badge("", "follower"),
    };
    let _ = write!(
        page,
        "<section id=\"cluster\"><h2>Cluster</h2><p>leader: <strong>{leader}</strong> · {leadership} · \
         shard map generation {generation}, {count} shards</p>",
        leader = escape(snapshot.leader_id.as_deref().unwrap_or("none")),
        generation = snapshot.shard_map.generation,
        count = shared.cluster.shard_count(),
    );
    let mut members = snapshot.members.clone();
    if members.is_empty() {
        members.push(shared.cluster.self_member().clone());
    }
    page.push_str(
        "<table><thead><tr><th>member</th><th>gRPC address</th><th>version</th><th>started</th><th>role</th>\
         <th>shards</th></tr></thead><tbody>",
    );
    for member in &members {
        let shards = snapshot.shard_map.shards_of(&member.member_id);
        let mut role = Vec::new();
        if snapshot.leader_id.as_deref() == Some(member.member_id.as_str()) {
            role.push(badge("ok", "leader"));
        }
        if member.member_id == snapshot.self_id {
            role.push(badge("", "this replica"));
        }
        let _ = write!(
            page,
            "<tr><td><code>{id}</code></td><td><code>{address}</code></td><td>{version}</td><td>{started}</td>\
             <td>{role}</td><td>{count}: <code>{ranges}</code></td></tr>",
            id = escape(&member.member_id),
            address = escape(&member.grpc_address),
            version = escape(&member.version),
            started = time(member.started_at),
            role = role.join(" "),
            count = shards.len(),
            ranges = escape(&shard_ranges(&shards)),
        );
    }
    page.push_str("</tbody></table></section>");
}

fn render_database(page: &mut String, shared: &Shared) {
    let counts = shared.store.connection_counts();
    let _ = write!(
        page,
        "<section id=\"database\"><h2>Database</h2><p>pool: {in_use} in use, {idle} idle, {max} max</p>",
        in_use = counts.open - counts.idle,
        idle = counts.idle,
        max = counts.max,
    );
    let gauges = shared.metrics.database();
    match &gauges.horizon {
        None => page.push_str("<p class=\"muted\">Vacuum horizon not read yet.</p>"),
        Some(horizon) => {
            let age = Duration::from_secs_f64(horizon.oldest_transaction_seconds.max(0.0));
            let class = match age.as_secs() {
                0..300 => "ok",
                300..3600 => "warn",
                _ => "bad",
            };
            let _ = write!(
                page,
                "<p>oldest open transaction: {age} · xmin horizon age: {xmin} transactions</p>",
                age = badge(class, &human_age(age)),
                xmin = horizon.xmin_horizon_age,
            );
            if let Some(holder) = horizon.oldest_holder.as_ref().filter(|holder| holder.transaction_seconds >= 1.0) {
                let _ = write!(
                    page,
                    "<p class=\"muted\">held by pid {pid} (<code>{application}</code>, {state}). Long transactions \
                     keep vacuum from cleaning the job tables.</p>",
                    pid = holder.pid,
                    application = escape(&holder.application_name),
                    state = escape(&holder.state),
                );
            }
        }
    }
    if let Some(refreshed_at) = gauges.refreshed_at {
        let _ = write!(page, "<p class=\"muted\">read {}</p>", time(refreshed_at));
    }
    page.push_str("</section>");
}

fn render_recent_errors(page: &mut String, data: &StatusData) {
    page.push_str("<section id=\"recent-errors\"><h2>Recent warnings and errors</h2>");
    if data.recent_errors.is_empty() {
        page.push_str("<p class=\"muted\">None logged.</p></section>");
        return;
    }
    page.push_str(
        "<table><thead><tr><th>last seen</th><th>level</th><th>where</th><th>message</th><th>times</th></tr>\
         </thead><tbody>",
    );
    for error in &data.recent_errors {
        let level = if error.level == "ERROR" { badge("bad", &error.level) } else { badge("warn", &error.level) };
        let _ = write!(
            page,
            "<tr><td>{at}</td><td>{level}</td><td><code>{target}</code></td><td class=\"err\">{message}</td>\
             <td class=\"n\">{repeated}</td></tr>",
            at = time(error.at),
            target = escape(&error.target),
            message = escape(&truncated(&error.message, MAX_ERROR_CHARS)),
            repeated = error.repeated,
        );
    }
    page.push_str("</tbody></table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("<b onclick=\"x\">&'"), "&lt;b onclick=&quot;x&quot;&gt;&amp;&#39;");
    }

    #[test]
    fn compresses_shard_lists() {
        assert_eq!(shard_ranges(&[0, 1, 2, 3, 8, 10, 11]), "0-3, 8, 10-11");
        assert_eq!(shard_ranges(&[]), "none");
        assert_eq!(shard_ranges(&[5]), "5");
    }

    #[test]
    fn ages_read_like_a_person_would_say_them() {
        assert_eq!(human_age(Duration::from_secs(42)), "42s");
        assert_eq!(human_age(Duration::from_secs(192)), "3m 12s");
        assert_eq!(human_age(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(human_age(Duration::from_secs(90000)), "1d 1h");
    }

    #[test]
    fn truncates_on_character_boundaries() {
        assert_eq!(truncated("ééé", 2), "éé…");
        assert_eq!(truncated("short", 10), "short");
    }
}
