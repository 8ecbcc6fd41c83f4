//! Partitions: a deployment's keyspace split into `P` copies of the whole per-shard
//! structure ([`crate::keys::Keys`]), each under its own hash tag `{0}`…`{P-1}`, so a Redis
//! Cluster spreads them over its primaries. `P` is the `partitions` setting (default 1),
//! fixed for a deployment's layout.
//!
//! **Which partition a process lives in.** Always `partition_of(id) = fold(fnv1a64(id)) mod
//! P` of its process id: FNV-1a, 64 bits, over the id's UTF-8 bytes (offset basis
//! `0xcbf29ce484222325`, prime `0x100000001b3`), xor-folded to 32 bits (`(h >> 32) ^ (h &
//! 0xffffffff)`, as the FNV authors advise for shorter hashes: the low bits of FNV alone
//! depend only on the low bits of each byte), so any id maps to its partition without a
//! lookup. A submission picks
//! its partition first, and the id then follows it ([`route`]):
//! - with an idempotency key: `partition_of(key)`, so the key's check and the process it
//!   names stay in one slot; an id the scheduler generates is drawn until it maps there
//!   ([`new_id_in`]), and an id the submitter chose must map there too (else it is
//!   refused: [`RouteError::Mismatch`]);
//! - else, with an id the submitter chose: `partition_of(id)`;
//! - else: any partition (the gateway spreads them at random; a stream submitter may write
//!   to any partition's submission stream), and the generated id is drawn to map there.
//!
//! With `P = 1` every hash maps to partition 0 and ids are plain UUID v7, as before
//! partitions existed.

use rand::Rng;

/// The most partitions a deployment may have (`partitions` is validated against it).
pub const MAX_PARTITIONS: u16 = 1024;

/// FNV-1a, 64 bits, of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a 64 of `bytes` xor-folded to 32 bits.
pub fn fnv1a32_folded(bytes: &[u8]) -> u32 {
    let h = fnv1a64(bytes);
    ((h >> 32) ^ (h & 0xffff_ffff)) as u32
}

/// The partition `key` (a process id or an idempotency key) maps to among `partitions`.
pub fn partition_of(key: &str, partitions: u16) -> u16 {
    if partitions <= 1 {
        0
    } else {
        (fnv1a32_folded(key.as_bytes()) % u32::from(partitions)) as u16
    }
}

/// A new process id (UUID v7) that maps to `partition` among `partitions`: ids are drawn
/// until one does (on average `partitions` draws of a few hundred nanoseconds each; with
/// one partition the first id).
pub fn new_id_in(partition: u16, partitions: u16) -> String {
    loop {
        let id = uuid::Uuid::now_v7().to_string();
        if partition_of(&id, partitions) == partition {
            return id;
        }
    }
}

/// Why a submission cannot go to one partition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The submitter chose an id and an idempotency key that map to different partitions:
    /// the key's check and the process could not share a slot.
    #[error(
        "id {id} maps to partition {id_partition} but its idempotency key to partition {key_partition} (of {partitions}); give one of the two, or an id that maps where the key does"
    )]
    Mismatch {
        id: String,
        id_partition: u16,
        key_partition: u16,
        partitions: u16,
    },
}

/// The partition a submission belongs to (see the module doc), or `None` when any will do
/// (neither an id nor an idempotency key).
pub fn route(
    id: Option<&str>,
    idempotency_key: Option<&str>,
    partitions: u16,
) -> Result<Option<u16>, RouteError> {
    match (id, idempotency_key) {
        (Some(id), Some(key)) => {
            let (id_partition, key_partition) =
                (partition_of(id, partitions), partition_of(key, partitions));
            if id_partition != key_partition {
                return Err(RouteError::Mismatch {
                    id: id.to_string(),
                    id_partition,
                    key_partition,
                    partitions,
                });
            }
            Ok(Some(key_partition))
        }
        (None, Some(key)) => Ok(Some(partition_of(key, partitions))),
        (Some(id), None) => Ok(Some(partition_of(id, partitions))),
        (None, None) => Ok(None),
    }
}

/// A partition chosen at random (a submission with neither id nor idempotency key).
pub fn any_partition(partitions: u16) -> u16 {
    if partitions <= 1 {
        0
    } else {
        rand::rng().random_range(0..partitions)
    }
}

/// Which partition a reader reads next, and how long that read may block. One reader
/// serves several partitions over one blocking connection (a worker's job reader, a
/// scheduler's stream readers), so the connections a service holds do not grow with `P`:
/// - one partition: every read blocks for the full `block`, as without partitions;
/// - several, while work is found: one non-blocking read per partition in strict rotation
///   (a busy partition gets one read per turn, like every other: none starves);
/// - once a whole turn found nothing: blocking reads of `block / n` (at least
///   [`Rotation::MIN_BLOCK`]) in the same rotation, so an idle reader sends about `n`
///   reads per `block` and new work in any partition waits at most about one `block`.
#[derive(Debug, Clone)]
pub struct Rotation {
    partitions: Vec<u16>,
    next: usize,
    /// Reads in a row that found nothing.
    empty: usize,
    block: std::time::Duration,
}

impl Rotation {
    /// The shortest block of an idle rotation.
    pub const MIN_BLOCK: std::time::Duration = std::time::Duration::from_millis(10);

