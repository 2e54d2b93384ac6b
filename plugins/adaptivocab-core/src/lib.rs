//! AdaptiVocab tokenizer patches (Nakash et al., COLM 2025): the patch file format and the
//! patched encode/decode.
//!
//! A patch frees `K` ids of a base BPE vocabulary (tokens that are rare or absent in a domain;
//! each is rewritten as its merge decomposition into surviving tokens) and gives the freed ids
//! to `K` domain n-grams of surviving base tokens. The vocabulary size does not change: kept
//! tokens keep their ids, and an n-gram takes a freed id. A model that reads patched ids
//! needs new embedding and LM-head rows for the n-gram ids (`switchyard transform
//! adaptivocab`).
//!
//! # The patch file (format `switchyard-adaptivocab-patch`, version 1)
//!
//! One JSON object:
//!
//! ```json
//! {
//!   "format": "switchyard-adaptivocab-patch",
//!   "version": 1,
//!   "base_vocab_size": 49152,
//!   "base_tokenizer_sha256": "…",        // of the base tokenizer's JSON (informative)
//!   "matching": "longest",               // or "selection-order"
//!   "description": "…",
//!   "removed": [ { "id": 31415, "token": "Ġfoo", "count": 0,
//!                  "decomposition": [250, 1012] } ],
//!   "added":   [ { "id": 31415, "ngram": [314, 29, 1066], "text": " of the",
//!                  "count": 12345 } ]
//! }
//! ```
//!
//! - `removed[].decomposition`: surviving base ids whose text concatenates to the removed
//!   token's (its BPE merge, expanded recursively until no removed id is left).
//! - `added[]`, in selection order (the greedy order of the builder): `ngram` holds 2 or more
//!   surviving base ids; `id` is a freed id. Every added id is a removed id; a removed id that
//!   no n-gram took is simply never produced.
//! - `count`: corpus occurrences at build time (informative).
//!
//! # Encoding and decoding
//!
//! `encode`: expand every removed id into its decomposition, then scan left to right and, at
//! each position, replace a matching n-gram by its id and step past it. `matching` picks
//! which n-gram wins where several start at one position: the longest (a trie walk), or the
//! one selected first (the reference implementation's order). Positions with no match keep
//! their base id.
//!
//! `decode`: each n-gram id becomes its base ids; every other id is kept, except a removed id
//! that no n-gram took, which becomes its decomposition. So `decode(encode(x))` is `x` with
//! removed ids written as their decompositions: the same text, byte for byte, and exactly `x`
//! when `x` holds no removed id (see [`Patch::expand`]).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "switchyard-adaptivocab-patch";
pub const VERSION: u32 = 1;

/// Which n-gram wins where several match at one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Matching {
    /// The longest matching n-gram (a trie walk).
    #[default]
    Longest,
    /// The matching n-gram that was selected first (the reference code's order).
    SelectionOrder,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Removed {
    pub id: u32,
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub count: u64,
    pub decomposition: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Added {
    pub id: u32,
    pub ngram: Vec<u32>,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub count: u64,
}

/// The patch file, as written and read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchFile {
    pub format: String,
    pub version: u32,
    pub base_vocab_size: u32,
    #[serde(default)]
    pub base_tokenizer_sha256: String,
    #[serde(default)]
    pub matching: Matching,
    #[serde(default)]
    pub description: String,
    pub removed: Vec<Removed>,
    pub added: Vec<Added>,
}

impl PatchFile {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a patch serializes")
    }
}

const NONE: u32 = u32::MAX;

/// A trie node: its terminal (n-gram id and selection rank) if an n-gram ends here.
#[derive(Debug, Clone)]
struct Node {
    id: u32,
    rank: u32,
}

/// A patch ready to encode and decode.
#[derive(Debug, Clone)]
pub struct Patch {
    pub file: PatchFile,
    /// Per base id: the range of `expansions` it becomes when encoding (removed ids), else
    /// (NONE, 0).
    removed: Vec<(u32, u32)>,
    /// Per id: the range of `expansions` an n-gram id decodes to, else (NONE, 0).
    ngram: Vec<(u32, u32)>,
    expansions: Vec<u32>,
    /// Trie edges: (node << 32 | token) → child node.
    edges: HashMap<u64, u32>,
    nodes: Vec<Node>,
    pub matching: Matching,
}

