//! Disk accounting of the image store (pure): what each image occupies, what deleting it (or a
//! set of images) would free when layers are shared between images, and the order in which
//! unused images are given up (least recently used first, as the kubelet's image GC).

use super::Image;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// One image with its disk figures, as `hako-shim images` and the agent's image GC see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageUsage {
    /// Normalised reference.
    pub reference: String,
    /// Config digest (the image id).
    pub id: String,
    /// Manifest digest.
    pub digest: String,
    /// Bytes of all its layers (what it needs on disk).
    pub size: u64,
    /// Bytes of the layers no other image has: what deleting this image alone frees.
    pub unique_size: u64,
    /// Layers it shares with at least one other image.
    pub shared_layers: usize,
    /// Unix seconds of the pull.
    pub pulled_at: u64,
    /// Unix seconds of the last use (a container created from it, or the pull).
    pub last_used: u64,
}

/// How many images reference each layer, and each layer's size.
fn layer_refs(images: &[Image]) -> HashMap<&str, (usize, u64)> {
    let mut refs: HashMap<&str, (usize, u64)> = HashMap::new();
    for i in images {
        // An image listing a layer twice still holds it once.
        let mut seen = HashSet::new();
        for (n, d) in i.layers.iter().enumerate() {
            if seen.insert(d.as_str()) {
                let size = i.layer_sizes.get(n).copied().unwrap_or(0);
                let e = refs.entry(d.as_str()).or_insert((0, size));
                e.0 += 1;
            }
        }
    }
    refs
}

/// The disk figures of every image; layers shared between images count once in the total
/// ([`total_size`]) and not in any image's `unique_size`.
pub fn usage_of(images: &[Image]) -> Vec<ImageUsage> {
    let refs = layer_refs(images);
    images
        .iter()
        .map(|i| {
            let mut seen = HashSet::new();
            let (mut size, mut unique, mut shared) = (0, 0, 0);
            for d in &i.layers {
                if !seen.insert(d.as_str()) {
                    continue;
                }
                let (n, s) = refs.get(d.as_str()).copied().unwrap_or((0, 0));
                size += s;
                if n <= 1 {
                    unique += s;
                } else {
                    shared += 1;
                }
            }
            ImageUsage {
                reference: i.reference.clone(),
                id: i.id.clone(),
                digest: i.digest.clone(),
                size,
                unique_size: unique,
                shared_layers: shared,
                pulled_at: i.pulled_at,
                last_used: i.last_used,
            }
        })
        .collect()
}

/// Bytes of the unpacked layers of `images`, each layer once.
pub fn total_size(images: &[Image]) -> u64 {
    layer_refs(images).values().map(|(_, s)| s).sum()
}

/// Tracks what deleting images one after the other frees: a layer is freed when the last
/// image that holds it goes, unless something else (a container's rootfs) keeps it.
#[derive(Debug, Clone)]
pub struct FreeTracker<'a> {
    refs: HashMap<&'a str, (usize, u64)>,
    keep_layers: &'a HashSet<String>,
}

impl<'a> FreeTracker<'a> {
    /// A tracker over every image of the store; `keep_layers` (layer digests) are never
    /// counted as freed.
    pub fn new(images: &'a [Image], keep_layers: &'a HashSet<String>) -> Self {
        Self {
            refs: layer_refs(images),
            keep_layers,
        }
    }

    /// Records the deletion of `image`; returns the bytes it frees now (its layers no remaining
    /// image holds and nothing keeps).
    pub fn remove(&mut self, image: &Image) -> u64 {
        let mut freed = 0;
        let mut seen = HashSet::new();
        for d in &image.layers {
            if !seen.insert(d.as_str()) {
                continue;
            }
            if let Some(e) = self.refs.get_mut(d.as_str()) {
                if e.0 == 0 {
                    continue;
                }
                e.0 -= 1;
                if e.0 == 0 && !self.keep_layers.contains(d) {
                    freed += e.1;
                }
            }
        }
        freed
    }

    /// The layers (digests) of `image` that no remaining image holds and nothing keeps.
    pub fn unreferenced<'b>(&self, image: &'b Image) -> Vec<&'b str> {
        let mut out: Vec<&str> = image
            .layers
            .iter()
            .map(String::as_str)
            .filter(|d| self.refs.get(d).is_none_or(|e| e.0 == 0) && !self.keep_layers.contains(*d))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The GC order of images: least recently used first, then oldest pull, then reference (the
/// kubelet sorts its candidates by last use, then by first detection).
pub fn lru_order(images: &mut [Image]) {
    images.sort_by(|a, b| {
        (a.last_used, a.pulled_at, &a.reference).cmp(&(b.last_used, b.pulled_at, &b.reference))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(r: &str, layers: &[(&str, u64)], last_used: u64) -> Image {
        Image {
            reference: r.into(),
            digest: format!("m-{r}"),
            id: format!("c-{r}"),
            config: Default::default(),
            layers: layers.iter().map(|(d, _)| d.to_string()).collect(),
            layer_sizes: layers.iter().map(|(_, s)| *s).collect(),
            pulled_at: 1,
            last_used,
        }
    }

    #[test]
    fn shared_layers_count_once() {
        let imgs = [
            img("a", &[("base", 100), ("a1", 10)], 5),
            img("b", &[("base", 100), ("b1", 20), ("b1", 20)], 5),
            img("c", &[("c1", 7)], 5),
        ];
        let u = usage_of(&imgs);
        assert_eq!(
            (u[0].size, u[0].unique_size, u[0].shared_layers),
            (110, 10, 1)
        );
        // A layer listed twice is held once.
        assert_eq!(
            (u[1].size, u[1].unique_size, u[1].shared_layers),
            (120, 20, 1)
        );
        assert_eq!((u[2].size, u[2].unique_size, u[2].shared_layers), (7, 7, 0));
        assert_eq!(total_size(&imgs), 137);
        assert_eq!(total_size(&[]), 0);
    }

    #[test]
    fn deleting_frees_a_shared_layer_with_its_last_image_only() {
        let imgs = [
            img("a", &[("base", 100), ("a1", 10)], 5),
            img("b", &[("base", 100), ("b1", 20)], 5),
        ];
        let none = HashSet::new();
        let mut t = FreeTracker::new(&imgs, &none);
        assert_eq!(t.unreferenced(&imgs[0]), Vec::<&str>::new());
        assert_eq!(t.remove(&imgs[0]), 10);
        assert_eq!(t.unreferenced(&imgs[0]), ["a1"]);
        assert_eq!(t.remove(&imgs[1]), 120);
        let mut u = t.unreferenced(&imgs[1]);
        u.sort();
        assert_eq!(u, ["b1", "base"]);
        // Removing twice frees nothing more.
        assert_eq!(t.remove(&imgs[1]), 0);
        // A layer a container's rootfs uses is never counted (nor offered for deletion).
        let keep: HashSet<String> = ["base".to_string()].into();
        let mut t = FreeTracker::new(&imgs, &keep);
        assert_eq!(t.remove(&imgs[0]) + t.remove(&imgs[1]), 30);
        assert!(!t.unreferenced(&imgs[1]).contains(&"base"));
    }

    #[test]
    fn least_recently_used_first() {
        let mut imgs = vec![
            img("new", &[], 30),
            img("old", &[], 10),
            img("mid-b", &[], 20),
            img("mid-a", &[], 20),
        ];
        imgs[2].pulled_at = 0;
        lru_order(&mut imgs);
        let order: Vec<_> = imgs.iter().map(|i| i.reference.as_str()).collect();
        assert_eq!(order, ["old", "mid-b", "mid-a", "new"]);
    }
}
