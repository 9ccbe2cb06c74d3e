//! Output of the client subcommands: aligned tables and `key: value` blocks
//! for people, JSON documents for scripts, and the shared renderings of jobs,
//! queues, payloads, timestamps and durations.

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use workbroker_api::v1;

use super::Result;

/// The JSON value type `--json` output is built from (a `serde_json::Value`).
pub use serde_json::Value as JsonValue;

/// Rows under a header, printed with every column padded to its widest cell.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Self { headers: headers.iter().map(|header| (*header).to_owned()).collect(), rows: Vec::new() }
    }

    /// Appends a row (missing cells print empty, extra cells are dropped).
    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// True when no row was pushed.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Writes the header and the rows, columns separated by two spaces.
    pub fn write(&self, out: &mut dyn Write) -> Result<()> {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (index, cell) in row.iter().take(columns).enumerate() {
                widths[index] = widths[index].max(cell.chars().count());
            }
        }
        write_row(out, &self.headers, &widths)?;
        for row in &self.rows {
            write_row(out, row, &widths)?;
        }
        Ok(())
    }
}

fn write_row(out: &mut dyn Write, cells: &[String], widths: &[usize]) -> Result<()> {
    let mut line = String::new();
    for (index, width) in widths.iter().enumerate() {
        let cell = cells.get(index).map(String::as_str).unwrap_or_default();
        if index > 0 {
            line.push_str("  ");
        }
        line.push_str(cell);
        let padding = width.saturating_sub(cell.chars().count());
        line.extend(std::iter::repeat_n(' ', padding));
    }
    writeln!(out, "{}", line.trim_end())?;
    Ok(())
}

/// Writes `key: value` lines with the values aligned.
pub fn write_fields(out: &mut dyn Write, fields: &[(&str, String)]) -> Result<()> {
    let width = fields.iter().map(|(key, _)| key.chars().count()).max().unwrap_or(0);
    for (key, value) in fields {
        let label = format!("{key}:");
        writeln!(out, "{label:<width$}  {value}", width = width + 1)?;
    }
    Ok(())
}

/// Writes `value` as one pretty-printed JSON document and a newline.
pub fn write_json(out: &mut dyn Write, value: &Value) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Writes `value` as one compact JSON document on its own line (JSON Lines).
pub fn write_json_line(out: &mut dyn Write, value: &Value) -> Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Parses what a command printed with `--json` (one document), for scripts
/// and tests that embed the CLI with [`super::run`].
pub fn parse_json(text: &str) -> serde_json::Result<JsonValue> {
    serde_json::from_str(text)
}

const BASE64_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648, with padding).
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut encoded = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let first = chunk[0];
        let second = chunk.get(1).copied().unwrap_or(0);
        let third = chunk.get(2).copied().unwrap_or(0);
        let group = (u32::from(first) << 16) | (u32::from(second) << 8) | u32::from(third);
        let symbols = [(group >> 18) & 63, (group >> 12) & 63, (group >> 6) & 63, group & 63];
        for (position, symbol) in symbols.iter().enumerate() {
            if position <= chunk.len() {
                encoded.push(char::from(BASE64_ALPHABET[*symbol as usize]));
            } else {
                encoded.push('=');
            }
        }
    }
    encoded
}

/// Adds `bytes` to `object` as text under `name` when valid UTF-8, else as
/// base64 under `<name>_base64`.
pub fn insert_bytes(object: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            object.insert(name.to_owned(), Value::String(text.to_owned()));
        }
        Err(_) => {
            object.insert(format!("{name}_base64"), Value::String(base64_encode(bytes)));
        }
    }
}

/// Bytes for a person: the text when it is valid UTF-8 without control
/// characters other than newlines and tabs (newlines shown as `\n`), else
/// `<N bytes, base64 ...>`.
pub fn bytes_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(|character| character.is_control() && !matches!(character, '\n' | '\t')) => {
            text.replace('\n', "\\n")
        }
        _ => format!("<{} bytes, base64 {}>", bytes.len(), base64_encode(bytes)),
    }
}

/// A protobuf timestamp as a UTC time, if it is valid.
pub fn to_datetime(timestamp: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    DateTime::<Utc>::from_timestamp(timestamp.seconds, nanos)
}

/// RFC 3339 with the precision the timestamp has (`2024-05-01T12:00:00.25Z`).
pub fn rfc3339(timestamp: &prost_types::Timestamp) -> String {
    match to_datetime(timestamp) {
        Some(time) => time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => format!("invalid({}s {}ns)", timestamp.seconds, timestamp.nanos),
    }
}

/// The current time as a protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    workbroker_api::time::timestamp_now()
}