    /// A rotation over `partitions` (not empty) with the reader's full `block`.
    pub fn new(partitions: Vec<u16>, block: std::time::Duration) -> Self {
        let partitions = if partitions.is_empty() {
            vec![0]
        } else {
            partitions
        };
        Self {
            partitions,
            next: 0,
            empty: 0,
            block,
        }
    }

    /// Every partition of a deployment of `partitions`.
    pub fn all(partitions: u16, block: std::time::Duration) -> Self {
        Self::new((0..partitions.max(1)).collect(), block)
    }

    /// The partition to read next and how long the read may block (`ZERO`: not at all).
    pub fn next_read(&mut self) -> (u16, std::time::Duration) {
        let n = self.partitions.len();
        let p = self.partitions[self.next % n];
        self.next = (self.next + 1) % n;
        let block = if n == 1 {
            self.block
        } else if self.empty >= n {
            (self.block / n as u32).max(Self::MIN_BLOCK)
        } else {
            std::time::Duration::ZERO
        };
        (p, block)
    }

    /// Records how many entries the last read returned.
    pub fn found(&mut self, entries: usize) {
        if entries == 0 {
            self.empty = self.empty.saturating_add(1);
        } else {
            self.empty = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        // From the FNV reference (draft-eastlake-fnv): "" , "a", "foobar".
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn one_partition_maps_everything_to_zero_and_keeps_plain_ids() {
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(partition_of("anything", 0), 0);
        let id = new_id_in(0, 1);
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert_eq!(route(Some("a"), Some("b"), 1), Ok(Some(0)));
        assert_eq!(any_partition(1), 0);
    }

    #[test]
    fn a_known_id_maps_to_a_fixed_partition() {
        // Written down so a change of the hash (which would strand every process of a
        // partitioned deployment) fails here first.
        assert_eq!(fnv1a64(b"order-42"), 0x7d1d_eb86_a056_62d4);
        assert_eq!(fnv1a32_folded(b"order-42"), 0xdd4b_8952);
        assert_eq!(partition_of("order-42", 8), 2);
        assert_eq!(partition_of("order-42", 4), 2);
    }

    #[test]
    fn a_mismatched_id_and_key_are_refused() {
        let (id, key) = (0..100)
            .map(|i| (format!("id-{i}"), format!("key-{i}")))
            .find(|(i, k)| partition_of(i, 4) != partition_of(k, 4))
            .unwrap();
        assert!(matches!(
            route(Some(&id), Some(&key), 4),
            Err(RouteError::Mismatch { partitions: 4, .. })
        ));
        assert_eq!(route(None, Some(&key), 4), Ok(Some(partition_of(&key, 4))));
        assert_eq!(route(Some(&id), None, 4), Ok(Some(partition_of(&id, 4))));
        assert_eq!(route(None, None, 4), Ok(None));
    }

    proptest! {
        #[test]
        fn generated_ids_map_back_to_their_partition(p in 1u16..=64, pick in 0u16..64) {
            let partition = pick % p;
            let id = new_id_in(partition, p);
            prop_assert_eq!(partition_of(&id, p), partition);
            prop_assert!(uuid::Uuid::parse_str(&id).is_ok());
        }

        #[test]
        fn partitions_are_in_range_and_stable(key in "[A-Za-z0-9_-]{1,64}", p in 1u16..=MAX_PARTITIONS) {
            let q = partition_of(&key, p);
            prop_assert!(q < p);
            prop_assert_eq!(q, partition_of(&key, p));
        }
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut seen = [0u32; 8];
        for i in 0..8000 {
            seen[partition_of(&format!("order-{i}"), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (900..1100).contains(&n)), "{seen:?}");
        // Keys that differ only in the high bits of one byte ('1' and '9', '0' and '8')
        // still spread: the fold mixes the high half of the hash into the low one.
        let spread: std::collections::BTreeSet<u16> = (0..10)
            .map(|d| partition_of(&format!("order-{d}"), 8))
            .collect();
        assert!(spread.len() >= 5, "{spread:?}");
    }

    #[test]
    fn one_partition_always_blocks_fully() {
        let mut r = Rotation::all(1, Duration::from_millis(1000));
        for _ in 0..3 {
            assert_eq!(r.next_read(), (0, Duration::from_millis(1000)));
            r.found(0);
        }
    }

    #[test]
    fn a_rotation_visits_every_partition_and_blocks_only_after_a_quiet_turn() {
        let mut r = Rotation::all(4, Duration::from_millis(1000));
        // Busy: non-blocking reads in strict rotation, whatever one partition holds.
        let mut order = vec![];
        for _ in 0..8 {
            let (p, block) = r.next_read();
            assert_eq!(block, Duration::ZERO);
            order.push(p);
            r.found(usize::from(p == 0)); // only partition 0 has work
        }
        assert_eq!(order, [0, 1, 2, 3, 0, 1, 2, 3]);
        // A whole turn with nothing: short blocking reads, still rotating.
        for _ in 0..4 {
            r.next_read();
            r.found(0);
        }
        let (p, block) = r.next_read();
        assert_eq!((p, block), (0, Duration::from_millis(250)));
        r.found(3);
        assert_eq!(r.next_read(), (1, Duration::ZERO));
        // Many partitions: the idle block has a floor.
        let mut r = Rotation::all(1024, Duration::from_millis(1000));
        for _ in 0..1024 {
            r.next_read();
            r.found(0);
        }
        assert_eq!(r.next_read().1, Rotation::MIN_BLOCK);
    }
}
