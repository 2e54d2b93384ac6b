//! `switchyard vocab build` and `switchyard vocab eval`: AdaptiVocab domain vocabularies.
//!
//! Build (METHODS.md, AdaptiVocab):
//! 1. Tokenize the corpus (files, directories, `.gz`) with the base tokenizer, in parallel,
//!    one document per file (n-grams never cross documents).
//! 2. Removal: K tokens that have a BPE merge rule and are not special or byte tokens —
//!    tokens unused in the corpus first (longest first), then the least frequent. Each is
//!    rewritten as its merge, expanded recursively into surviving tokens.
//! 3. Addition: count token n-grams (n = 2..3, across words) over the corpus with removed
//!    tokens expanded; skip digit-only n-grams and ones holding byte or special tokens; keep
//!    the top 5·K by frequency. Greedy selection by score = frequency × n: take the best, then
//!    subtract from every candidate the occurrences that overlap the chosen one's occurrences
//!    (exactly: every n-gram window that shares a token with a taken occurrence dies), until K
//!    are chosen.
//! 4. Freed ids, in ascending order, go to the n-grams in selection order.
//!
//! Everything is ordered with explicit tie-breaks, so the same inputs give the same patch.

use std::collections::{BinaryHeap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};
use switchyard_adaptivocab::{Added, Matching, Patch, PatchFile, Removed, FORMAT, VERSION};
use switchyard_engine::gguf::GgufFile;
use switchyard_engine::tokenizer::Tokenizer;

use crate::bar;

/// The base tokenizer of a model (a .gguf file or a Hugging Face directory), without its
/// weights.
pub fn load_tokenizer(model: &Path) -> Result<Tokenizer> {
    if !model.exists() {
        bail!("{}: no such file or directory", model.display());
    }
    let t = if model.is_dir() {
        Tokenizer::from_hf_dir(model)
    } else {
        let g = GgufFile::open(model)?;
        Tokenizer::from_gguf(&g)
    };
    t.with_context(|| format!("reading the tokenizer of {}", model.display()))
}

/// Every file under `paths` (directories recursively), sorted; hidden files skipped.
pub fn corpus_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let md = std::fs::metadata(p).with_context(|| format!("corpus path {}", p.display()))?;
        if md.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|e| {
                    !e.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, out)?;
            }
        } else {
            out.push(p.to_path_buf());
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        walk(p, &mut out)?;
    }
    if out.is_empty() {
        bail!("no corpus files found under {:?}", paths);
    }
    Ok(out)
}

/// A corpus file's text (`.gz` decompressed); invalid UTF-8 is replaced.
pub fn read_text(p: &Path) -> Result<String> {
    let raw = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    let bytes = if p.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: not a valid gzip file", p.display()))?;
        out
    } else {
        raw
    };
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Tokenize every file (no BOS), in parallel; one id list per file, in file order. Also
/// returns the total bytes of text.
pub fn tokenize_files(
    tok: &Tokenizer,
    files: &[PathBuf],
    what: &str,
) -> Result<(Vec<Vec<u32>>, usize)> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len().max(1));
    let pb = bar(files.len() as u64, what);
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Slot = std::sync::Mutex<Option<Result<(Vec<u32>, usize)>>>;
    let slots: Vec<Slot> = (0..files.len())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= files.len() {
                    break;
                }
                let r = read_text(&files[i]).and_then(|t| {
                    let ids = tok
                        .encode(&t, false)
                        .with_context(|| format!("tokenizing {}", files[i].display()))?;
                    Ok((ids, t.len()))
                });
                *slots[i].lock().unwrap() = Some(r);
                pb.inc(1);
            });
        }
    });
    pb.finish_and_clear();
    let mut docs = Vec::with_capacity(files.len());
    let mut bytes = 0;
    for s in slots {
        let (ids, b) = s.into_inner().unwrap().expect("every file was tokenized")?;
        docs.push(ids);
        bytes += b;
    }
    Ok((docs, bytes))
}