/// A timestamp for a table: RFC 3339 to the second; `-` when unset.
pub fn time_cell(timestamp: Option<&prost_types::Timestamp>) -> String {
    match timestamp {
        None => "-".to_owned(),
        Some(timestamp) => match to_datetime(timestamp) {
            Some(time) => time.to_rfc3339_opts(SecondsFormat::Secs, true),
            None => rfc3339(timestamp),
        },
    }
}

/// A timestamp for JSON: RFC 3339 string, or null when unset.
pub fn time_json(timestamp: Option<&prost_types::Timestamp>) -> Value {
    timestamp.map_or(Value::Null, |timestamp| Value::String(rfc3339(timestamp)))
}

/// Seconds of a protobuf duration as a float (negative durations kept).
pub fn duration_seconds(duration: &prost_types::Duration) -> f64 {
    duration.seconds as f64 + f64::from(duration.nanos) / 1e9
}

/// A duration for JSON: seconds as a number, or null when unset.
pub fn duration_json(duration: Option<&prost_types::Duration>) -> Value {
    duration.map_or(Value::Null, |duration| json!(duration_seconds(duration)))
}

/// A duration for a person: `0.5s`, `30s`, `2m05s`, `1h02m03s`, `3d04h`; `-` when unset.
pub fn duration_cell(duration: Option<&prost_types::Duration>) -> String {
    match duration {
        None => "-".to_owned(),
        Some(duration) => match workbroker_api::time::duration_from_proto(duration) {
            Ok(duration) => human_duration(duration),
            Err(_) => format!("{}s", duration_seconds(duration)),
        },
    }
}

