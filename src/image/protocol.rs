//! `[protocol]`: the order in which an online method meets the corrupted variants (the
//! protocols of the field's benchmark library, mariodoebler/test-time-adaptation).
//!
//! - `reset_each_shift` (default): each variant is its own stream from the source
//!   weights (one stream per corruption and severity), as dtta always did.
//! - `continual`: one stream, never reset, with no signal at a change: each shard's
//!   samples through the variants in config order (`[corrupt] kinds`, then
//!   `severities`; `clean` first when on), then the next shard's. With the evaluation
//!   set in one shard this is the benchmark's order; across shards it is shard-major.
//! - `gradual`: per corruption, the severities up and back down (`[1,2,3,4,5]` gives
//!   1,2,3,4,5,4,3,2,1); a shard's samples are split into that many contiguous runs, run
//!   k at the k-th severity, so each sample appears once per corruption.
//! - `mixed`: every (sample, variant) pair of a shard in one seeded shuffle, so
//!   consecutive images, and the images of one batch, come from different corruptions.
//!
//! Invariant: the stream order is a function of the config, the run seed and the shards'
//! contents and plan order, never of arrival: the three stream protocols read one shard
//! at a time, in plan order (`runtime.shards_in_flight` is 1 for them), and a shard's
//! samples are held until its end so they can be emitted in protocol order.
//!
//! Where it cannot be order-free: the one stream runs across this worker's shards, so it
//! differs with the worker split, and a resumed run starts it again from the source
//! weights at the first uncommitted shard; a shard that fails leaves the stream (a later
//! run adapts it with the stream starting over).

use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::sample::Variant;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    ResetEachShift,
    Continual,
    Gradual,
    Mixed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolConfig {
    pub kind: Protocol,
}

impl ProtocolConfig {
    pub fn is_default(&self) -> bool {
        self.kind == Protocol::ResetEachShift
    }

    /// Whether every variant feeds one stream (all but `reset_each_shift`).
    pub fn one_stream(&self) -> bool {
        self.kind != Protocol::ResetEachShift
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            Protocol::ResetEachShift => "reset_each_shift",
            Protocol::Continual => "continual",
            Protocol::Gradual => "gradual",
            Protocol::Mixed => "mixed",
        }
    }

    /// The stream of one shard of `samples` samples: (sample index, variant) in the
    /// order the method meets them. `variants` are the config's, in config order;
    /// `seed` orders `mixed` (the run seed mixed with the shard's id).
    pub fn sequence(&self, samples: usize, variants: &[Variant], seed: u64) -> Vec<(usize, Variant)> {
        match self.kind {
            Protocol::ResetEachShift | Protocol::Continual => variants
                .iter()
                .flat_map(|&v| (0..samples).map(move |i| (i, v)))
                .collect(),
            Protocol::Gradual => {
                let mut out = Vec::new();
                let mut i = 0;
                while i < variants.len() {
                    let corruption = variants[i].corruption;
                    let mut up: Vec<u8> = variants[i..]
                        .iter()
                        .take_while(|v| v.corruption == corruption)
                        .map(|v| v.severity)
                        .collect();
                    i += up.len();
                    if corruption.is_none() {
                        out.extend((0..samples).map(|s| (s, Variant::CLEAN)));
                        continue;
                    }
                    up.sort_unstable();
                    let steps: Vec<u8> = up.iter().chain(up.iter().rev().skip(1)).copied().collect();
                    out.extend((0..samples).map(|s| {
                        let step = s * steps.len() / samples.max(1);
                        (
                            s,
                            Variant {
                                corruption,
                                severity: steps[step],
                            },
                        )
                    }));
                }
                out
            }
            Protocol::Mixed => {
                let mut all: Vec<(usize, Variant)> = variants
                    .iter()
                    .flat_map(|&v| (0..samples).map(move |i| (i, v)))
                    .collect();
                let mut rng = Rng::new(seed);
                for j in (1..all.len()).rev() {
                    let k = rng.int_in(0, j as i64 + 1) as usize;
                    all.swap(j, k);
                }
                all
            }
        }
    }
}

/// The seed of a shard's `mixed` order: the run seed and the shard id, FNV-1a mixed.
pub fn shard_seed(seed: u64, shard: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.to_le_bytes().iter().chain(shard.as_bytes()) {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::corrupt::Corruption;

    fn variants(kinds: &[Corruption], severities: &[u8], clean: bool) -> Vec<Variant> {
        let mut v: Vec<Variant> = clean.then_some(Variant::CLEAN).into_iter().collect();
        for &c in kinds {
            v.extend(severities.iter().map(|&severity| Variant {
                corruption: Some(c),
                severity,
            }));
        }
        v
    }

    fn protocol(kind: Protocol) -> ProtocolConfig {
        ProtocolConfig { kind }
    }

    #[test]
    fn continual_runs_each_variant_over_every_sample_in_config_order() {
        let v = variants(&[Corruption::ALL[1], Corruption::ALL[0]], &[5], true);
        let s = protocol(Protocol::Continual).sequence(3, &v, 0);
        let order: Vec<(usize, Variant)> = [v[0], v[1], v[2]]
            .iter()
            .flat_map(|&x| (0..3).map(move |i| (i, x)))
            .collect();
        assert_eq!(s, order);
    }

    #[test]
    fn gradual_goes_up_and_down_the_severities_once_per_sample_and_corruption() {
        let kinds = [Corruption::ALL[0], Corruption::ALL[5]];
        let v = variants(&kinds, &[1, 2, 3, 4, 5], false);
        let s = protocol(Protocol::Gradual).sequence(18, &v, 0);
        assert_eq!(s.len(), 36, "each sample once per corruption");
        for (c, part) in kinds.iter().zip(s.chunks(18)) {
            assert!(part.iter().all(|(_, x)| x.corruption == Some(*c)));
            assert_eq!(
                part.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
                (0..18).collect::<Vec<_>>()
            );
            let steps: Vec<u8> = part.iter().map(|(_, x)| x.severity).collect();
            assert_eq!(steps, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1]);
        }
        // Fewer samples than steps: the stream still visits every sample once.
        let few = protocol(Protocol::Gradual).sequence(4, &v, 0);
        assert_eq!(few.iter().filter(|(_, x)| x.corruption == Some(kinds[0])).count(), 4);
    }

    #[test]
    fn mixed_is_a_seeded_permutation_of_every_pair() {
        let v = variants(&Corruption::ALL[..4], &[3], false);
        let p = protocol(Protocol::Mixed);
        let a = p.sequence(10, &v, shard_seed(7, "shard-000000"));
        assert_eq!(
            a,
            p.sequence(10, &v, shard_seed(7, "shard-000000")),
            "same seed, same order"
        );
        assert_ne!(a, p.sequence(10, &v, shard_seed(7, "shard-000001")));
        let mut sorted = a.clone();
        sorted.sort();
        let mut all = protocol(Protocol::Continual).sequence(10, &v, 0);
        all.sort();
        assert_eq!(sorted, all, "every (sample, variant) once");
        let changes = a.windows(2).filter(|w| w[0].1 != w[1].1).count();
        assert!(changes > 20, "interleaved: {changes} changes of corruption in 40");
    }
}
