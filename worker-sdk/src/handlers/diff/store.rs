//! The `diff_metrics` table in PostgreSQL.

use sqlx::PgPool;

use crate::jobs::DiffResult;

/// Default schema of the handlers' tables.
pub const DEFAULT_SCHEMA: &str = "workbroker_handlers";

/// Why metrics could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The schema name is not a plain identifier.
    #[error("invalid schema name {0:?}: use 1 to 63 of [a-z0-9_], not starting with a digit")]
    InvalidSchema(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Stored metrics, keyed by the unordered digest pair.
#[derive(Clone, Debug)]
pub struct MetricsStore {
    pool: PgPool,
    schema: String,
}

/// A row of `diff_metrics`, with `digest_a <= digest_b`.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredMetrics {
    /// The smaller digest of the pair.
    pub digest_a: String,
    /// The larger digest of the pair.
    pub digest_b: String,
    /// Metrics with `left` = `digest_a`.
    pub result: DiffResult,
}

fn valid_schema(schema: &str) -> bool {
    !schema.is_empty()
        && schema.len() <= 63
        && !schema.starts_with(|character: char| character.is_ascii_digit())
        && schema.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
}

impl MetricsStore {
    /// A store in `schema` (see [`DEFAULT_SCHEMA`]); call
    /// [`MetricsStore::setup`] once before use.
    pub fn new(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        if !valid_schema(schema) {
            return Err(StoreError::InvalidSchema(schema.to_owned()));
        }
        Ok(Self { pool, schema: schema.to_owned() })
    }

    /// Creates the schema and the `diff_metrics` table if missing.
    pub async fn setup(&self) -> Result<(), StoreError> {
        let schema = &self.schema;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")))
            .execute(&self.pool)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".diff_metrics (
                digest_a text NOT NULL,
                digest_b text NOT NULL,
                differing_pixels bigint NOT NULL,
                total_pixels bigint NOT NULL,
                differing_percent double precision NOT NULL,
                max_channel_difference integer NOT NULL,
                dimensions_differ boolean NOT NULL,
                score double precision NOT NULL,
                a_width integer NOT NULL,
                a_height integer NOT NULL,
                b_width integer NOT NULL,
                b_height integer NOT NULL,
                computed_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (digest_a, digest_b),
                CHECK (digest_a <= digest_b)
            )"
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Inserts or replaces the metrics of the pair (left, right).
    pub async fn upsert(&self, left: &str, right: &str, result: &DiffResult) -> Result<(), StoreError> {
        let (digest_a, digest_b, a, b) = if left <= right {
            (left, right, (result.left_width, result.left_height), (result.right_width, result.right_height))
        } else {
            (right, left, (result.right_width, result.right_height), (result.left_width, result.left_height))
        };
        let to_i64 = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let to_i32 = |value: u32| i32::try_from(value).unwrap_or(i32::MAX);
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO \"{}\".diff_metrics AS m
                (digest_a, digest_b, differing_pixels, total_pixels, differing_percent,
                 max_channel_difference, dimensions_differ, score, a_width, a_height, b_width, b_height)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (digest_a, digest_b) DO UPDATE SET
                differing_pixels = EXCLUDED.differing_pixels,
                total_pixels = EXCLUDED.total_pixels,
                differing_percent = EXCLUDED.differing_percent,
                max_channel_difference = EXCLUDED.max_channel_difference,
                dimensions_differ = EXCLUDED.dimensions_differ,
                score = EXCLUDED.score,
                a_width = EXCLUDED.a_width,
                a_height = EXCLUDED.a_height,
                b_width = EXCLUDED.b_width,
                b_height = EXCLUDED.b_height,
                computed_at = now()",
            self.schema
        )))
        .bind(digest_a)
        .bind(digest_b)
        .bind(to_i64(result.differing_pixels))
        .bind(to_i64(result.total_pixels))
        .bind(result.differing_percent)
        .bind(to_i32(result.max_channel_difference))
        .bind(result.dimensions_differ)
        .bind(result.score)
        .bind(to_i32(a.0))
        .bind(to_i32(a.1))
        .bind(to_i32(b.0))
        .bind(to_i32(b.1))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The stored metrics of the pair, in either order.
    pub async fn get(&self, left: &str, right: &str) -> Result<Option<StoredMetrics>, StoreError> {
        let (digest_a, digest_b) = if left <= right { (left, right) } else { (right, left) };
        type Row = (i64, i64, f64, i32, bool, f64, i32, i32, i32, i32);
        let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT differing_pixels, total_pixels, differing_percent, max_channel_difference,
                    dimensions_differ, score, a_width, a_height, b_width, b_height
             FROM \"{}\".diff_metrics WHERE digest_a = $1 AND digest_b = $2",
            self.schema
        )))
        .bind(digest_a)
        .bind(digest_b)
        .fetch_optional(&self.pool)
        .await?;
        let to_u64 = |value: i64| u64::try_from(value).unwrap_or(0);
        let to_u32 = |value: i32| u32::try_from(value).unwrap_or(0);
        Ok(row.map(|row| StoredMetrics {
            digest_a: digest_a.to_owned(),
            digest_b: digest_b.to_owned(),
            result: DiffResult {
                differing_pixels: to_u64(row.0),
                total_pixels: to_u64(row.1),
                differing_percent: row.2,
                max_channel_difference: to_u32(row.3),
                dimensions_differ: row.4,
                score: row.5,
                left_width: to_u32(row.6),
                left_height: to_u32(row.7),
                right_width: to_u32(row.8),
                right_height: to_u32(row.9),
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(super::valid_schema("workbroker_handlers"));
        assert!(!super::valid_schema("bad\"name"));
        assert!(!super::valid_schema("Upper"));
        assert!(!super::valid_schema("1abc"));
        assert!(!super::valid_schema(""));
    }
}
