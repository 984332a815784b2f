//! The KV-cache block manager: paged blocks with prefix caching, and a
//! contiguous baseline.
//!
//! ```text
//!  per-request block tables (logical -> physical)      physical blocks (num_blocks)
//!  seq 3: [ 7 | 2 | 9 ]   tokens 0..40, bs = 16          0  1  2  3  4  5  6  7  8  9
//!  seq 5: [ 7 | 4 ]        shares block 7 (same hash)   [f][f][u][f][u][c][f][u][f][u]
//!                                                        u: ref_cnt > 0 (in some table)
//!  free queue (LRU, evict from head):                    f: ref_cnt = 0, uncached
//!     head -> 0 -> 1 -> 3 -> 5(c) -> 6 -> 8 <- tail      c: ref_cnt = 0, still cached
//!  cached: BTreeMap<hash, block>  { h(7) -> 7, h(5) -> 5, h(2) -> 2 }
//! ```
//!
//! A block hash is chained as in vLLM: `h_i = H(h_{i-1}, tokens of block i)`,
//! so equal hashes mean equal whole prefixes. Only full blocks are cached.
//!
//! ## Invariants (checked by [`BlockManager::check_invariants`] in property tests)
//! 1. A block is in the free queue iff its `ref_cnt` is 0: never both free and used.
//! 2. `ref_cnt[b]` equals the number of block-table entries holding `b`.
//! 3. `free + used = num_blocks`.
//! 4. `cached[h] = b` iff block `b` carries hash `h`; a cached block holds
//!    exactly the tokens whose chained hash is `h` (it was hashed from the
//!    owning table's tokens when it became full, and is never written again).
//! 5. The free queue is a consistent doubly linked list; its order is the
//!    eviction order (least recently freed first; a request frees its blocks
//!    tail-first, so the shared prefix is evicted last). With prefix caching
//!    off nothing is cached, order is irrelevant, and a LIFO stack of block
//!    ids is the free list instead (the fast twin; the proptests run both).
//! 6. Contiguous layout: a table holds `ceil(reserve / block_size)` blocks
//!    from its first allocation until it is freed.
//!
//! ## Complexity
//! `allocate_slots` O(new blocks) (O(1) on the common decode step that stays
//! inside its last block); `free` O(table length); prefix lookup
//! O(blocks · (block_size + log cached)); `num_free_blocks` O(1). No
//! allocation on the steady decode path: tables keep their capacity.
//!
//! ## Contiguous baseline
//! [`KvLayout::Contiguous`] reserves a request's maximum length (prompt plus
//! the maximum output) at its first allocation, as pre-PagedAttention servers
//! (Orca, FasterTransformer) did. Blocks stand in for bytes; external
//! fragmentation is not modelled, so its waste is a lower bound.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::trace::TokenSeq;
use crate::{Error, Result};

/// A request's slot in the manager (assigned by the scheduler, reused).
pub type SeqId = u32;

const NONE: u32 = u32::MAX;

/// A 64-bit mixer (splitmix64 finalizer over `a + golden * (b + 1)`);
/// deterministic everywhere, unlike `std`'s `DefaultHasher`.
#[inline]
pub fn mix64(a: u64, b: u64) -> u64 {
    let mut z = a
        .wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(b.wrapping_add(1)))
        .rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Chained block hash: `H(parent, token ids)`.
pub fn block_hash(parent: u64, tokens: &(impl TokenSeq + ?Sized), start: u64, len: u64) -> u64 {
    let mut h = mix64(parent, 0x6b76_6361_6368_6521);
    for p in start..start + len {
        h = mix64(h, tokens.token(p) as u64);
    }
    h
}

