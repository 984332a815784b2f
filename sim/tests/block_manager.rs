//! Property tests of the block manager: random operation sequences keep the
//! module-doc invariants, in both free-list implementations (LRU list with
//! prefix caching, LIFO stack without) and both layouts.

use std::collections::BTreeSet;

use inferlab_sim::block_manager::{
    block_hash, Admission, BlockManager, KvConfig, KvLayout, PrefixCaching, ROOT_HASH,
};
use inferlab_sim::trace::SyntheticTokens;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Grow a sequence by n tokens (admitting it first if it is new).
    Grow(u32, u64),
    /// Publish its full blocks.
    Commit(u32),
    Free(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..6, 1u64..70).prop_map(|(s, n)| Op::Grow(s, n)),
        2 => (0u32..6).prop_map(Op::Commit),
        1 => (0u32..6).prop_map(Op::Free),
    ]
}

fn tokens_of(seq: u32, generation: u64) -> SyntheticTokens {
    // sequences 0..3 share prefix 7 for 40 tokens; 3..6 share prefix 9 for 20
    SyntheticTokens {
        prefix_key: if seq < 3 { 7 } else { 9 },
        prefix_len: if seq < 3 { 40 } else { 20 },
        own_key: seq as u64 * 1000 + generation,
    }
}

/// The slow twin of the free counter, and the hash chain recomputed from tokens.
fn check_against_model(
    kv: &BlockManager,
    toks: &[SyntheticTokens],
    max_tokens: u64,
) -> Result<(), String> {
    kv.check_invariants()?;
    let mut used = BTreeSet::new();
    for s in 0..toks.len() as u32 {
        used.extend(kv.table(s).iter().copied());
        let mut parent = ROOT_HASH;
        let bs = kv.block_size() as u64;
        for (k, &h) in kv.seq_hashes(s).iter().enumerate() {
            let want = block_hash(parent, &toks[s as usize], k as u64 * bs, bs);
            if want != h {
                return Err(format!(
                    "seq {s} block {k}: hash {h:x} is not the chain of its tokens {want:x}"
                ));
            }
            parent = h;
        }
        if kv.config().layout == KvLayout::Contiguous && !kv.table(s).is_empty() {
            let want = kv.blocks_for(max_tokens) as usize;
            if kv.table(s).len() != want {
                return Err(format!(
                    "contiguous seq {s} holds {} blocks, reserve is {want}",
                    kv.table(s).len()
                ));
            }
        }
    }
    if kv.num_free_blocks() as usize + used.len() != kv.num_blocks() as usize {
        return Err(format!(
            "free {} + distinct used {} != {}",
            kv.num_free_blocks(),
            used.len(),
            kv.num_blocks()
        ));
    }
    Ok(())
}

