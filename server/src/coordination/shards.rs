//! Shard assignment: which live replica dispatches which shards first.
//!
//! [`assign`] is a pure function of the shard count, the live members and the
//! previous map. It is
//! - **complete**: every shard `0..shard_count` has exactly one owner (when
//!   there is at least one member);
//! - **balanced**: no member owns more than one shard above another;
//! - **sticky**: a shard keeps its owner unless that owner left or holds more
//!   than its balanced share, so a leave moves only the departed member's
//!   shards and a join moves only what the newcomer needs.
//!
//! Ownership only decides who looks at which jobs first; correctness never
//! depends on it (the database decides every lease).

use std::collections::{BTreeMap, BTreeSet};

/// A published shard map: owner per shard, and a generation that grows with
/// every published change.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardMap {
    pub generation: u64,
    pub shard_count: u32,
    /// Shards of each member, ascending.
    pub owners: BTreeMap<String, Vec<u32>>,
}

impl ShardMap {
    /// Owner of each shard.
    pub fn owner_by_shard(&self) -> BTreeMap<u32, String> {
        self.owners
            .iter()
            .flat_map(|(member, shards)| shards.iter().map(move |shard| (*shard, member.clone())))
            .collect()
    }

    /// Shards of `member` (empty if none).
    pub fn shards_of(&self, member: &str) -> Vec<u32> {
        self.owners.get(member).cloned().unwrap_or_default()
    }
}

/// Assigns `shard_count` shards to `members`, starting from `previous`
/// (owner by shard). Returns the owner by shard.
pub fn assign(shard_count: u32, members: &BTreeSet<String>, previous: &BTreeMap<u32, String>) -> BTreeMap<u32, String> {
    let mut result = BTreeMap::new();
    if members.is_empty() || shard_count == 0 {
        return result;
    }
    // Keep every shard whose owner is still alive.
    let mut held: BTreeMap<&String, Vec<u32>> = members.iter().map(|member| (member, Vec::new())).collect();
    let mut free: Vec<u32> = Vec::new();
    for shard in 0..shard_count {
        match previous.get(&shard).and_then(|owner| held.get_mut(owner)) {
            Some(shards) => shards.push(shard),
            None => free.push(shard),
        }
    }
    // Quotas: base for everyone, one extra for `extra` members — those that
    // already hold the most, so that as little as possible moves.
    let member_count = u32::try_from(members.len()).unwrap_or(u32::MAX);
    let base = shard_count / member_count;
    let extra = (shard_count % member_count) as usize;
    let mut by_holding: Vec<(&String, usize)> = held.iter().map(|(member, shards)| (*member, shards.len())).collect();
    by_holding.sort_by(|(a_member, a_count), (b_member, b_count)| b_count.cmp(a_count).then(a_member.cmp(b_member)));
    let quota: BTreeMap<&String, usize> = by_holding
        .iter()
        .enumerate()
        .map(|(rank, (member, _))| (*member, base as usize + usize::from(rank < extra)))
        .collect();
    // Members over quota give back their highest shards.
    for (member, shards) in held.iter_mut() {
        let keep = quota.get(member).copied().unwrap_or(0);
        while shards.len() > keep {
            if let Some(shard) = shards.pop() {
                free.push(shard);
            }
        }
    }
    // Free shards go to members under quota, fewest first.
    free.sort_unstable();
    let mut free = free.into_iter();
    for (member, shards) in held.iter_mut() {
        let want = quota.get(member).copied().unwrap_or(0);
        while shards.len() < want {
            match free.next() {
                Some(shard) => shards.push(shard),
                None => break,
            }
        }
    }
    debug_assert!(free.next().is_none(), "quotas add up to the shard count");
    for (member, shards) in held {
        for shard in shards {
            result.insert(shard, member.clone());
        }
    }
    result
}