/// Root of every hash chain.
pub const ROOT_HASH: u64 = 0x1f2e_3d4c_5b6a_7988;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum KvLayout {
    /// PagedAttention: blocks allocated as tokens arrive.
    Paged,
    /// Reserve the request's maximum length at its first allocation.
    Contiguous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PrefixCaching {
    Off,
    On,
}

/// Who is asking for blocks: new admissions must leave the watermark free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A waiting request being admitted (or resumed): respects the watermark.
    New,
    /// A running request growing by a few tokens.
    Running,
}

#[derive(Debug, Clone, Serialize)]
pub struct KvConfig {
    pub num_blocks: u32,
    pub block_size: u32,
    /// Fraction of blocks new admissions must leave free (vLLM: 0.01).
    pub watermark: f64,
    pub prefix_caching: PrefixCaching,
    pub layout: KvLayout,
}

#[derive(Debug, Clone, Copy, Default)]
struct Block {
    ref_cnt: u32,
    hash: Option<u64>,
    prev: u32,
    next: u32,
    in_free: bool,
}

#[derive(Debug, Clone, Default)]
struct SeqTable {
    blocks: Vec<u32>,
    /// Chained hashes of this sequence's full blocks, in order.
    hashes: Vec<u64>,
    /// Token slots this sequence has claimed (its KV length).
    tokens: u64,
    live: bool,
}

/// Not enough free blocks; the caller preempts someone or waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFreeBlocks {
    pub needed: u32,
    pub free: u32,
}

/// Counters for reports.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct KvCounters {
    pub prefix_queries_blocks: u64,
    pub prefix_hit_blocks: u64,
    pub evictions: u64,
}

/// Fixed-size KV blocks, per-sequence tables, an LRU free queue and a prefix cache.
#[derive(Debug, Clone)]
pub struct BlockManager {
    cfg: KvConfig,
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    num_free: u32,
    watermark_blocks: u32,
    /// `log2(block_size)` when the block size is a power of two.
    block_shift: Option<u32>,
    cached: BTreeMap<u64, u32>,
    /// Prefix caching off: free blocks as a LIFO stack (order is irrelevant
    /// without cached content, and LIFO reuse is cache-friendly); the LRU
    /// list is then unused.
    stack: Vec<u32>,
    tables: Vec<SeqTable>,
    /// Sum of `tokens` over live tables.
    live_tokens: u64,
    pub counters: KvCounters,
}

impl BlockManager {
    pub fn new(cfg: KvConfig) -> Result<Self> {
        if cfg.num_blocks == 0 || cfg.num_blocks == NONE {
            return Err(Error::invalid(
                "num_blocks",
                format!("{} is not in 1..2^32-1", cfg.num_blocks),
            ));
        }
        if cfg.block_size == 0 {
            return Err(Error::invalid("block_size", "must be positive"));
        }
        if !(0.0..1.0).contains(&cfg.watermark) {
            return Err(Error::invalid(
                "watermark",
                format!("{} is not in [0, 1)", cfg.watermark),
            ));
        }
        let n = cfg.num_blocks;
        let blocks = (0..n)
            .map(|i| Block {
                ref_cnt: 0,
                hash: None,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == n { NONE } else { i + 1 },
                in_free: true,
            })
            .collect();
        let watermark_blocks = (cfg.watermark * n as f64) as u32;
        let lru = cfg.prefix_caching == PrefixCaching::On;
        let blocks: Vec<Block> = if lru {
            blocks
        } else {
            (0..n)
                .map(|_| Block {
                    prev: NONE,
                    next: NONE,
                    in_free: true,
                    ..Block::default()
                })
                .collect()
        };
        Ok(BlockManager {
            blocks,
            head: if lru { 0 } else { NONE },
            tail: if lru { n - 1 } else { NONE },
            stack: if lru {
                Vec::new()
            } else {
                (0..n).rev().collect()
            },
            num_free: n,
            watermark_blocks,
            block_shift: cfg
                .block_size
                .is_power_of_two()
                .then(|| cfg.block_size.trailing_zeros()),
            cached: BTreeMap::new(),
            tables: Vec::new(),
            live_tokens: 0,
            counters: KvCounters::default(),
            cfg,
        })
    }

