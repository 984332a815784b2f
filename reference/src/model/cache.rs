//! KV caches: contiguous and paged, one interface.
//!
//! Both hold, for every layer, the rotated keys and the values of the first
//! `len` tokens of one sequence, each token a row of `kv_dim = Hkv * D` floats.
//!
//! ```text
//! Contiguous: k[layer] = [capacity, Hkv, D]      token t at row t
//!
//! Paged (vLLM's layout; one block table shared by all layers):
//!   k_pool[layer] = [num_blocks, block_size, Hkv, D]
//!   block_table   = [b0, b1, b2]      logical block i -> physical block id
//!   token t at k_pool[layer][block_table[t / block_size]][t % block_size]
//!
//!   len = 10, block_size = 4:  block_table = [5, 0, 3]
//!   physical 5: t0 t1 t2 t3 | physical 0: t4 t5 t6 t7 | physical 3: t8 t9 -- --
//!   free = [1, 2, 4]  (ids not in the table; next allocation pops the last)
//! ```
//! Invariants (paged): `block_table.len() == len.div_ceil(block_size)` after
//! every public call; `block_table` and `free` are disjoint and together hold
//! every id `< num_blocks` exactly once. Appending `n` tokens allocates
//! `ceil((len + n) / bs) - ceil(len / bs)` blocks: O(n / bs) amortized, the pool
//! growing by one block when `free` is empty. [`KvCache::truncate`] returns
//! whole blocks past the new length to `free` in O(blocks freed); stale rows
//! inside a kept partial block are simply overwritten by the next append.
//! [`KvCache::compact`] keeps a prefix plus chosen later rows moved down to
//! consecutive rows (tree speculation keeps the accepted path with it).

use crate::{Error, Result};

/// Which cache layout to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Contiguous,
    Paged { block_size: usize },
}

#[derive(Debug, Clone)]
pub(crate) enum Store {
    Contiguous {
        k: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    },
    Paged {
        block_size: usize,
        k_pool: Vec<Vec<f32>>,
        v_pool: Vec<Vec<f32>>,
        num_blocks: usize,
        block_table: Vec<u32>,
        free: Vec<u32>,
    },
}