impl Patch {
    /// Parse and validate a patch file.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let file: PatchFile = serde_json::from_slice(bytes)
            .map_err(|e| format!("not an AdaptiVocab patch file: {e}"))?;
        Self::new(file)
    }

    /// Validate `file` and build the encode/decode tables.
    pub fn new(file: PatchFile) -> Result<Self, String> {
        if file.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", file.format));
        }
        if file.version != VERSION {
            return Err(format!(
                "patch format version {} is not supported (this reader knows {VERSION})",
                file.version
            ));
        }
        let v = file.base_vocab_size as usize;
        if v == 0 {
            return Err("base_vocab_size is 0".into());
        }
        let mut removed = vec![(NONE, 0u32); v];
        let mut expansions = Vec::new();
        for (i, r) in file.removed.iter().enumerate() {
            if r.id as usize >= v {
                return Err(format!(
                    "removed[{i}]: id {} is outside the vocabulary of {v}",
                    r.id
                ));
            }
            if removed[r.id as usize].0 != NONE {
                return Err(format!("removed[{i}]: id {} is removed twice", r.id));
            }
            if r.decomposition.len() < 2 {
                return Err(format!(
                    "removed[{i}]: id {} needs a decomposition of at least 2 ids",
                    r.id
                ));
            }
            removed[r.id as usize] = (expansions.len() as u32, r.decomposition.len() as u32);
            expansions.extend_from_slice(&r.decomposition);
        }
        for (i, r) in file.removed.iter().enumerate() {
            for &d in &r.decomposition {
                if d as usize >= v || removed[d as usize].0 != NONE {
                    return Err(format!(
                        "removed[{i}]: decomposition of id {} holds id {d}, which is removed or \
                         outside the vocabulary",
                        r.id
                    ));
                }
            }
        }
        let mut ngram = vec![(NONE, 0u32); v];
        let mut edges = HashMap::new();
        let mut nodes = vec![Node {
            id: NONE,
            rank: NONE,
        }];
        for (rank, a) in file.added.iter().enumerate() {
            let id = a.id as usize;
            if id >= v || removed[id].0 == NONE {
                return Err(format!(
                    "added[{rank}]: id {} is not a removed (freed) id",
                    a.id
                ));
            }
            if ngram[id].0 != NONE {
                return Err(format!(
                    "added[{rank}]: id {} is given to two n-grams",
                    a.id
                ));
            }
            if a.ngram.len() < 2 {
                return Err(format!("added[{rank}]: an n-gram needs at least 2 ids"));
            }
            let mut node = 0u32;
            for &t in &a.ngram {
                if t as usize >= v || removed[t as usize].0 != NONE {
                    return Err(format!(
                        "added[{rank}]: n-gram holds id {t}, which is removed or outside the \
                         vocabulary"
                    ));
                }
                let key = (node as u64) << 32 | t as u64;
                node = match edges.get(&key) {
                    Some(&n) => n,
                    None => {
                        nodes.push(Node {
                            id: NONE,
                            rank: NONE,
                        });
                        let n = (nodes.len() - 1) as u32;
                        edges.insert(key, n);
                        n
                    }
                };
            }
            if nodes[node as usize].id != NONE {
                return Err(format!(
                    "added[{rank}]: n-gram {:?} is listed twice",
                    a.ngram
                ));
            }
            nodes[node as usize] = Node {
                id: a.id,
                rank: rank as u32,
            };
            ngram[id] = (expansions.len() as u32, a.ngram.len() as u32);
            expansions.extend_from_slice(&a.ngram);
        }
        let matching = file.matching;
        Ok(Self {
            file,
            removed,
            ngram,
            expansions,
            edges,
            nodes,
            matching,
        })
    }

    pub fn base_vocab_size(&self) -> u32 {
        self.file.base_vocab_size
    }

    fn check(&self, id: u32) -> Result<(), String> {
        if id >= self.file.base_vocab_size {
            return Err(format!(
                "id {id} is outside the vocabulary of {}",
                self.file.base_vocab_size
            ));
        }
        Ok(())
    }

    /// Base ids with every removed id replaced by its decomposition.
    pub fn expand(&self, ids: &[u32]) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(ids.len() + ids.len() / 8);
        for &id in ids {
            self.check(id)?;
            let (o, n) = self.removed[id as usize];
            if o == NONE {
                out.push(id);
            } else {
                out.extend_from_slice(&self.expansions[o as usize..(o + n) as usize]);
            }
        }
        Ok(out)
    }

    /// Base ids → patched ids.
    pub fn encode(&self, ids: &[u32]) -> Result<Vec<u32>, String> {
        let x = self.expand(ids)?;
        Ok(self.encode_expanded(&x))
    }

    /// Patched encode of ids that hold no removed id (the output of [`Patch::expand`]).
    pub fn encode_expanded(&self, x: &[u32]) -> Vec<u32> {
        let mut out = Vec::with_capacity(x.len());
        let mut i = 0;
        while i < x.len() {
            // Walk the trie from x[i]; keep the winning terminal.
            let mut node = 0u32;
            let mut best: Option<(u32, usize, u32)> = None; // (id, length, rank)
            let mut j = i;
            while j < x.len() {
                let Some(&n) = self.edges.get(&((node as u64) << 32 | x[j] as u64)) else {
                    break;
                };
                node = n;
                j += 1;
                let t = &self.nodes[n as usize];
                if t.id != NONE {
                    let better = match (self.matching, best) {
                        (_, None) => true,
                        (Matching::Longest, Some(_)) => true,
                        (Matching::SelectionOrder, Some((_, _, r))) => t.rank < r,
                    };
                    if better {
                        best = Some((t.id, j - i, t.rank));
                    }
                }
            }
            match best {
                Some((id, len, _)) => {
                    out.push(id);
                    i += len;
                }
                None => {
                    out.push(x[i]);
                    i += 1;
                }
            }
        }
        out
    }

    /// Patched ids → base ids.
    pub fn decode(&self, ids: &[u32]) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(ids.len() * 2);
        for &id in ids {
            self.check(id)?;
            let (o, n) = self.ngram[id as usize];
            if o != NONE {
                out.extend_from_slice(&self.expansions[o as usize..(o + n) as usize]);
                continue;
            }
            let (o, n) = self.removed[id as usize];
            if o != NONE {
                out.extend_from_slice(&self.expansions[o as usize..(o + n) as usize]);
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Whether `id` is an n-gram id.
    pub fn is_ngram(&self, id: u32) -> bool {
        (id as usize) < self.ngram.len() && self.ngram[id as usize].0 != NONE
    }

    /// The base ids of n-gram `id`.
    pub fn ngram_of(&self, id: u32) -> Option<&[u32]> {
        let (o, n) = *self.ngram.get(id as usize)?;
        (o != NONE).then(|| &self.expansions[o as usize..(o + n) as usize])
    }

    /// Whether `id` was removed from the base vocabulary.
    pub fn is_removed(&self, id: u32) -> bool {
        (id as usize) < self.removed.len() && self.removed[id as usize].0 != NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(matching: Matching) -> PatchFile {
        PatchFile {
            format: FORMAT.into(),
            version: VERSION,
            base_vocab_size: 20,
            base_tokenizer_sha256: String::new(),
            matching,
            description: String::new(),
            removed: vec![
                Removed {
                    id: 10,
                    token: "ab".into(),
                    count: 0,
                    decomposition: vec![1, 2],
                },
                Removed {
                    id: 11,
                    token: "abc".into(),
                    count: 0,
                    decomposition: vec![1, 2, 3],
                },
                Removed {
                    id: 12,
                    token: "x".into(),
                    count: 0,
                    decomposition: vec![4, 5],
                },
            ],
            added: vec![
                Added {
                    id: 12,
                    ngram: vec![1, 2],
                    text: String::new(),
                    count: 9,
                },
                Added {
                    id: 10,
                    ngram: vec![1, 2, 3],
                    text: String::new(),
                    count: 5,
                },
                Added {
                    id: 11,
                    ngram: vec![3, 4],
                    text: String::new(),
                    count: 3,
                },
            ],
        }
    }

    #[test]
    fn longest_and_selection_order_differ_where_they_should() {
        let l = Patch::new(file(Matching::Longest)).unwrap();
        let s = Patch::new(file(Matching::SelectionOrder)).unwrap();
        let x = [1, 2, 3, 4, 7];
        assert_eq!(l.encode(&x).unwrap(), vec![10, 4, 7]);
        assert_eq!(s.encode(&x).unwrap(), vec![12, 11, 7]);
        for p in [&l, &s] {
            assert_eq!(p.decode(&p.encode(&x).unwrap()).unwrap(), x);
        }
    }

    #[test]
    fn removed_ids_expand_and_round_trip_to_their_decomposition() {
        let p = Patch::new(file(Matching::Longest)).unwrap();
        // 11 (removed "abc") expands to 1 2 3, then matches the trigram n-gram (id 10).
        let enc = p.encode(&[11, 0, 12]).unwrap();
        assert_eq!(enc, vec![10, 0, 4, 5]);
        assert_eq!(p.decode(&enc).unwrap(), vec![1, 2, 3, 0, 4, 5]);
        assert_eq!(p.decode(&enc).unwrap(), p.expand(&[11, 0, 12]).unwrap());
    }

    #[test]
    fn bad_patches_and_ids_are_refused() {
        let mut f = file(Matching::Longest);
        f.added[0].id = 3;
        assert!(Patch::new(f).unwrap_err().contains("not a removed"));
        let mut f = file(Matching::Longest);
        f.added[1].ngram = vec![1, 12];
        assert!(Patch::new(f).unwrap_err().contains("removed or outside"));
        let mut f = file(Matching::Longest);
        f.version = 2;
        assert!(Patch::new(f).unwrap_err().contains("version 2"));
        let p = Patch::new(file(Matching::Longest)).unwrap();
        assert!(p.encode(&[20]).unwrap_err().contains("outside"));
        assert!(p.decode(&[25]).unwrap_err().contains("outside"));
        assert!(Patch::from_json(b"{}")
            .unwrap_err()
            .contains("not an AdaptiVocab"));
    }

    #[test]
    fn random_round_trips() {
        let p = Patch::new(file(Matching::SelectionOrder)).unwrap();
        let mut s = 0x9e3779b97f4a7c15u64;
        for _ in 0..2000 {
            let n = (s % 17) as usize;
            let mut x = Vec::new();
            for _ in 0..n {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                x.push((s % 20) as u32);
            }
            let e = p.encode(&x).unwrap();
            assert!(e.len() <= p.expand(&x).unwrap().len());
            assert_eq!(p.decode(&e).unwrap(), p.expand(&x).unwrap());
        }
    }
}