    pub fn config(&self) -> &KvConfig {
        &self.cfg
    }
    pub fn block_size(&self) -> u32 {
        self.cfg.block_size
    }
    pub fn num_blocks(&self) -> u32 {
        self.cfg.num_blocks
    }
    /// Free blocks, including cached ones that may be evicted.
    pub fn num_free_blocks(&self) -> u32 {
        self.num_free
    }
    pub fn num_used_blocks(&self) -> u32 {
        self.cfg.num_blocks - self.num_free
    }
    /// Token slots claimed by live sequences (logical KV length sum).
    pub fn live_tokens(&self) -> u64 {
        self.live_tokens
    }
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }
    /// The physical blocks of a sequence, in logical order.
    pub fn table(&self, seq: SeqId) -> &[u32] {
        self.tables
            .get(seq as usize)
            .map(|t| t.blocks.as_slice())
            .unwrap_or(&[])
    }
    pub fn seq_tokens(&self, seq: SeqId) -> u64 {
        self.tables.get(seq as usize).map(|t| t.tokens).unwrap_or(0)
    }

    /// Blocks a sequence of `max_tokens` total would hold (its reservation in
    /// the contiguous layout).
    #[inline]
    pub fn blocks_for(&self, tokens: u64) -> u64 {
        // a power-of-two block size (the usual case) needs no division
        match self.block_shift {
            Some(s) => (tokens >> s) + (tokens & ((1u64 << s) - 1) != 0) as u64,
            None => self.blocks_for_direct(tokens),
        }
    }

    /// [`Self::blocks_for`]'s slow twin: a division.
    pub fn blocks_for_direct(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.cfg.block_size as u64)
    }

    fn table_mut(&mut self, seq: SeqId) -> &mut SeqTable {
        let i = seq as usize;
        if i >= self.tables.len() {
            self.tables.resize_with(i + 1, SeqTable::default);
        }
        &mut self.tables[i]
    }

    /// Extra blocks needed for `seq` to hold `total_tokens` (at most
    /// `max_tokens` over its life; the contiguous layout reserves that).
    #[inline]
    pub fn blocks_needed(&self, seq: SeqId, total_tokens: u64, max_tokens: u64) -> u32 {
        let have = self.table(seq).len() as u64;
        let want = match self.cfg.layout {
            KvLayout::Paged => self.blocks_for(total_tokens),
            KvLayout::Contiguous => self.blocks_for(max_tokens.max(total_tokens)),
        };
        want.saturating_sub(have).min(u32::MAX as u64) as u32
    }

    /// Whether `n` more blocks can be handed out to this kind of request.
    #[inline]
    pub fn can_allocate(&self, n: u32, who: Admission) -> bool {
        match who {
            Admission::Running => n <= self.num_free,
            Admission::New => (self.num_free as u64) >= n as u64 + self.watermark_blocks as u64,
        }
    }

    /// Grow `seq`'s KV to `total_tokens` slots. All or nothing.
    #[inline]
    pub fn allocate_slots(
        &mut self,
        seq: SeqId,
        total_tokens: u64,
        max_tokens: u64,
        who: Admission,
    ) -> Result<(), NoFreeBlocks> {
        let need = self.blocks_needed(seq, total_tokens, max_tokens);
        if need > 0 {
            if !self.can_allocate(need, who) {
                return Err(NoFreeBlocks {
                    needed: need,
                    free: self.num_free,
                });
            }
            self.table_mut(seq);
            if self.cfg.prefix_caching == PrefixCaching::Off {
                // the LIFO stack's top `need` blocks, in the order `pop_free`
                // would hand them out
                let start = self.stack.len() - need as usize;
                let table = &mut self.tables[seq as usize].blocks;
                for &b in self.stack[start..].iter().rev() {
                    let blk = &mut self.blocks[b as usize];
                    blk.in_free = false;
                    blk.ref_cnt = 1;
                    table.push(b);
                }
                self.stack.truncate(start);
                self.num_free -= need;
            } else {
                for _ in 0..need {
                    let b = self.pop_free();
                    self.blocks[b as usize].ref_cnt = 1;
                    self.tables[seq as usize].blocks.push(b);
                }
            }
        }
        let t = self.table_mut(seq);
        t.live = true;
        let old = t.tokens;
        if total_tokens > old {
            t.tokens = total_tokens;
            self.live_tokens += total_tokens - old;
        }
        Ok(())
    }

    /// Prefix-cache lookup for a new (or recomputed) sequence: attach the
    /// longest run of cached full blocks of its first `prompt_len` tokens
    /// (at most `prompt_len - 1` tokens, so one is always computed, as vLLM
    /// does to get logits). Returns the number of tokens found computed.
    pub fn lookup_prefix(
        &mut self,
        seq: SeqId,
        tokens: &(impl TokenSeq + ?Sized),
        prompt_len: u64,
    ) -> u64 {
        if self.cfg.prefix_caching == PrefixCaching::Off || prompt_len == 0 {
            return 0;
        }
        debug_assert!(
            self.table(seq).is_empty(),
            "lookup on a fresh sequence only"
        );
        let bs = self.cfg.block_size as u64;
        let max_blocks = (prompt_len - 1) / bs;
        let mut parent = ROOT_HASH;
        let mut hit = 0u64;
        for i in 0..max_blocks {
            let h = block_hash(parent, tokens, i * bs, bs);
            self.counters.prefix_queries_blocks += 1;
            let Some(&b) = self.cached.get(&h) else { break };
            self.counters.prefix_hit_blocks += 1;
            if self.blocks[b as usize].in_free {
                self.unlink(b);
            }
            self.blocks[b as usize].ref_cnt += 1;
            let t = self.table_mut(seq);
            t.blocks.push(b);
            t.hashes.push(h);
            parent = h;
            hit += 1;
        }
        let tokens_hit = hit * bs;
        if tokens_hit > 0 {
            let t = self.table_mut(seq);
            t.live = true;
            t.tokens = tokens_hit;
            self.live_tokens += tokens_hit;
        }
        tokens_hit
    }

    /// Hash and publish the blocks of `seq` that became full now that
    /// `computed` tokens hold KV. No-op when prefix caching is off.
    pub fn cache_full_blocks(
        &mut self,
        seq: SeqId,
        tokens: &(impl TokenSeq + ?Sized),
        computed: u64,
    ) {
        if self.cfg.prefix_caching == PrefixCaching::Off {
            return;
        }
        let bs = self.cfg.block_size as u64;
        let full = (computed / bs) as usize;
        let i = seq as usize;
        if i >= self.tables.len() {
            return;
        }
        let full = full.min(self.tables[i].blocks.len());
        while self.tables[i].hashes.len() < full {
            let k = self.tables[i].hashes.len();
            let parent = if k == 0 {
                ROOT_HASH
            } else {
                self.tables[i].hashes[k - 1]
            };
            let h = block_hash(parent, tokens, k as u64 * bs, bs);
            self.tables[i].hashes.push(h);
            let b = self.tables[i].blocks[k];
            let blk = &mut self.blocks[b as usize];
            if blk.hash.is_none() && !self.cached.contains_key(&h) {
                blk.hash = Some(h);
                self.cached.insert(h, b);
            }
        }
    }

    /// Release a sequence's blocks (tail first, so prefixes are evicted last).
    pub fn free(&mut self, seq: SeqId) {
        let i = seq as usize;
        if i >= self.tables.len() {
            return;
        }
        let mut blocks = std::mem::take(&mut self.tables[i].blocks);
        if self.cfg.prefix_caching == PrefixCaching::Off {
            // `push_free` onto the LIFO stack, in the same order, in bulk
            self.stack.reserve(blocks.len());
            for &b in blocks.iter().rev() {
                let blk = &mut self.blocks[b as usize];
                blk.ref_cnt -= 1;
                if blk.ref_cnt == 0 {
                    blk.in_free = true;
                    self.stack.push(b);
                    self.num_free += 1;
                }
            }
        } else {
            for &b in blocks.iter().rev() {
                let blk = &mut self.blocks[b as usize];
                blk.ref_cnt -= 1;
                if blk.ref_cnt == 0 {
                    self.push_free(b);
                }
            }
        }
        blocks.clear();
        let t = &mut self.tables[i];
        t.blocks = blocks;
        t.hashes.clear();
        self.live_tokens -= t.tokens;
        t.tokens = 0;
        t.live = false;
    }

    #[inline]
    fn pop_free(&mut self) -> u32 {
        if self.cfg.prefix_caching == PrefixCaching::Off {
            let b = self.stack.pop().expect("pop_free on an empty stack");
            self.blocks[b as usize].in_free = false;
            self.num_free -= 1;
            return b;
        }
        let b = self.head;
        debug_assert!(b != NONE, "pop_free on an empty queue");
        self.unlink(b);
        if let Some(h) = self.blocks[b as usize].hash.take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
            self.counters.evictions += 1;
        }
        b
    }

    fn unlink(&mut self, b: u32) {
        let Block { prev, next, .. } = self.blocks[b as usize];
        if prev == NONE {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NONE {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let blk = &mut self.blocks[b as usize];
        blk.prev = NONE;
        blk.next = NONE;
        blk.in_free = false;
        self.num_free -= 1;
    }

    #[inline]
    fn push_free(&mut self, b: u32) {
        if self.cfg.prefix_caching == PrefixCaching::Off {
            self.blocks[b as usize].in_free = true;
            self.stack.push(b);
            self.num_free += 1;
            return;
        }
        let old_tail = self.tail;
        {
            let blk = &mut self.blocks[b as usize];
            blk.prev = old_tail;
            blk.next = NONE;
            blk.in_free = true;
        }
        if old_tail == NONE {
            self.head = b;
        } else {
            self.blocks[old_tail as usize].next = b;
        }
        self.tail = b;
        self.num_free += 1;
    }

    /// The full-block hashes `seq` has published or matched so far.
    pub fn seq_hashes(&self, seq: SeqId) -> &[u64] {
        self.tables
            .get(seq as usize)
            .map(|t| t.hashes.as_slice())
            .unwrap_or(&[])
    }

    /// Check invariants 1-6 of the module doc (O(blocks + table entries)).
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.cfg.num_blocks as usize;
        // 5: walk the list
        let mut seen = vec![false; n];
        if self.cfg.prefix_caching == PrefixCaching::Off {
            for &b in &self.stack {
                if b as usize >= n || seen[b as usize] {
                    return Err(format!("free stack repeats or overruns at block {b}"));
                }
                seen[b as usize] = true;
            }
            if self.stack.len() as u32 != self.num_free || self.head != NONE {
                return Err(format!(
                    "free stack has {} blocks, counter says {}",
                    self.stack.len(),
                    self.num_free
                ));
            }
        }
        let (mut count, mut prev, mut cur) = (
            if self.head == NONE {
                self.num_free
            } else {
                0u32
            },
            NONE,
            self.head,
        );
        while cur != NONE {
            let c = cur as usize;
            if c >= n || seen[c] {
                return Err(format!("free list revisits or overruns at block {cur}"));
            }
            seen[c] = true;
            if self.blocks[c].prev != prev {
                return Err(format!(
                    "block {cur}: prev link {} != {prev}",
                    self.blocks[c].prev
                ));
            }
            prev = cur;
            cur = self.blocks[c].next;
            count += 1;
        }
        if prev != self.tail {
            return Err(format!("tail {} != last node {prev}", self.tail));
        }
        if count != self.num_free {
            return Err(format!(
                "free list has {count} nodes, counter says {}",
                self.num_free
            ));
        }
        // 2: reference counts
        let mut refs = vec![0u32; n];
        let mut live = 0u64;
        for (s, t) in self.tables.iter().enumerate() {
            for &b in &t.blocks {
                refs[b as usize] += 1;
            }
            if t.live {
                live += t.tokens;
            } else if !t.blocks.is_empty() || t.tokens != 0 {
                return Err(format!("dead seq {s} holds blocks or tokens"));
            }
            if self.cfg.layout == KvLayout::Paged
                && (t.blocks.len() as u64) < self.blocks_for(t.tokens)
            {
                return Err(format!(
                    "seq {s}: {} blocks cannot hold {} tokens",
                    t.blocks.len(),
                    t.tokens
                ));
            }
            if t.hashes.len() > t.blocks.len() {
                return Err(format!("seq {s}: more hashes than blocks"));
            }
            for (k, &h) in t.hashes.iter().enumerate() {
                if let Some(bh) = self.blocks[t.blocks[k] as usize].hash {
                    if bh != h {
                        return Err(format!(
                            "seq {s} block {k}: table hash {h:x} != block hash {bh:x}"
                        ));
                    }
                }
            }
        }
        if live != self.live_tokens {
            return Err(format!(
                "live tokens {live} != counter {}",
                self.live_tokens
            ));
        }
        let mut used = 0u32;
        for (b, blk) in self.blocks.iter().enumerate() {
            if blk.ref_cnt != refs[b] {
                return Err(format!(
                    "block {b}: ref_cnt {} but {} table entries",
                    blk.ref_cnt, refs[b]
                ));
            }
            // 1
            if blk.in_free != (blk.ref_cnt == 0) || blk.in_free != seen[b] {
                return Err(format!(
                    "block {b}: in_free {} / in list {} / ref_cnt {}",
                    blk.in_free, seen[b], blk.ref_cnt
                ));
            }
            used += (blk.ref_cnt > 0) as u32;
            // 4 (block side)
            if let Some(h) = blk.hash {
                if self.cached.get(&h) != Some(&(b as u32)) {
                    return Err(format!("block {b} has hash {h:x} not mapped to it"));
                }
            }
        }
        // 3
        if used + self.num_free != self.cfg.num_blocks {
            return Err(format!(
                "used {used} + free {} != {}",
                self.num_free, self.cfg.num_blocks
            ));
        }
        // 4 (map side)
        for (&h, &b) in &self.cached {
            if self.blocks[b as usize].hash != Some(h) {
                return Err(format!("cached {h:x} -> {b}, but the block's hash differs"));
            }
        }
        Ok(())
    }

    /// Debug view of the cached block set, for tests: `(hash, block)` in hash order.
    pub fn cached_entries(&self) -> Vec<(u64, u32)> {
        self.cached.iter().map(|(&h, &b)| (h, b)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_for_shift_matches_division() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for block_size in [1u32, 2, 3, 16, 17, 32, 256, 1 << 31, u32::MAX] {
            let kv = BlockManager::new(KvConfig {
                num_blocks: 8,
                block_size,
                watermark: 0.0,
                prefix_caching: PrefixCaching::Off,
                layout: KvLayout::Paged,
            })
            .unwrap();
            let bs = block_size as u64;
            let mut ts = vec![0, 1, bs - 1, bs, bs + 1, u64::MAX, u64::MAX - 1];
            ts.extend((0..10_000).map(|_| rng.random_range(0..1u64 << 40)));
            ts.extend((0..1_000).map(|_| rng.random::<u64>()));
            for t in ts {
                assert_eq!(kv.blocks_for(t), kv.blocks_for_direct(t), "bs {bs} t {t}");
            }
        }
    }
}