fn run(
    ops: &[Op],
    caching: PrefixCaching,
    layout: KvLayout,
    num_blocks: u32,
) -> Result<(), TestCaseError> {
    let max_tokens = 200u64;
    let mut kv = BlockManager::new(KvConfig {
        num_blocks,
        block_size: 8,
        watermark: 0.05,
        prefix_caching: caching,
        layout,
    })
    .unwrap();
    let mut generation = [0u64; 6];
    let mut toks: Vec<SyntheticTokens> = (0..6).map(|s| tokens_of(s, 0)).collect();
    for o in ops {
        match *o {
            Op::Grow(s, n) => {
                let cur = kv.seq_tokens(s);
                let who = if kv.table(s).is_empty() {
                    if cur == 0 {
                        kv.lookup_prefix(s, &toks[s as usize], 40);
                    }
                    Admission::New
                } else {
                    Admission::Running
                };
                let cur = kv.seq_tokens(s);
                let target = (cur + n).min(max_tokens);
                let free_before = kv.num_free_blocks();
                let need = kv.blocks_needed(s, target, max_tokens);
                match kv.allocate_slots(s, target, max_tokens, who) {
                    Ok(()) => prop_assert_eq!(kv.num_free_blocks(), free_before - need),
                    Err(e) => {
                        prop_assert_eq!(
                            kv.num_free_blocks(),
                            free_before,
                            "failed allocation changed state"
                        );
                        prop_assert_eq!(e.needed, need);
                    }
                }
            }
            Op::Commit(s) => {
                let t = kv.seq_tokens(s);
                kv.cache_full_blocks(s, &toks[s as usize], t);
            }
            Op::Free(s) => {
                kv.free(s);
                generation[s as usize] += 1;
                toks[s as usize] = tokens_of(s, generation[s as usize]);
            }
        }
        if let Err(e) = check_against_model(&kv, &toks, max_tokens) {
            return Err(TestCaseError::fail(format!("after {o:?}: {e}")));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn paged_with_prefix_cache_keeps_invariants(ops in prop::collection::vec(op(), 1..120)) {
        run(&ops, PrefixCaching::On, KvLayout::Paged, 24)?;
    }

    #[test]
    fn paged_stack_keeps_invariants(ops in prop::collection::vec(op(), 1..120)) {
        run(&ops, PrefixCaching::Off, KvLayout::Paged, 24)?;
    }

    #[test]
    fn contiguous_keeps_invariants(ops in prop::collection::vec(op(), 1..120)) {
        run(&ops, PrefixCaching::Off, KvLayout::Contiguous, 80)?;
    }
}

fn mgr(n: u32, caching: PrefixCaching) -> BlockManager {
    BlockManager::new(KvConfig {
        num_blocks: n,
        block_size: 4,
        watermark: 0.0,
        prefix_caching: caching,
        layout: KvLayout::Paged,
    })
    .unwrap()
}

#[test]
fn shared_prefix_hits_and_is_reference_counted() {
    let mut kv = mgr(16, PrefixCaching::On);
    let a: Vec<u32> = (0..13).collect();
    let mut b = a.clone();
    b[12] = 99; // same first 12 tokens = 3 full blocks
    kv.allocate_slots(0, 13, 13, Admission::New).unwrap();
    kv.cache_full_blocks(0, &a, 13);
    assert_eq!(kv.num_cached_blocks(), 3);
    let hit = kv.lookup_prefix(1, &b, 13);
    assert_eq!(hit, 12, "three full blocks of the shared prefix are found");
    assert_eq!(kv.table(1), &kv.table(0)[..3]);
    kv.allocate_slots(1, 13, 13, Admission::New).unwrap();
    assert_eq!(kv.num_used_blocks(), 5, "4 for seq 0, 1 new for seq 1");
    kv.check_invariants().unwrap();
    // a prompt that is exactly the cached blocks recomputes its last token
    let c: Vec<u32> = (0..12).collect();
    assert_eq!(kv.lookup_prefix(2, &c, 12), 8);
    kv.free(2);
    kv.free(0);
    kv.free(1);
    kv.check_invariants().unwrap();
    assert_eq!(kv.num_free_blocks(), 16);
    assert_eq!(
        kv.num_cached_blocks(),
        3,
        "freed blocks stay cached until evicted"
    );
    // a fresh sequence still hits after everyone freed them
    assert_eq!(kv.lookup_prefix(3, &a, 13), 12);
    kv.free(3);
}

#[test]
fn lru_evicts_least_recently_freed_and_prefix_last() {
    let mut kv = mgr(4, PrefixCaching::On);
    let a: Vec<u32> = (100..116).collect(); // 4 full blocks
    kv.allocate_slots(0, 16, 16, Admission::New).unwrap();
    kv.cache_full_blocks(0, &a, 16);
    kv.free(0); // freed tail first: the last block is evicted first
    kv.allocate_slots(1, 4, 4, Admission::New).unwrap();
    assert_eq!(kv.counters.evictions, 1);
    // the first three blocks (the prefix) are still cached
    let hit = kv.lookup_prefix(2, &a, 16);
    assert_eq!(hit, 12);
    kv.check_invariants().unwrap();
}

#[test]
fn watermark_applies_to_admissions_only() {
    let mut kv = BlockManager::new(KvConfig {
        num_blocks: 100,
        block_size: 16,
        watermark: 0.1,
        prefix_caching: PrefixCaching::Off,
        layout: KvLayout::Paged,
    })
    .unwrap();
    assert!(
        kv.allocate_slots(0, 16 * 91, 16 * 91, Admission::New)
            .is_err(),
        "would leave 9 < 10 free"
    );
    kv.allocate_slots(0, 16 * 90, 16 * 100, Admission::New)
        .unwrap();
    kv.allocate_slots(0, 16 * 100, 16 * 100, Admission::Running)
        .unwrap();
    assert_eq!(kv.num_free_blocks(), 0);
}

#[test]
fn bad_configs_are_errors() {
    for (n, bs, wm) in [
        (0u32, 16u32, 0.0),
        (10, 0, 0.0),
        (10, 16, 1.5),
        (10, 16, f64::NAN),
    ] {
        let r = BlockManager::new(KvConfig {
            num_blocks: n,
            block_size: bs,
            watermark: wm,
            prefix_caching: PrefixCaching::Off,
            layout: KvLayout::Paged,
        });
        assert!(r.is_err(), "{n} {bs} {wm}");
    }
}
