//! GGUF v2/v3 reader: header, metadata and tensor directory, with tensor data borrowed from an mmap.
//!
//! The parser works on a byte slice and checks every length and offset against it, so a
//! truncated or corrupt file gives an error rather than a panic (see fuzz/ for the fuzz target).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
/// Caps that keep a corrupt header from asking for absurd allocations.
const MAX_COUNT: u64 = 1 << 24;
const MAX_STRING: u64 = 1 << 26;
const MAX_DIMS: u32 = 4;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            Value::Bool(b) => Some(b as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: dims[0] is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub n_bytes: usize,
}

/// Parsed header of a GGUF file (no tensor data copied).
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "truncated: needed {n} bytes at offset {} but the file has {}",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(format!(
                "string length {len} at offset {} is implausible",
                self.pos - 8
            ));
        }
        let b = self.take(len as usize)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| format!("string at offset {} is not UTF-8", self.pos - b.len()))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => match self.arr::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("invalid bool byte {b}")),
            },
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("arrays nested too deeply".into());
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                if n > MAX_COUNT {
                    return Err(format!("array length {n} is implausible"));
                }
                // Each element takes at least one byte: reject counts larger than the rest of the file.
                if n as usize > self.buf.len() - self.pos {
                    return Err(format!(
                        "truncated: array of {n} elements runs past the end"
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

/// Parse a GGUF header from the bytes of a whole file. Never panics on malformed input.
pub fn parse_header(buf: &[u8]) -> Result<GgufHeader, String> {
    let mut c = Cursor { buf, pos: 0 };
    if c.take(4)
        .map_err(|_| "file is shorter than the GGUF magic".to_string())?
        != MAGIC
    {
        return Err("bad magic (expected 'GGUF')".into());
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (supported: 2, 3)"
        ));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    if n_tensors > MAX_COUNT || n_kv > MAX_COUNT {
        return Err(format!(
            "implausible counts: {n_tensors} tensors, {n_kv} metadata entries"
        ));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        let v = c
            .value(ty, 0)
            .map_err(|e| format!("metadata '{key}': {e}"))?;
        metadata.insert(key, v);
    }
    let mut tensors = Vec::with_capacity(n_tensors.min(4096) as usize);
    for _ in 0..n_tensors {
        let name = c.string()?;
        let nd = c.u32()?;
        if nd == 0 || nd > MAX_DIMS {
            return Err(format!("tensor '{name}': {nd} dimensions"));
        }
        let mut dims = Vec::with_capacity(nd as usize);
        for _ in 0..nd {
            dims.push(c.u64()?);
        }
        let ty = c.u32()?;
        let dtype = GgmlType::from_u32(ty).ok_or_else(|| match crate::quant::ggml_type_name(ty) {
            Some(n) => format!(
                "tensor '{name}': unsupported tensor type {n} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)"
            ),
            None => format!("tensor '{name}': unknown tensor type {ty}"),
        })?;
        let offset = c.u64()?;
        let n_elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n < (1u64 << 40))
            .ok_or_else(|| format!("tensor '{name}': implausible shape {dims:?}"))?;
        let bs = dtype.block_size() as u64;
        if dims[0] % bs != 0 {
            return Err(format!(
                "tensor '{name}': row length {} is not a multiple of the {:?} block size {bs}",
                dims[0], dtype
            ));
        }
        let n_bytes = (n_elems / bs) * dtype.block_bytes() as u64;
        tensors.push(TensorInfo {
            name,
            dims,
            dtype,
            offset,
            n_bytes: n_bytes as usize,
        });
    }
    let align = match metadata.get("general.alignment") {
        Some(v) => v
            .as_u64()
            .filter(|&a| a > 0 && a.is_power_of_two() && a <= 1 << 16)
            .ok_or("general.alignment is not a small power of two")?,
        None => 32,
    };
    let data_offset = (c.pos as u64).div_ceil(align) * align;
    let data_len = (buf.len() as u64).saturating_sub(data_offset);
    for t in &tensors {
        if t.offset % align != 0 {
            return Err(format!(
                "tensor '{}': offset {} is not aligned",
                t.name, t.offset
            ));
        }
        let end = t.offset.checked_add(t.n_bytes as u64);
        if end.is_none_or(|e| e > data_len) {
            return Err(format!(
                "truncated: tensor '{}' needs bytes {}..{} of the data section, which has {data_len}",
                t.name,
                t.offset,
                t.offset.saturating_add(t.n_bytes as u64)
            ));
        }
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        data_offset,
    })
}

/// A GGUF file mapped into memory.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: GgufHeader,
    pub mmap: Arc<memmap2::Mmap>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
        // SAFETY: the file is opened read-only; like every mmap-based loader we assume it is
        // not truncated by another process while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| EngineError::io(path, e))?;
        let header = parse_header(&mmap).map_err(|reason| EngineError::Gguf {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            header,
            mmap: Arc::new(mmap),
        })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.header.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.header.data_offset + t.offset) as usize;
        &self.mmap[start..start + t.n_bytes]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n_tensors: u64, kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        for (k, t, v) in kvs {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        b
    }

    #[test]
    fn parses_metadata() {
        let h = parse_header(&header(0, &[("a", 4, 7u32.to_le_bytes().to_vec())])).unwrap();
        assert_eq!(h.metadata["a"], Value::U32(7));
    }

    #[test]
    fn rejects_garbage_without_panic() {
        assert!(parse_header(b"GGU").is_err());
        assert!(parse_header(b"GGML\x03\0\0\0").is_err());
        let mut b = header(1, &[]);
        b.truncate(b.len() - 3);
        assert!(parse_header(&b).unwrap_err().contains("truncated"));
        // A huge string length.
        let b = header(0, &[("k", 8, u64::MAX.to_le_bytes().to_vec())]);
        assert!(parse_header(&b).is_err());
    }

    #[test]
    fn every_prefix_of_a_real_file_is_an_error_not_a_panic() {
        let dir = std::env::var_os("SWITCHYARD_STORIES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/stories260K")
            });
        let path = dir.join("stories260K.f32.gguf");
        let bytes = std::fs::read(path).unwrap();
        assert!(parse_header(&bytes).is_ok());
        let full = parse_header(&bytes).unwrap();
        let data_end = full.data_offset as usize;
        for cut in (0..data_end).step_by(7).chain([bytes.len() - 1]) {
            assert!(
                parse_header(&bytes[..cut]).is_err(),
                "prefix {cut} accepted"
            );
        }
    }
}