/// `duration` in the short human form of [`duration_cell`].
pub fn human_duration(duration: Duration) -> String {
    let total = duration.as_secs();
    if total < 60 {
        let seconds = duration.as_secs_f64();
        let text = format!("{seconds:.3}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        return format!("{text}s");
    }
    let (days, hours, minutes, seconds) = (total / 86_400, total / 3_600 % 24, total / 60 % 60, total % 60);
    if days > 0 {
        format!("{days}d{hours:02}h")
    } else if hours > 0 {
        format!("{hours}h{minutes:02}m{seconds:02}s")
    } else {
        format!("{minutes}m{seconds:02}s")
    }
}

/// Lowercase name of a job state (`available`), as the `--state` flag takes it.
pub fn state_name(state: i32) -> String {
    match v1::JobState::try_from(state) {
        Ok(v1::JobState::Unspecified) => "unspecified".to_owned(),
        Ok(known) => known.as_str_name().trim_start_matches("JOB_STATE_").to_ascii_lowercase(),
        Err(_) => format!("unknown({state})"),
    }
}

/// Name of a settle outcome without its prefix (`OK`, `STALE_LEASE`).
pub fn outcome_name(outcome: i32) -> String {
    match v1::Outcome::try_from(outcome) {
        Ok(known) => known.as_str_name().trim_start_matches("OUTCOME_").to_owned(),
        Err(_) => format!("UNKNOWN({outcome})"),
    }
}

/// `yes` / `no`.
pub fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

/// `attempt/max_attempts` of a job.
pub fn attempts_cell(job: &v1::Job) -> String {
    format!("{}/{}", job.attempt, job.max_attempts)
}

/// `text` cut to `max` characters (with `...`), line breaks folded into spaces.
pub fn truncate(text: &str, max: usize) -> String {
    let flat = text.replace(['\n', '\r'], " ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}

/// A job as JSON, every field of the wire message.
pub fn job_json(job: &v1::Job) -> Value {
    let mut object = Map::new();
    object.insert("job_id".into(), json!(job.job_id));
    object.insert("queue".into(), json!(job.queue));
    object.insert("kind".into(), json!(job.kind));
    object.insert("state".into(), json!(state_name(job.state)));
    insert_bytes(&mut object, "payload", &job.payload);
    let attributes: std::collections::BTreeMap<&String, &String> = job.attributes.iter().collect();
    object.insert("attributes".into(), json!(attributes));
    object.insert("priority".into(), json!(job.priority));
    object.insert("attempt".into(), json!(job.attempt));
    object.insert("max_attempts".into(), json!(job.max_attempts));
    object.insert("ordering_key".into(), json!(job.ordering_key));
    object.insert("dedup_key".into(), json!(job.dedup_key));
    object.insert("sequence".into(), json!(job.sequence));
    object.insert("created_at".into(), time_json(job.created_at.as_ref()));
    object.insert("run_at".into(), time_json(job.run_at.as_ref()));
    object.insert("finished_at".into(), time_json(job.finished_at.as_ref()));
    object.insert("last_error".into(), json!(job.last_error));
    insert_bytes(&mut object, "result", &job.result);
    object.insert("leased_by".into(), json!(job.leased_by));
    object.insert("lease_expires_at".into(), time_json(job.lease_expires_at.as_ref()));
    Value::Object(object)
}

/// A job as `key: value` lines.
pub fn write_job(out: &mut dyn Write, job: &v1::Job) -> Result<()> {
    let mut attributes: Vec<String> = job.attributes.iter().map(|(key, value)| format!("{key}={value}")).collect();
    attributes.sort();
    let mut fields = vec![
        ("job id", job.job_id.clone()),
        ("queue", job.queue.clone()),
        ("kind", job.kind.clone()),
        ("state", state_name(job.state)),
        ("attempt", attempts_cell(job)),
        ("priority", job.priority.to_string()),
        ("sequence", job.sequence.to_string()),
        ("payload", bytes_text(&job.payload)),
        ("attributes", attributes.join(", ")),
        ("ordering key", job.ordering_key.clone()),
        ("dedup key", job.dedup_key.clone()),
        ("created at", time_cell(job.created_at.as_ref())),
        ("run at", time_cell(job.run_at.as_ref())),
        ("finished at", time_cell(job.finished_at.as_ref())),
    ];
    if !job.leased_by.is_empty() || job.lease_expires_at.is_some() {
        fields.push(("leased by", job.leased_by.clone()));
        fields.push(("lease expires at", time_cell(job.lease_expires_at.as_ref())));
    }
    fields.push(("last error", job.last_error.replace('\n', "\\n")));
    fields.push(("result", bytes_text(&job.result)));
    write_fields(out, &fields)
}

/// Queue settings as JSON.
pub fn queue_info_json(info: &v1::QueueInfo) -> Value {
    json!({
        "queue": info.queue,
        "paused": info.paused,
        "max_attempts": info.max_attempts,
        "lease_duration": duration_json(info.lease_duration.as_ref()),
        "backoff_initial": duration_json(info.backoff_initial.as_ref()),
        "backoff_max": duration_json(info.backoff_max.as_ref()),
        "backoff_multiplier": info.backoff_multiplier,
        "backoff_jitter": info.backoff_jitter,
        "completed_retention": duration_json(info.completed_retention.as_ref()),
        "created_at": time_json(info.created_at.as_ref()),
    })
}

/// Queue settings as `key: value` lines.
pub fn write_queue_info(out: &mut dyn Write, info: &v1::QueueInfo) -> Result<()> {
    write_fields(
        out,
        &[
            ("queue", info.queue.clone()),
            ("paused", yes_no(info.paused)),
            ("max attempts", info.max_attempts.to_string()),
            ("lease duration", duration_cell(info.lease_duration.as_ref())),
            ("backoff initial", duration_cell(info.backoff_initial.as_ref())),
            ("backoff max", duration_cell(info.backoff_max.as_ref())),
            ("backoff multiplier", info.backoff_multiplier.to_string()),
            ("backoff jitter", info.backoff_jitter.to_string()),
            ("completed retention", duration_cell(info.completed_retention.as_ref())),
            ("created at", time_cell(info.created_at.as_ref())),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let vectors: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in vectors {
            assert_eq!(base64_encode(input), expected);
        }
        assert_eq!(base64_encode(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn payloads_are_text_when_utf8_else_base64() {
        let mut object = Map::new();
        insert_bytes(&mut object, "payload", b"hello");
        insert_bytes(&mut object, "result", &[0xff, 0x00]);
        assert_eq!(object["payload"], json!("hello"));
        assert_eq!(object["result_base64"], json!("/wA="));
        assert!(!object.contains_key("result"));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(500)), "0.5s");
        assert_eq!(human_duration(Duration::from_secs(30)), "30s");
        assert_eq!(human_duration(Duration::ZERO), "0s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(human_duration(Duration::from_secs(3_723)), "1h02m03s");
        assert_eq!(human_duration(Duration::from_secs(273_600)), "3d04h");
    }

    #[test]
    fn tables_align_columns() -> Result<()> {
        let mut table = Table::new(&["ID", "STATE"]);
        table.push(vec!["1".into(), "available".into()]);
        table.push(vec!["12345".into(), "dead".into()]);
        let mut out = Vec::new();
        table.write(&mut out)?;
        assert_eq!(String::from_utf8_lossy(&out), "ID     STATE\n1      available\n12345  dead\n");
        Ok(())
    }

    #[test]
    fn state_and_outcome_names_drop_their_prefix() {
        assert_eq!(state_name(v1::JobState::Available as i32), "available");
        assert_eq!(state_name(42), "unknown(42)");
        assert_eq!(outcome_name(v1::Outcome::StaleLease as i32), "STALE_LEASE");
    }
}
