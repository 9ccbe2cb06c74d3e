//! A bounded least-recently-used cache of decoded images.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::image::DecodedImage;

/// Default bound of the cache: 256 MiB of decoded pixels.
pub const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, (Arc<DecodedImage>, u64)>,
    /// Use stamp → key, oldest first.
    order: BTreeMap<u64, String>,
    bytes: usize,
    clock: u64,
}

/// Decoded images by key (source and digest), evicting the least recently
/// used once their total size passes the bound. Images are content-addressed,
/// so a cached image never goes stale.
#[derive(Debug)]
pub struct ImageCache {
    limit: usize,
    inner: Mutex<Inner>,
}

impl ImageCache {
    /// A cache holding at most `limit` bytes of decoded images.
    pub fn new(limit: usize) -> Self {
        Self { limit, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached image, marked as just used.
    pub fn get(&self, key: &str) -> Option<Arc<DecodedImage>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let stamp = inner.clock;
        let (image, old_stamp) = inner.entries.get_mut(key).map(|(image, used)| {
            let old = *used;
            *used = stamp;
            (image.clone(), old)
        })?;
        inner.order.remove(&old_stamp);
        inner.order.insert(stamp, key.to_owned());
        Some(image)
    }

    /// Adds an image (images larger than the whole bound are not kept).
    pub fn insert(&self, key: &str, image: Arc<DecodedImage>) {
        let size = image.memory_bytes();
        if size > self.limit {
            return;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let stamp = inner.clock;
        if let Some((old, old_stamp)) = inner.entries.remove(key) {
            inner.order.remove(&old_stamp);
            inner.bytes -= old.memory_bytes();
        }
        while inner.bytes + size > self.limit {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some((evicted, _)) = inner.entries.remove(&oldest) {
                inner.bytes -= evicted.memory_bytes();
            }
        }
        inner.bytes += size;
        inner.entries.insert(key.to_owned(), (image, stamp));
        inner.order.insert(stamp, key.to_owned());
    }

    /// Images cached now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes cached now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bytes: usize) -> Arc<DecodedImage> {
        Arc::new(DecodedImage { width: 1, height: 1, rgba: vec![0; bytes] })
    }

    #[test]
    fn evicts_the_least_recently_used_within_the_bound() {
        let one = image(100).memory_bytes();
        let cache = ImageCache::new(one * 2);
        cache.insert("a", image(100));
        cache.insert("b", image(100));
        assert!(cache.get("a").is_some());
        cache.insert("c", image(100));
        assert!(cache.get("b").is_none(), "b was least recently used");
        assert!(cache.get("a").is_some());
        assert!(cache.get("c").is_some());
        assert!(cache.bytes() <= one * 2);
        cache.insert("huge", image(one * 10));
        assert!(cache.get("huge").is_none());
        assert_eq!(cache.len(), 2);
    }
}