/// Groups an owner-by-shard assignment into a map of the given generation.
pub fn to_map(generation: u64, shard_count: u32, assignment: &BTreeMap<u32, String>) -> ShardMap {
    let mut owners: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (shard, owner) in assignment {
        owners.entry(owner.clone()).or_default().push(*shard);
    }
    ShardMap { generation, shard_count, owners }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(names: &[u8]) -> BTreeSet<String> {
        names.iter().map(|name| format!("m{name}")).collect()
    }

    fn check_complete_and_balanced(shard_count: u32, members: &BTreeSet<String>, assignment: &BTreeMap<u32, String>) {
        assert_eq!(assignment.len() as u32, shard_count, "every shard owned exactly once");
        assert!(assignment.keys().copied().eq(0..shard_count));
        let mut counts: BTreeMap<&String, usize> = members.iter().map(|member| (member, 0)).collect();
        for owner in assignment.values() {
            *counts.get_mut(owner).expect("owner is a member") += 1;
        }
        let max = counts.values().max().copied().unwrap_or(0);
        let min = counts.values().min().copied().unwrap_or(0);
        assert!(max - min <= 1, "balanced: max {max} min {min}");
    }

    fn moved(before: &BTreeMap<u32, String>, after: &BTreeMap<u32, String>) -> usize {
        after.iter().filter(|(shard, owner)| before.get(shard) != Some(owner)).count()
    }

    #[test]
    fn one_member_owns_everything_and_none_owns_nothing() {
        let all = assign(64, &members(&[1]), &BTreeMap::new());
        assert_eq!(all.len(), 64);
        assert!(assign(64, &BTreeSet::new(), &all).is_empty());
    }

    proptest! {
        #[test]
        fn assignments_are_complete_and_balanced(shard_count in 1u32..300, names in proptest::collection::btree_set(0u8..40, 1..12)) {
            let members = members(&names.into_iter().collect::<Vec<_>>());
            let assignment = assign(shard_count, &members, &BTreeMap::new());
            check_complete_and_balanced(shard_count, &members, &assignment);
        }

        #[test]
        fn a_leave_moves_only_the_departed_members_shards(
            shard_count in 1u32..300,
            names in proptest::collection::btree_set(0u8..40, 2..12),
            leaving_index in 0usize..12,
        ) {
            let names: Vec<u8> = names.into_iter().collect();
            let before_members = members(&names);
            let before = assign(shard_count, &before_members, &BTreeMap::new());
            let leaving = format!("m{}", names[leaving_index % names.len()]);
            let mut after_members = before_members.clone();
            after_members.remove(&leaving);
            let after = assign(shard_count, &after_members, &before);
            check_complete_and_balanced(shard_count, &after_members, &after);
            let departed = before.values().filter(|owner| **owner == leaving).count();
            prop_assert_eq!(moved(&before, &after), departed);
        }

        #[test]
        fn a_join_moves_only_what_the_newcomer_takes(
            shard_count in 1u32..300,
            names in proptest::collection::btree_set(0u8..40, 1..12),
        ) {
            let names: Vec<u8> = names.into_iter().collect();
            let before_members = members(&names);
            let before = assign(shard_count, &before_members, &BTreeMap::new());
            let mut after_members = before_members.clone();
            after_members.insert("newcomer".to_owned());
            let after = assign(shard_count, &after_members, &before);
            check_complete_and_balanced(shard_count, &after_members, &after);
            let taken = after.values().filter(|owner| owner.as_str() == "newcomer").count();
            prop_assert_eq!(moved(&before, &after), taken);
            let fair_share = shard_count as usize / after_members.len();
            prop_assert!(taken <= fair_share + 1);
        }

        #[test]
        fn an_unchanged_membership_moves_nothing(
            shard_count in 1u32..300,
            names in proptest::collection::btree_set(0u8..40, 1..12),
        ) {
            let members = members(&names.into_iter().collect::<Vec<_>>());
            let first = assign(shard_count, &members, &BTreeMap::new());
            let second = assign(shard_count, &members, &first);
            prop_assert_eq!(first, second);
        }
    }
}