/// What the builder needs to know about each base token.
struct VocabFacts {
    /// The merge that produces each token, if any.
    merge: Vec<Option<(u32, u32)>>,
    /// Special (added/control) tokens.
    special: Vec<bool>,
    /// Byte tokens: `<0xNN>` pieces, or tokens that decode to an incomplete UTF-8 sequence.
    byte: Vec<bool>,
    /// Decoded text of each token.
    text: Vec<String>,
    /// Token strings (vocabulary form).
    piece: Vec<String>,
    sha256: String,
}

fn vocab_facts(tok: &Tokenizer) -> Result<VocabFacts> {
    let js = tok
        .inner()
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    let sha256 = switchyard_plugin_host::sha256_bytes(js.as_bytes());
    let v: Json = serde_json::from_str(&js)?;
    let model = &v["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(
            "the tokenizer is a {} model; AdaptiVocab needs a BPE vocabulary with merges",
            model["type"]
        );
    }
    let n = tok.vocab_size();
    let mut merge = vec![None; n];
    let merges = model["merges"].as_array().cloned().unwrap_or_default();
    let mut found = 0usize;
    for m in &merges {
        let (a, b) = match m {
            Json::String(s) => match s.split_once(' ') {
                Some((a, b)) => (a.to_string(), b.to_string()),
                None => continue,
            },
            Json::Array(p) if p.len() == 2 => (
                p[0].as_str().unwrap_or_default().to_string(),
                p[1].as_str().unwrap_or_default().to_string(),
            ),
            _ => continue,
        };
        let (Some(ia), Some(ib), Some(ic)) = (
            tok.token_to_id(&a),
            tok.token_to_id(&b),
            tok.token_to_id(&format!("{a}{b}")),
        ) else {
            continue;
        };
        if (ic as usize) < n && merge[ic as usize].is_none() && ia != ic && ib != ic {
            merge[ic as usize] = Some((ia, ib));
            found += 1;
        }
    }
    if found == 0 {
        bail!("the tokenizer has no BPE merges: no token can be removed");
    }
    let mut special = vec![false; n];
    for t in v["added_tokens"].as_array().into_iter().flatten() {
        if let Some(id) = t["id"].as_u64() {
            if (id as usize) < n {
                special[id as usize] = true;
            }
        }
    }
    for id in [tok.bos, tok.eos]
        .into_iter()
        .flatten()
        .chain(tok.stop_ids.iter().copied())
    {
        if (id as usize) < n {
            special[id as usize] = true;
        }
    }
    let mut byte = vec![false; n];
    let mut text = vec![String::new(); n];
    let mut piece = vec![String::new(); n];
    for id in 0..n as u32 {
        let p = tok.id_to_token(id).unwrap_or_default();
        let t = tok.decode(&[id], false).unwrap_or_default();
        byte[id as usize] =
            (p.starts_with("<0x") && p.ends_with('>') && p.len() == 6) || t.contains('\u{FFFD}');
        text[id as usize] = t;
        piece[id as usize] = p;
    }
    Ok(VocabFacts {
        merge,
        special,
        byte,
        text,
        piece,
        sha256,
    })
}

/// The ids of an n-gram key (`n << 32n | ids`, n = 2 or 3).
fn unpack(k: u128) -> Vec<u32> {
    if k >> 64 == 2 {
        vec![(k >> 32) as u32, k as u32]
    } else {
        vec![(k >> 64) as u32, (k >> 32) as u32, k as u32]
    }
}

/// Options of `vocab build`.
pub struct BuildOptions {
    pub model: PathBuf,
    pub corpus: Vec<PathBuf>,
    pub replace: usize,
    pub max_n: usize,
    pub matching: Matching,
    pub out: PathBuf,
    pub json: bool,
}