/// The KV cache of one sequence across all layers of one model.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) n_layers: usize,
    pub(crate) kv_dim: usize,
    pub(crate) max_len: usize,
    pub(crate) len: usize,
    pub(crate) store: Store,
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `kv_dim`-wide rows, at most `max_len` tokens.
    pub fn new(kind: CacheKind, n_layers: usize, kv_dim: usize, max_len: usize) -> Result<Self> {
        let store = match kind {
            CacheKind::Contiguous => Store::Contiguous {
                k: vec![Vec::new(); n_layers],
                v: vec![Vec::new(); n_layers],
            },
            CacheKind::Paged { block_size } => {
                if block_size == 0 {
                    return Err(Error::invalid("block_size", "must be positive"));
                }
                Store::Paged {
                    block_size,
                    k_pool: vec![Vec::new(); n_layers],
                    v_pool: vec![Vec::new(); n_layers],
                    num_blocks: 0,
                    block_table: Vec::new(),
                    free: Vec::new(),
                }
            }
        };
        Ok(Self {
            n_layers,
            kv_dim,
            max_len,
            len: 0,
            store,
        })
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens this cache may hold (the model's context).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn kind(&self) -> CacheKind {
        match &self.store {
            Store::Contiguous { .. } => CacheKind::Contiguous,
            Store::Paged { block_size, .. } => CacheKind::Paged {
                block_size: *block_size,
            },
        }
    }

    /// The paged cache's block table (None for a contiguous cache).
    pub fn block_table(&self) -> Option<&[u32]> {
        match &self.store {
            Store::Paged { block_table, .. } => Some(block_table),
            Store::Contiguous { .. } => None,
        }
    }

    /// Forget every token from `len` on (no-op when `len >= self.len()`); the
    /// next forward call overwrites them. Speculative decoding rolls back with it.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        self.len = len;
        match &mut self.store {
            Store::Contiguous { k, v } => {
                for l in 0..self.n_layers {
                    k[l].truncate(len * self.kv_dim);
                    v[l].truncate(len * self.kv_dim);
                }
            }
            Store::Paged {
                block_size,
                block_table,
                free,
                ..
            } => {
                let keep = len.div_ceil(*block_size);
                // Freed in reverse so the next allocations reuse them in order.
                while block_table.len() > keep {
                    free.push(block_table.pop().expect("non-empty"));
                }
            }
        }
    }

    /// Keep rows `0..from` and then only `rows` (absolute, strictly
    /// increasing, each in `from..len`), moved down to consecutive rows
    /// `from..from + rows.len()`; everything else is dropped. Tree
    /// verification keeps the accepted path's K/V with it: the kept rows were
    /// computed at the positions they now occupy, so the cache equals one
    /// built sequentially from that path. Copies `rows.len()` rows per layer
    /// (in increasing order, each destination ≤ its source, so no row is
    /// overwritten before it is read); paged caches then free whole blocks
    /// as [`KvCache::truncate`] does.
    pub fn compact(&mut self, from: usize, rows: &[usize]) -> Result<()> {
        if from > self.len {
            return Err(Error::invalid(
                "compact",
                format!("prefix {from} exceeds the {} cached rows", self.len),
            ));
        }
        for (i, &r) in rows.iter().enumerate() {
            let lo = if i == 0 { from } else { rows[i - 1] + 1 };
            if r < lo || r >= self.len {
                return Err(Error::invalid(
                    "compact rows",
                    format!(
                        "row {r} (index {i}) is not in {lo}..{} (rows must increase and lie past the prefix)",
                        self.len
                    ),
                ));
            }
        }
        let kvd = self.kv_dim;
        for (i, &r) in rows.iter().enumerate() {
            let dst = from + i;
            if dst == r {
                continue;
            }
            let (so, d_o) = (self.row_offset(r), self.row_offset(dst));
            for l in 0..self.n_layers {
                let (k, v) = self.layer_mut(l);
                k.copy_within(so..so + kvd, d_o);
                v.copy_within(so..so + kvd, d_o);
            }
        }
        self.truncate(from + rows.len());
        Ok(())
    }

    /// Make room for rows `len..len + n` (allocating blocks); does not change `len`.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<()> {
        let new_len = self.len + n;
        if new_len > self.max_len {
            return Err(Error::invalid(
                "tokens",
                format!(
                    "{} cached + {n} new = {new_len} exceeds the context of {} tokens",
                    self.len, self.max_len
                ),
            ));
        }
        match &mut self.store {
            Store::Contiguous { k, v } => {
                for l in 0..self.n_layers {
                    k[l].resize(new_len * self.kv_dim, 0.0);
                    v[l].resize(new_len * self.kv_dim, 0.0);
                }
            }
            Store::Paged {
                block_size,
                k_pool,
                v_pool,
                num_blocks,
                block_table,
                free,
            } => {
                let block_elems = *block_size * self.kv_dim;
                while block_table.len() < new_len.div_ceil(*block_size) {
                    let id = match free.pop() {
                        Some(id) => id,
                        None => {
                            let id = *num_blocks as u32;
                            *num_blocks += 1;
                            for l in 0..self.n_layers {
                                k_pool[l].resize(*num_blocks * block_elems, 0.0);
                                v_pool[l].resize(*num_blocks * block_elems, 0.0);
                            }
                            id
                        }
                    };
                    block_table.push(id);
                }
            }
        }
        Ok(())
    }

    /// [`KvCache::reserve`] for layer `l` alone in a contiguous cache (a paged
    /// cache reserves every layer): the other layers stay unallocated, so only
    /// layer `l` may be used until they are reserved. Calibration runs one
    /// block per fresh cache; reserving all layers zeroed `n_layers` times the
    /// memory it touches (24 MB per sample and block for SmolLM2 at 512 tokens).
    pub(crate) fn reserve_layer(&mut self, l: usize, n: usize) -> Result<()> {
        let new_len = self.len + n;
        match &mut self.store {
            Store::Contiguous { k, v } if new_len <= self.max_len && l < self.n_layers => {
                k[l].resize(new_len * self.kv_dim, 0.0);
                v[l].resize(new_len * self.kv_dim, 0.0);
                Ok(())
            }
            _ => self.reserve(n),
        }
    }

    /// Offset of token `t`'s row in a layer's K (or V) buffer.
    #[inline]
    pub(crate) fn row_offset(&self, t: usize) -> usize {
        match &self.store {
            Store::Contiguous { .. } => t * self.kv_dim,
            Store::Paged {
                block_size,
                block_table,
                ..
            } => (block_table[t / block_size] as usize * block_size + t % block_size) * self.kv_dim,
        }
    }

    /// Layer `l`'s K and V buffers.
    pub(crate) fn layer(&self, l: usize) -> (&[f32], &[f32]) {
        match &self.store {
            Store::Contiguous { k, v } => (&k[l], &v[l]),
            Store::Paged { k_pool, v_pool, .. } => (&k_pool[l], &v_pool[l]),
        }
    }

    pub(crate) fn layer_mut(&mut self, l: usize) -> (&mut [f32], &mut [f32]) {
        match &mut self.store {
            Store::Contiguous { k, v } => (&mut k[l], &mut v[l]),
            Store::Paged { k_pool, v_pool, .. } => (&mut k_pool[l], &mut v_pool[l]),
        }
    }

    /// Copy of layer `l`'s keys and values for tokens `0..len`, `[len, kv_dim]` each.
    pub fn gather_layer(&self, l: usize) -> (Vec<f32>, Vec<f32>) {
        let (k, v) = self.layer(l);
        let mut ko = Vec::with_capacity(self.len * self.kv_dim);
        let mut vo = Vec::with_capacity(self.len * self.kv_dim);
        for t in 0..self.len {
            let o = self.row_offset(t);
            ko.extend_from_slice(&k[o..o + self.kv_dim]);
            vo.extend_from_slice(&v[o..o + self.kv_dim]);
        }
        (ko, vo)
    }

    /// Check the paged invariants (tests call it after every operation).
    pub fn check_invariants(&self) -> Result<()> {
        if let Store::Paged {
            block_size,
            num_blocks,
            block_table,
            free,
            ..
        } = &self.store
        {
            if block_table.len() != self.len.div_ceil(*block_size) {
                return Err(Error::invalid(
                    "block_table",
                    format!("{} blocks for {} tokens", block_table.len(), self.len),
                ));
            }
            let mut seen = vec![false; *num_blocks];
            for &b in block_table.iter().chain(free) {
                let b = b as usize;
                if b >= *num_blocks || seen[b] {
                    return Err(Error::invalid(
                        "block ids",
                        format!("{b} duplicated or out of range"),
                    ));
                }
                seen[b] = true;
            }
            if seen.iter().any(|s| !s) {
                return Err(Error::invalid(
                    "block ids",
                    "a block is neither used nor free",
                ));
            }
        }
        Ok(())
    }
}