pub fn build(o: &BuildOptions) -> Result<()> {
    let t0 = Instant::now();
    if o.replace == 0 {
        bail!("--replace must be at least 1");
    }
    if !(2..=3).contains(&o.max_n) {
        bail!("--max-n must be 2 or 3");
    }
    let tok = load_tokenizer(&o.model)?;
    let facts = vocab_facts(&tok)?;
    let n_vocab = tok.vocab_size();
    let files = corpus_files(&o.corpus)?;
    eprintln!("tokenizing {} corpus files ...", files.len());
    let (docs, bytes) = tokenize_files(&tok, &files, "tokenizing")?;
    let total: usize = docs.iter().map(|d| d.len()).sum();
    eprintln!(
        "corpus: {} files, {:.1} MB, {} base tokens ({:.1} s)",
        files.len(),
        bytes as f64 / 1e6,
        total,
        t0.elapsed().as_secs_f64()
    );

    // 2. Removal.
    let mut freq = vec![0u64; n_vocab];
    for d in &docs {
        for &t in d {
            if (t as usize) < n_vocab {
                freq[t as usize] += 1;
            }
        }
    }
    let mut removable: Vec<u32> = (0..n_vocab as u32)
        .filter(|&i| {
            let i = i as usize;
            facts.merge[i].is_some() && !facts.special[i] && !facts.byte[i]
        })
        .collect();
    removable.sort_by(|&a, &b| {
        let (fa, fb) = (freq[a as usize], freq[b as usize]);
        fa.cmp(&fb)
            .then_with(|| {
                // Unused tokens: longest first.
                if fa == 0 {
                    facts.piece[b as usize]
                        .len()
                        .cmp(&facts.piece[a as usize].len())
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .then(b.cmp(&a))
    });
    if removable.len() < o.replace {
        bail!(
            "--replace {}: only {} tokens of this vocabulary can be removed",
            o.replace,
            removable.len()
        );
    }
    let removed_ids: Vec<u32> = removable[..o.replace].to_vec();
    let mut is_removed = vec![false; n_vocab];
    for &r in &removed_ids {
        is_removed[r as usize] = true;
    }
    // Decompositions: expand merges until only surviving ids are left.
    let mut decomp: HashMap<u32, Vec<u32>> = HashMap::new();
    fn expand(id: u32, facts: &VocabFacts, is_removed: &[bool], out: &mut Vec<u32>, depth: usize) {
        match facts.merge[id as usize] {
            Some((a, b)) if is_removed[id as usize] && depth < 256 => {
                expand(a, facts, is_removed, out, depth + 1);
                expand(b, facts, is_removed, out, depth + 1);
            }
            _ => out.push(id),
        }
    }
    for &r in &removed_ids {
        let mut d = Vec::new();
        expand(r, &facts, &is_removed, &mut d, 0);
        if d.iter().any(|&x| is_removed[x as usize]) || d.len() < 2 {
            bail!("internal: token {r} does not decompose into surviving tokens");
        }
        decomp.insert(r, d);
    }
    let unused = removed_ids
        .iter()
        .filter(|&&r| freq[r as usize] == 0)
        .count();
    eprintln!(
        "removal: {} tokens ({} unused in the corpus, {} used: their {} occurrences are expanded)",
        removed_ids.len(),
        unused,
        removed_ids.len() - unused,
        removed_ids.iter().map(|&r| freq[r as usize]).sum::<u64>()
    );

    // The corpus with removed tokens expanded, documents separated by SEP.
    const SEP: u32 = u32::MAX;
    let mut corpus: Vec<u32> = Vec::with_capacity(total + docs.len());
    for d in &docs {
        for &t in d {
            match decomp.get(&t) {
                Some(x) => corpus.extend_from_slice(x),
                None => corpus.push(t),
            }
        }
        corpus.push(SEP);
    }
    drop(docs);

    // 3. Candidates.
    let ok_token = |t: u32| t != SEP && !facts.special[t as usize] && !facts.byte[t as usize];
    let digit_only = |g: &[u32]| {
        g.iter()
            .flat_map(|&t| facts.text[t as usize].chars())
            .all(|c| c.is_ascii_digit())
    };
    let key = |g: &[u32]| -> u128 {
        let mut k = g.len() as u128;
        for &t in g {
            k = k << 32 | t as u128;
        }
        k
    };
    let pb = bar(corpus.len() as u64, "n-grams");
    let mut counts: HashMap<u128, u32> = HashMap::new();
    for i in 0..corpus.len() {
        if i % (1 << 16) == 0 {
            pb.set_position(i as u64);
        }
        for n in 2..=o.max_n {
            if i + n > corpus.len() {
                break;
            }
            let g = &corpus[i..i + n];
            if !g.iter().all(|&t| ok_token(t)) {
                break;
            }
            *counts.entry(key(g)).or_default() += 1;
        }
    }
    pb.finish_and_clear();
    let distinct = counts.len();
    let mut cands: Vec<(u32, Vec<u32>)> = counts
        .into_iter()
        .filter(|&(_, c)| c >= 2)
        .map(|(k, c)| (c, unpack(k)))
        .filter(|(_, g)| !digit_only(g))
        .collect();
    cands.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    cands.truncate(5 * o.replace);
    eprintln!(
        "n-grams: {} distinct (n = 2..{}), {} candidates kept",
        distinct,
        o.max_n,
        cands.len()
    );
    let index: HashMap<u128, u32> = cands
        .iter()
        .enumerate()
        .map(|(i, (_, g))| (key(g), i as u32))
        .collect();
    // Occurrence positions of every candidate.
    let mut positions: Vec<Vec<u32>> = vec![Vec::new(); cands.len()];
    for i in 0..corpus.len() {
        for n in 2..=o.max_n {
            if i + n > corpus.len() {
                break;
            }
            if let Some(&c) = index.get(&key(&corpus[i..i + n])) {
                positions[c as usize].push(i as u32);
            }
        }
    }
    let mut count: Vec<u64> = cands.iter().map(|c| c.0 as u64).collect();
    // dead[n-2][s]: the window of length n starting at s overlaps a taken occurrence.
    let mut dead: Vec<Vec<bool>> = (2..=o.max_n).map(|_| vec![false; corpus.len()]).collect();
    let mut heap: BinaryHeap<(u64, std::cmp::Reverse<u32>)> = cands
        .iter()
        .enumerate()
        .map(|(i, (c, g))| (*c as u64 * g.len() as u64, std::cmp::Reverse(i as u32)))
        .collect();
    let mut chosen: Vec<(u32, u64)> = Vec::new();
    let pb = bar(o.replace as u64, "selecting");
    while chosen.len() < o.replace {
        let Some((score, std::cmp::Reverse(c))) = heap.pop() else {
            break;
        };
        let n = cands[c as usize].1.len();
        let now = count[c as usize] * n as u64;
        if now == 0 {
            continue;
        }
        if now != score {
            heap.push((now, std::cmp::Reverse(c)));
            continue;
        }
        // Take every live occurrence (left to right; self-overlaps die as they are taken).
        let mut taken = 0u64;
        let pos = std::mem::take(&mut positions[c as usize]);
        for &p in &pos {
            let p = p as usize;
            if dead[n - 2][p] {
                continue;
            }
            taken += 1;
            for q in p..p + n {
                for (m, d) in dead.iter_mut().enumerate() {
                    let len = m + 2;
                    for s in q.saturating_sub(len - 1)..=q {
                        if s + len > corpus.len() || d[s] {
                            continue;
                        }
                        d[s] = true;
                        if let Some(&o2) = index.get(&key(&corpus[s..s + len])) {
                            count[o2 as usize] = count[o2 as usize].saturating_sub(1);
                        }
                    }
                }
            }
        }
        count[c as usize] = 0;
        chosen.push((c, taken));
        pb.inc(1);
    }
    pb.finish_and_clear();
    if chosen.len() < o.replace {
        eprintln!(
            "note: only {} n-grams have occurrences left; {} freed ids stay unused",
            chosen.len(),
            o.replace - chosen.len()
        );
    }

    // 4. Ids.
    let mut freed = removed_ids.clone();
    freed.sort_unstable();
    let saved: u64 = chosen
        .iter()
        .map(|&(c, t)| t * (cands[c as usize].1.len() as u64 - 1))
        .sum();
    let file = PatchFile {
        format: FORMAT.into(),
        version: VERSION,
        base_vocab_size: n_vocab as u32,
        base_tokenizer_sha256: facts.sha256.clone(),
        matching: o.matching,
        description: format!(
            "{} n-grams (n <= {}) from {} files ({:.1} MB, {} base tokens)",
            chosen.len(),
            o.max_n,
            files.len(),
            bytes as f64 / 1e6,
            total
        ),
        removed: removed_ids
            .iter()
            .map(|&r| Removed {
                id: r,
                token: facts.piece[r as usize].clone(),
                count: freq[r as usize],
                decomposition: decomp[&r].clone(),
            })
            .collect(),
        added: chosen
            .iter()
            .zip(&freed)
            .map(|(&(c, taken), &id)| {
                let g = &cands[c as usize].1;
                Added {
                    id,
                    ngram: g.clone(),
                    text: tok.decode(g, false).unwrap_or_default(),
                    count: taken,
                }
            })
            .collect(),
    };
    // The file must load as a patch (validation of everything above).
    let patch = Patch::new(file)
        .map_err(|e| anyhow::anyhow!("internal: the built patch does not validate: {e}"))?;
    let text = patch.file.to_json();
    write_atomic(&o.out, text.as_bytes())?;
    let secs = t0.elapsed().as_secs_f64();
    let summary = json!({
        "out": o.out.display().to_string(),
        "files": files.len(),
        "bytes": bytes,
        "base_tokens": total,
        "removed": patch.file.removed.len(),
        "removed_unused": unused,
        "added": patch.file.added.len(),
        "corpus_tokens_saved": saved,
        "corpus_reduction": saved as f64 / total.max(1) as f64,
        "seconds": secs,
    });
    if o.json {
        println!("{summary}");
    } else {
        println!(
            "wrote {} ({} n-grams in {} freed ids); on the build corpus {} → {} tokens ({:.1}% fewer), {:.1} s",
            o.out.display(),
            patch.file.added.len(),
            patch.file.removed.len(),
            total,
            total as u64 - saved,
            100.0 * saved as f64 / total.max(1) as f64,
            secs
        );
    }
    Ok(())
}

/// Write `bytes` to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!(
            "{}: the directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let tmp = dir.join(format!(
        ".{}.partial-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Read and validate a patch file, naming the file in errors; the patch and the file's bytes.
pub fn read_patch(path: &Path) -> Result<(Patch, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading patch {}", path.display()))?;
    let p = Patch::from_json(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((p, bytes))
}

/// `vocab eval`: base vs patched token counts and the round trip, over files.
pub fn eval(
    model: &Path,
    patch_path: &Path,
    files: &[PathBuf],
    matching: Option<Matching>,
    json: bool,
) -> Result<()> {
    let tok = load_tokenizer(model)?;
    let (mut patch, _) = read_patch(patch_path)?;
    if patch.base_vocab_size() as usize != tok.vocab_size() {
        bail!(
            "{} was built for a vocabulary of {} ids; {} has {}",
            patch_path.display(),
            patch.base_vocab_size(),
            model.display(),
            tok.vocab_size()
        );
    }
    if let Some(m) = matching {
        patch.matching = m;
    }
    let files = corpus_files(files)?;
    let (docs, bytes) = tokenize_files(&tok, &files, "tokenizing")?;
    let (mut base, mut patched, mut removed_in_input) = (0usize, 0usize, 0usize);
    let mut ids_exact = true;
    let mut text_exact = true;
    let mut expanded_exact = true;
    let mut bad = Vec::new();
    let mut enc_secs = 0f64;
    for (f, ids) in files.iter().zip(&docs) {
        let t = Instant::now();
        let exp = patch
            .expand(ids)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        let enc = patch.encode_expanded(&exp);
        enc_secs += t.elapsed().as_secs_f64();
        let dec = patch
            .decode(&enc)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        base += ids.len();
        patched += enc.len();
        removed_in_input += ids.iter().filter(|&&i| patch.is_removed(i)).count();
        let e_ok = dec == exp;
        let t_ok = tok.decode(&dec, false)? == tok.decode(ids, false)?;
        ids_exact &= dec == *ids;
        expanded_exact &= e_ok;
        text_exact &= t_ok;
        if !(e_ok && t_ok) {
            bad.push(f.display().to_string());
        }
    }
    let reduction = 1.0 - patched as f64 / base.max(1) as f64;
    let v = json!({
        "model": model.display().to_string(),
        "patch": patch_path.display().to_string(),
        "matching": match patch.matching { Matching::Longest => "longest", Matching::SelectionOrder => "selection-order" },
        "files": files.len(),
        "bytes": bytes,
        "base_tokens": base,
        "patched_tokens": patched,
        "reduction": reduction,
        "bytes_per_token_base": bytes as f64 / base.max(1) as f64,
        "bytes_per_token_patched": bytes as f64 / patched.max(1) as f64,
        "roundtrip_ok": expanded_exact && text_exact,
        "roundtrip_text_exact": text_exact,
        "roundtrip_ids_exact": ids_exact,
        "removed_tokens_in_input": removed_in_input,
        "roundtrip_failures": bad,
        "native_encode_ns_per_token": enc_secs * 1e9 / base.max(1) as f64,
    });
    if json {
        println!("{v}");
    } else {
        println!(
            "{} files, {} bytes: {} base tokens → {} patched ({:.2}% fewer); round trip {}",
            files.len(),
            bytes,
            base,
            patched,
            100.0 * reduction,
            if expanded_exact && text_exact {
                "exact"
            } else {
                "FAILED"
            }
        );
    }
    if !(expanded_exact && text_exact) {
        bail!(
            "the round trip failed on {} file(s): {}",
            bad.len(),
            bad.join(", ")
        );
    }
    Ok(())
}

/// An AdaptiVocab patch run natively (the same code as the WebAssembly plugin), as the
/// engine's tokenizer patch.
pub struct NativePatch(pub Patch, String);

impl NativePatch {
    /// Read `path` and check it against the engine's vocabulary size. (Whether the model is
    /// the one made for this patch is the caller's choice: `eval perplexity` also scores a
    /// patch on other weights.)
    pub fn open(path: &Path, e: &switchyard_engine::Engine) -> Result<Self> {
        let (p, _) = read_patch(path)?;
        if p.base_vocab_size() as usize != e.model.cfg.vocab_size {
            bail!(
                "{} was built for a vocabulary of {} ids; the model has {}",
                path.display(),
                p.base_vocab_size(),
                e.model.cfg.vocab_size
            );
        }
        Ok(Self(p, path.display().to_string()))
    }
}

impl switchyard_engine::patch::TokenPatch for NativePatch {
    fn name(&self) -> &str {
        &self.1
    }
    fn encode(&self, ids: &[u32]) -> switchyard_engine::Result<Vec<u32>> {
        self.0
            .encode(ids)
            .map_err(switchyard_engine::EngineError::Invalid)
    }
    fn decode(&self, ids: &[u32]) -> switchyard_engine::Result<Vec<u32>> {
        self.0
            .decode(ids)
            .map_err(switchyard_engine::EngineError::Invalid)
    }
}

/// `vocab bench`: the cost of the patch's encode and decode on real text, through the
/// WebAssembly plugin (wasmtime, the copies in and out of the guest) and natively (the same
/// crate compiled into this binary), side by side on the same prompts.
pub fn bench(
    model: &Path,
    patch_path: &Path,
    plugin: &Path,
    files: &[PathBuf],
    tokens: usize,
    iters: usize,
    json_out: bool,
) -> Result<()> {
    use std::hint::black_box;
    if tokens == 0 || iters == 0 {
        bail!("--tokens and --iters must be at least 1");
    }
    let tok = load_tokenizer(model)?;
    let (patch, config) = read_patch(patch_path)?;
    let files = corpus_files(files)?;
    let (docs, _) = tokenize_files(&tok, &files, "tokenizing")?;
    let all: Vec<u32> = docs.concat();
    let prompts: Vec<&[u32]> = all.chunks_exact(tokens).take(64).collect();
    if prompts.is_empty() {
        bail!("the files hold fewer than {tokens} tokens");
    }
    let dir = plugin.parent().unwrap_or(Path::new(".")).to_path_buf();
    let host = switchyard_plugin_host::PluginHost::new(&[dir]);
    let w = std::sync::Arc::new(
        host.load_wasm(plugin)
            .with_context(|| format!("loading plugin {}", plugin.display()))?,
    );
    let inst = w
        .tokenizer_patch(&config, switchyard_plugin_host::WasmLimits::default(), None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", plugin.display()))?;
    let mut patched = Vec::new();
    for p in &prompts {
        let n = patch.encode(p).map_err(anyhow::Error::msg)?;
        let wv = inst.encode(p).map_err(|e| anyhow::anyhow!("{e}"))?;
        if n != wv {
            bail!("the plugin's encode differs from the native encode");
        }
        patched.push(n);
    }
    let time = |f: &mut dyn FnMut(usize)| -> f64 {
        let mut rounds: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                for i in 0..iters {
                    f(i % prompts.len());
                }
                t.elapsed().as_nanos() as f64 / iters as f64
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        rounds[2]
    };
    let per_k = |ns: f64| ns * 1000.0 / tokens as f64;
    let native_enc = per_k(time(&mut |i| {
        black_box(patch.encode(black_box(prompts[i])).unwrap());
    }));
    let wasm_enc = per_k(time(&mut |i| {
        black_box(inst.encode(black_box(prompts[i])).unwrap());
    }));
    let native_dec = per_k(time(&mut |i| {
        black_box(patch.decode(black_box(&patched[i])).unwrap());
    }));
    let wasm_dec = per_k(time(&mut |i| {
        black_box(inst.decode(black_box(&patched[i])).unwrap());
    }));
    let tok_ns = per_k(time(&mut |i| {
        let text = tok.decode(prompts[i], false).unwrap();
        black_box(tok.encode(&text, false).unwrap());
    }));
    let v = json!({
        "prompt_tokens": tokens,
        "prompts": prompts.len(),
        "iters": iters,
        "encode_us_per_1000_tokens": {"wasm": wasm_enc / 1e3, "native": native_enc / 1e3, "ratio": wasm_enc / native_enc},
        "decode_us_per_1000_tokens": {"wasm": wasm_dec / 1e3, "native": native_dec / 1e3, "ratio": wasm_dec / native_dec},
        "base_tokenizer_encode_us_per_1000_tokens": tok_ns / 1e3,
        "patch_share_of_tokenization": wasm_enc / tok_ns,
    });
    if json_out {
        println!("{v}");
    } else {
        println!(
            "per 1,000 base tokens: encode {:.1} µs WebAssembly vs {:.1} µs native ({:.2}×), decode {:.1} vs {:.1} µs; base tokenizer {:.0} µs",
            wasm_enc / 1e3,
            native_enc / 1e3,
            wasm_enc / native_enc,
            wasm_dec / 1e3,
            native_dec / 1e3,
            tok_ns / 1e3
        );
    }
    Ok(())
}
