//! A bounded reader of `torch.save` archives (`.pth`, `.bin`, `.pt`): a zip holding
//! `<dir>/data.pkl` (a pickle naming each tensor's storage, dtype, offset, size and stride) and
//! `<dir>/data/<key>` (the raw little-endian storages).
//!
//! candle's reader materialises the pickle as a recursive value and clones memo entries deeply,
//! so a crafted file aborts the process: a million nested lists overflow the stack when the
//! value is dropped, a few dozen memo round trips double the value each time, a string length
//! or a tensor shape allocates whatever it says, and short argument tuples panic. This reader
//! runs the pickle on shared nodes with a nesting limit, an object budget and a copy budget,
//! reads strings and storages only after checking their lengths against the bytes that exist,
//! and reports every problem as [`crate::error::ModelError::Weights`] naming the file and the tensor.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The largest `data.pkl` accepted. A state dict's pickle takes ~150 bytes per tensor (ViT-L/14:
/// ~100 kB), so this leaves room for models a hundred times larger and bounds the objects a
/// crafted pickle can create.
const MAX_PICKLE_BYTES: u64 = 16 << 20;
/// Objects the pickle may create (each opcode creates at most one).
const MAX_OBJECTS: usize = 4 << 20;
/// Nesting of lists, tuples and dicts. A state dict nests ~5 deep; the limit keeps every
/// recursive walk (drop included) far from the stack's end.
const MAX_DEPTH: u32 = 100;
/// Container slots copied when a memoised container is modified (copy on write).
const MAX_COPIED: usize = 16 << 20;
/// Tensor rank (PyTorch itself stops at 64).
const MAX_RANK: usize = 16;

/// One tensor of the archive, as its pickle describes it.
#[derive(Debug, Clone)]
struct TensorInfo {
    dtype: DType,
    shape: Vec<usize>,
    /// Stored in Fortran order (a transposed view saved as is).
    fortran: bool,
    /// Zip entry of the storage (`archive/data/0`).
    entry: String,
    /// Byte range inside the storage.
    start: u64,
    len: u64,
    /// Why it cannot be loaded (dtype without a candle type, strides that are not a plain
    /// layout), reported when it is asked for rather than failing the whole file.
    problem: Option<String>,
}

/// The tensors of a `torch.save` archive, read lazily.
pub struct PthFile {
    path: PathBuf,
    /// In the pickle's order, the last of duplicated names winning.
    names: Vec<String>,
    infos: HashMap<String, TensorInfo>,
}

impl PthFile {
    /// Reads the tensor table of `path`; `key` selects a nested state dict
    /// (`{"prompt_learner": {...}}`) instead of the top-level dict.
    pub fn open(path: &Path, key: Option<&str>) -> Result<Self> {
        let origin = path.display().to_string();
        let file = crate::fsio::open(path, crate::fsio::FileKind::Checkpoint)?.file;
        let mut zip = open_zip(std::io::BufReader::new(file), &origin)?;
        let (names, infos) = tensor_table(&mut zip, key, &origin)?;
        Ok(Self {
            path: path.to_path_buf(),
            names,
            infos,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.infos.get(name).map(|i| i.shape.as_slice())
    }

    /// Why a listed tensor cannot be loaded, if it cannot.
    pub fn problem(&self, name: &str) -> Option<&str> {
        self.infos.get(name).and_then(|i| i.problem.as_deref())
    }

    /// One tensor, on the CPU in its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let origin = self.path.display().to_string();
        let info = self
            .infos
            .get(name)
            .ok_or_else(|| weights_error(&origin, format!("no tensor `{name}`")))?;
        let (mut zip, size) = self.reopen()?;
        read_tensor(&mut zip, size, name, info, &origin)
    }

    /// Every loadable tensor (those with a [`Self::problem`] are left out), reading the archive
    /// once.
    pub fn load_all(&self) -> Result<Vec<(String, Tensor)>> {
        let origin = self.path.display().to_string();
        let (mut zip, size) = self.reopen()?;
        let mut out = Vec::with_capacity(self.names.len());
        for name in &self.names {
            let info = &self.infos[name];
            if info.problem.is_none() {
                out.push((
                    name.clone(),
                    read_tensor(&mut zip, size, name, info, &origin)?,
                ));
            }
        }
        Ok(out)
    }

    fn reopen(&self) -> Result<(zip::ZipArchive<std::io::BufReader<std::fs::File>>, u64)> {
        let origin = self.path.display().to_string();
        let opened = crate::fsio::open(&self.path, crate::fsio::FileKind::Checkpoint)?;
        let size = opened.len;
        Ok((
            open_zip(std::io::BufReader::new(opened.file), &origin)?,
            size,
        ))
    }
}

/// Every loadable tensor of an archive held in memory (`origin` names it in errors): the same
/// checks as [`PthFile`], for callers that already hold the bytes.
pub fn read_bytes(bytes: &[u8], key: Option<&str>, origin: &str) -> Result<Vec<(String, Tensor)>> {
    let mut zip = open_zip(std::io::Cursor::new(bytes), origin)?;
    let (names, infos) = tensor_table(&mut zip, key, origin)?;
    names
        .iter()
        .filter(|n| infos[*n].problem.is_none())
        .map(|n| {
            let t = read_tensor(&mut zip, bytes.len() as u64, n, &infos[n], origin)?;
            Ok((n.clone(), t))
        })
        .collect()
}

fn weights_error(origin: &str, message: String) -> Error {
    Error::weights(origin, message)
}

fn open_zip<R: Read + Seek>(reader: R, origin: &str) -> Result<zip::ZipArchive<R>> {
    zip::ZipArchive::new(reader).map_err(|e| {
        weights_error(
            origin,
            format!("not a torch.save zip archive ({e}); legacy (pre-1.6) torch files cannot be read: re-save them with a recent PyTorch"),
        )
    })
}

type Table = (Vec<String>, HashMap<String, TensorInfo>);

fn tensor_table<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    key: Option<&str>,
    origin: &str,
) -> Result<Table> {
    let bad = |m: String| weights_error(origin, m);
    let entries: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(format!("unreadable entry name: {e}")))?;
    if let Some(order) = entries.iter().find(|n| n.ends_with("/byteorder")) {
        let mut text = String::new();
        zip.by_name(order)
            .map_err(|e| bad(format!("{order}: {e}")))?
            .take(16)
            .read_to_string(&mut text)
            .map_err(|e| bad(format!("{order}: {e}")))?;
        if text.trim() != "little" {
            return Err(bad(format!(
                "{order} says {:?}: only little-endian archives can be read",
                text.trim()
            )));
        }
    }
    let pickles: Vec<&String> = entries.iter().filter(|n| n.ends_with("data.pkl")).collect();
    if pickles.is_empty() {
        return Err(bad(
            "no data.pkl in the archive: not a torch.save file".into()
        ));
    }
    let mut names = Vec::new();
    let mut infos = HashMap::new();
    for pkl in pickles {
        let dir = pkl.strip_suffix(".pkl").unwrap_or(pkl);
        let mut data = Vec::new();
        zip.by_name(pkl)
            .map_err(|e| bad(format!("{pkl}: {e}")))?
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(|e| bad(format!("{pkl}: {e}")))?;
        if data.len() as u64 > MAX_PICKLE_BYTES {
            return Err(bad(format!(
                "{pkl} is larger than {} MiB: not a state dict",
                MAX_PICKLE_BYTES >> 20
            )));
        }
        let root = Machine::default()
            .run(&data)
            .map_err(|m| bad(format!("{pkl}: {m}")))?;
        let dict = state_dict(root, key).map_err(|m| bad(format!("{pkl}: {m}")))?;
        for (name, value) in dict {
            let Obj::Str(name) = &name.obj else { continue };
            if let Some(info) =
                tensor_info(value, dir).map_err(|m| bad(format!("tensor `{name}`: {m}")))?
            {
                if infos.insert(name.to_string(), info).is_none() {
                    names.push(name.to_string());
                }
            }
        }
    }
    Ok((names, infos))
}

/// The dict of tensors: the top-level object, a TorchScript module's state, or `key`'s entry.
fn state_dict(root: Node, key: Option<&str>) -> std::result::Result<Vec<(Node, Node)>, String> {
    // TorchScript modules pickle as BUILD(REDUCE(__torch__.Module, ...), state).
    let root = match &root.obj {
        Obj::Build(callable, state) => match &callable.obj {
            Obj::Reduce(class, _) if is_global(class, "__torch__", "Module") => state.clone(),
            _ => root.clone(),
        },
        _ => root,
    };
    let root = match key {
        None => root,
        Some(k) => match &root.obj {
            Obj::Dict(entries) => entries
                .iter()
                .find(|(n, _)| matches!(&n.obj, Obj::Str(s) if &**s == k))
                .map(|(_, v)| v.clone())
                .ok_or_else(|| format!("no `{k}` entry at the top level"))?,
            _ => root,
        },
    };
    match &root.obj {
        Obj::Dict(entries) => Ok(entries.clone()),
        other => Err(format!(
            "the pickled object is a {}, not a dict of tensors",
            other.kind()
        )),
    }
}

/// The tensor a state-dict value describes, `None` when it is not a tensor.
fn tensor_info(value: Node, dir: &str) -> std::result::Result<Option<TensorInfo>, String> {
    let Obj::Reduce(callable, args) = &value.obj else {
        return Ok(None);
    };
    let (callable, args) = if is_global(callable, "torch._tensor", "_rebuild_from_type_v2") {
        // (function, type, args, state)
        let a = tuple(args, 3, "_rebuild_from_type_v2 arguments")?;
        (a[0].clone(), a[2].clone())
    } else if is_global(callable, "torch._utils", "_rebuild_parameter") {
        // (data, requires_grad, backward_hooks), data = REDUCE(_rebuild_tensor_v2, args)
        let a = tuple(args, 1, "_rebuild_parameter arguments")?;
        match &a[0].obj {
            Obj::Reduce(c, r) => (c.clone(), r.clone()),
            other => {
                return Err(format!(
                    "_rebuild_parameter wraps a {}, not a tensor",
                    other.kind()
                ))
            }
        }
    } else {
        (callable.clone(), args.clone())
    };
    if !is_global(&callable, "torch._utils", "_rebuild_tensor_v2") {
        return Ok(None);
    }
    // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    let a = tuple(&args, 4, "_rebuild_tensor_v2 arguments")?;
    let Obj::PersId(storage) = &a[0].obj else {
        return Err(format!(
            "storage is a {}, not a persistent id",
            a[0].obj.kind()
        ));
    };
    // ("storage", storage_type, key, location, numel)
    let s = tuple(storage, 5, "storage id")?;
    let storage_type = match &s[1].obj {
        Obj::Global(_, name) => name.clone(),
        other => return Err(format!("storage type is a {}", other.kind())),
    };
    let key = match &s[2].obj {
        Obj::Str(k) => k.clone(),
        other => return Err(format!("storage key is a {}", other.kind())),
    };
    let numel = int(&s[4], "storage size")?;
    let offset = int(&a[1], "storage offset")?;
    let shape = ints(&a[2], "size")?;
    let stride = ints(&a[3], "stride")?;
    if shape.len() != stride.len() {
        return Err(format!(
            "size {shape:?} and stride {stride:?} have different ranks"
        ));
    }
    let (dtype, mut problem) = storage_dtype(&storage_type);
    let elems = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("size {shape:?} overflows"))?;
    let width = dtype.size_in_bytes() as u64;
    let (start, len) = offset
        .checked_mul(width)
        .zip(elems.checked_mul(width))
        .ok_or_else(|| format!("size {shape:?} at offset {offset} overflows"))?;
    let end = offset
        .checked_add(elems)
        .ok_or_else(|| format!("offset {offset} overflows"))?;
    if elems > 0 && end > numel {
        return Err(format!(
            "size {shape:?} at offset {offset} needs {end} elements, its storage has {numel}"
        ));
    }
    let dims = || shape.iter().copied().zip(stride.iter().copied());
    let c_order = is_dense(dims().rev());
    let fortran = !c_order && is_dense(dims());
    if !c_order && !fortran && problem.is_none() {
        problem = Some(format!(
            "strides {stride:?} for size {shape:?} are not a contiguous layout"
        ));
    }
    Ok(Some(TensorInfo {
        dtype,
        shape: shape.into_iter().map(|d| d as usize).collect(),
        fortran,
        entry: format!("{dir}/{key}"),
        start,
        len,
        problem,
    }))
}

/// The dtype of a `torch.*Storage` type, or why it cannot be read (then `U8`, to keep going).
fn storage_dtype(storage_type: &str) -> (DType, Option<String>) {
    let dtype = match storage_type {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "ByteStorage" => DType::U8,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "LongStorage" => DType::I64,
        other => {
            return (
                DType::U8,
                Some(format!("it is stored as {other}, which cannot be read")),
            )
        }
    };
    (dtype, None)
}

/// Whether (size, stride) pairs, innermost first, lay the elements out densely (strides of
/// size-1 dimensions do not matter, as in PyTorch).
fn is_dense(dims: impl Iterator<Item = (u64, u64)>) -> bool {
    let mut expect = 1u64;
    for (size, stride) in dims {
        if size > 1 && stride != expect {
            return false;
        }
        expect = expect.saturating_mul(size);
    }
    true
}

fn read_tensor<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    archive_len: u64,
    name: &str,
    info: &TensorInfo,
    origin: &str,
) -> Result<Tensor> {
    let bad = |m: String| weights_error(origin, format!("tensor `{name}`: {m}"));
    if let Some(p) = &info.problem {
        return Err(bad(p.clone()));
    }
    let mut entry = zip
        .by_name(&info.entry)
        .map_err(|e| bad(format!("storage {}: {e}", info.entry)))?;
    let end = info.start + info.len;
    // Stored entries cannot hold more bytes than the archive; checking both sizes before the
    // allocation keeps a crafted shape from reserving memory that no data backs.
    if end > entry.size() || info.len > archive_len {
        return Err(bad(format!(
            "needs bytes {}..{end} of storage {}, which holds {}",
            info.start,
            info.entry,
            entry.size()
        )));
    }
    std::io::copy(&mut (&mut entry).take(info.start), &mut std::io::sink())
        .map_err(|e| bad(format!("storage {}: {e}", info.entry)))?;
    let mut buf = vec![0u8; info.len as usize];
    entry
        .read_exact(&mut buf)
        .map_err(|e| bad(format!("storage {}: {e}", info.entry)))?;
    let t = if info.fortran && info.shape.len() > 1 {
        let reversed: Vec<usize> = info.shape.iter().rev().copied().collect();
        let dims: Vec<usize> = (0..info.shape.len()).rev().collect();
        Tensor::from_raw_buffer(&buf, info.dtype, &reversed, &Device::Cpu)?
            .permute(dims)?
            .contiguous()?
    } else {
        Tensor::from_raw_buffer(&buf, info.dtype, &info.shape, &Device::Cpu)?
    };
    Ok(t)
}

// ---- the pickle machine ------------------------------------------------------------------

type Node = Rc<Item>;

#[derive(Debug, Clone)]
struct Item {
    /// 0 for scalars, 1 + the deepest child for containers.
    depth: u32,
    obj: Obj,
}

#[derive(Debug, Clone)]
enum Obj {
    None,
    // Booleans, floats and bytes say nothing about where a tensor is: their values are not kept.
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Bytes,
    Global(Rc<str>, Rc<str>),
    Tuple(Vec<Node>),
    List(Vec<Node>),
    Dict(Vec<(Node, Node)>),
    /// `callable(*args)`, kept symbolic (nothing is ever called).
    Reduce(Node, Node),
    /// `obj.__setstate__(state)` on something that is not a dict.
    Build(Node, Node),
    PersId(Node),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool => "bool",
            Obj::Int(_) => "int",
            Obj::Float => "float",
            Obj::Str(_) => "string",
            Obj::Bytes => "bytes",
            Obj::Global(..) => "global",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Reduce(..) => "reduce",
            Obj::Build(..) => "build",
            Obj::PersId(_) => "persistent id",
        }
    }
}

fn is_global(n: &Node, module: &str, name: &str) -> bool {
    matches!(&n.obj, Obj::Global(m, c) if &**m == module && &**c == name)
}

fn tuple<'a>(n: &'a Node, at_least: usize, what: &str) -> std::result::Result<&'a [Node], String> {
    match &n.obj {
        Obj::Tuple(v) if v.len() >= at_least => Ok(v),
        Obj::Tuple(v) => Err(format!(
            "{what} have {} items, expected at least {at_least}",
            v.len()
        )),
        other => Err(format!("{what} are a {}, not a tuple", other.kind())),
    }
}

fn int(n: &Node, what: &str) -> std::result::Result<u64, String> {
    match n.obj {
        // Sizes past 2^48 elements describe no storage that exists; rejecting them keeps the
        // byte arithmetic far from overflow.
        Obj::Int(i) if (0..1 << 48).contains(&i) => Ok(i as u64),
        Obj::Int(i) => Err(format!("{what} {i} is outside 0..2^48")),
        ref other => Err(format!("{what} is a {}, not an int", other.kind())),
    }
}

fn ints(n: &Node, what: &str) -> std::result::Result<Vec<u64>, String> {
    let Obj::Tuple(v) = &n.obj else {
        return Err(format!("{what} is a {}, not a tuple", n.obj.kind()));
    };
    if v.len() > MAX_RANK {
        return Err(format!("{what} has rank {}, more than {MAX_RANK}", v.len()));
    }
    v.iter().map(|x| int(x, what)).collect()
}

#[derive(Default)]
struct Machine {
    stack: Vec<Node>,
    /// Stack heights at each open MARK (CPython's metastack): items below the innermost mark
    /// cannot be popped.
    marks: Vec<usize>,
    memo: HashMap<u32, Node>,
    objects: usize,
    copied: usize,
}

type Step<T> = std::result::Result<T, String>;

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Step<&'a [u8]> {
        let rest = &self.data[self.pos..];
        if n > rest.len() as u64 {
            return Err(format!(
                "truncated at byte {}: {n} bytes announced, {} left",
                self.pos,
                rest.len()
            ));
        }
        self.pos += n as usize;
        Ok(&rest[..n as usize])
    }
    fn u8(&mut self) -> Step<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Step<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Step<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Step<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Step<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("unterminated line at byte {}", self.pos))?;
        self.pos += n + 1;
        Ok(rest[..n].strip_suffix(b"\r").unwrap_or(&rest[..n]))
    }
}

fn text(bytes: &[u8]) -> Step<Rc<str>> {
    std::str::from_utf8(bytes)
        .map(Rc::from)
        .map_err(|_| "a string is not UTF-8".to_string())
}

impl Machine {
    fn new_node(&mut self, obj: Obj) -> Step<Node> {
        self.objects += 1;
        if self.objects > MAX_OBJECTS {
            return Err(format!("more than {MAX_OBJECTS} objects: not a state dict"));
        }
        let child = |n: &Node| n.depth + 1;
        let depth = match &obj {
            Obj::Tuple(v) | Obj::List(v) => v.iter().map(child).max().unwrap_or(1),
            Obj::Dict(v) => v
                .iter()
                .map(|(k, x)| child(k).max(child(x)))
                .max()
                .unwrap_or(1),
            Obj::Reduce(a, b) | Obj::Build(a, b) => child(a).max(child(b)),
            Obj::PersId(a) => child(a),
            _ => 0,
        };
        check_depth(depth)?;
        Ok(Rc::new(Item { depth, obj }))
    }

    fn push(&mut self, obj: Obj) -> Step<()> {
        let n = self.new_node(obj)?;
        self.stack.push(n);
        Ok(())
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Step<Node> {
        if self.stack.len() <= self.floor() {
            return Err("pop from an empty stack".into());
        }
        Ok(self.stack.pop().unwrap())
    }

    fn pop_mark(&mut self) -> Step<Vec<Node>> {
        let m = self.marks.pop().ok_or("no MARK to pop to")?;
        Ok(self.stack.split_off(m))
    }

    /// The top of the stack, for in-place changes; a node shared with the memo is copied first
    /// (the memo keeps its value as of PUT), within the copy budget.
    fn top_mut(&mut self) -> Step<&mut Item> {
        if self.stack.len() <= self.floor() {
            return Err("no object to modify on the stack".into());
        }
        let top = self.stack.last_mut().unwrap();
        if Rc::strong_count(top) > 1 {
            self.copied += match &top.obj {
                Obj::List(v) | Obj::Tuple(v) => v.len(),
                Obj::Dict(v) => v.len(),
                _ => 1,
            };
            if self.copied > MAX_COPIED {
                return Err("memo copies exceed the budget: not a state dict".into());
            }
        }
        Ok(Rc::make_mut(top))
    }

    fn memo_put(&mut self, id: u32) -> Step<()> {
        let top = self
            .stack
            .last()
            .filter(|_| self.stack.len() > self.floor())
            .ok_or("PUT with an empty stack")?
            .clone();
        self.memo.insert(id, top);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Step<()> {
        let n = self
            .memo
            .get(&id)
            .ok_or_else(|| format!("memo entry {id} is missing"))?
            .clone();
        self.stack.push(n);
        Ok(())
    }

    fn extend_list(&mut self, items: Vec<Node>) -> Step<()> {
        let top = self.top_mut()?;
        let kind = top.obj.kind();
        let Obj::List(list) = &mut top.obj else {
            return Err(format!("APPEND to a {kind}"));
        };
        let deepest = items.iter().map(|n| n.depth + 1).max().unwrap_or(0);
        list.extend(items);
        top.depth = top.depth.max(deepest);
        check_depth(top.depth)
    }

    fn extend_dict(&mut self, items: Vec<Node>) -> Step<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of objects".into());
        }
        let top = self.top_mut()?;
        let kind = top.obj.kind();
        let Obj::Dict(dict) = &mut top.obj else {
            return Err(format!("SETITEM on a {kind}"));
        };
        let deepest = items.iter().map(|n| n.depth + 1).max().unwrap_or(0);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            dict.push((k, v));
        }
        top.depth = top.depth.max(deepest);
        check_depth(top.depth)
    }

    /// Runs the pickle to its STOP and returns the object on top.
    fn run(mut self, data: &[u8]) -> Step<Node> {
        let mut r = Cursor { data, pos: 0 };
        loop {
            let at = r.pos;
            let op = r.u8().map_err(|_| "no STOP at the end".to_string())?;
            match op {
                0x80 => drop(r.u8()?),  // PROTO
                0x95 => drop(r.u64()?), // FRAME (a hint for buffered readers)
                b'.' => return self.pop(),
                b'c' => {
                    let module = text(r.line()?)?;
                    let name = text(r.line()?)?;
                    self.push(Obj::Global(module, name))?
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module.obj, &name.obj) {
                        (Obj::Str(m), Obj::Str(n)) => {
                            let g = Obj::Global(m.clone(), n.clone());
                            self.push(g)?
                        }
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'K' => {
                    let v = r.u8()?;
                    self.push(Obj::Int(v.into()))?
                }
                b'M' => {
                    let v = r.u16()?;
                    self.push(Obj::Int(v.into()))?
                }
                b'J' => {
                    let v = r.u32()? as i32;
                    self.push(Obj::Int(v.into()))?
                }
                0x8a => {
                    // LONG1: n little-endian two's-complement bytes
                    let n = r.u8()?;
                    if n > 8 {
                        return Err(format!("a {n}-byte integer does not fit 64 bits"));
                    }
                    let bytes = r.take(n.into())?;
                    let mut v = 0i64;
                    for (i, &b) in bytes.iter().enumerate() {
                        v |= (b as i64) << (8 * i);
                    }
                    if (1..8).contains(&n) && bytes[n as usize - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n as u32);
                    }
                    self.push(Obj::Int(v))?
                }
                b'G' => {
                    r.take(8)?;
                    self.push(Obj::Float)?
                }
                b'X' => {
                    let n = r.u32()?;
                    let s = text(r.take(n.into())?)?;
                    self.push(Obj::Str(s))?
                }
                0x8c => {
                    let n = r.u8()?;
                    let s = text(r.take(n.into())?)?;
                    self.push(Obj::Str(s))?
                }
                0x8d => {
                    let n = r.u64()?;
                    let s = text(r.take(n)?)?;
                    self.push(Obj::Str(s))?
                }
                b'T' | b'B' => {
                    let n = r.u32()?;
                    r.take(n.into())?;
                    self.push(Obj::Bytes)?
                }
                b'U' | b'C' => {
                    let n = r.u8()?;
                    r.take(n.into())?;
                    self.push(Obj::Bytes)?
                }
                b'N' => self.push(Obj::None)?,
                0x88 | 0x89 => self.push(Obj::Bool)?,
                b')' => self.push(Obj::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items))?
                }
                b']' => self.push(Obj::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_list(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)?
                }
                b'}' => self.push(Obj::Dict(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Dict(Vec::new()))?;
                    self.extend_dict(items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_dict(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.extend_dict(items)?
                }
                b'(' => {
                    if self.marks.len() >= MAX_DEPTH as usize {
                        return Err(format!("more than {MAX_DEPTH} open MARKs"));
                    }
                    self.marks.push(self.stack.len())
                }
                b'0' => drop(self.pop()?),
                b'1' => drop(self.pop_mark()?),
                b'2' => {
                    let top = self.pop()?;
                    self.stack.push(top.clone());
                    self.stack.push(top);
                }
                b'q' => {
                    let id = r.u8()?;
                    self.memo_put(id.into())?
                }
                b'r' => {
                    let id = r.u32()?;
                    self.memo_put(id)?
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len()).map_err(|_| "memo overflow")?;
                    self.memo_put(id)?
                }
                b'h' => {
                    let id = r.u8()?;
                    self.memo_get(id.into())?
                }
                b'j' => {
                    let id = r.u32()?;
                    self.memo_get(id)?
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.push(Obj::PersId(id))?
                }
                b'R' | 0x81 => {
                    // REDUCE / NEWOBJ: kept symbolic, except the dict classes state dicts use.
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    if is_global(&callable, "collections", "OrderedDict")
                        || is_global(&callable, "collections", "defaultdict")
                    {
                        self.push(Obj::Dict(Vec::new()))?
                    } else {
                        self.push(Obj::Reduce(callable, args))?
                    }
                }
                b'b' => {
                    let state = self.pop()?;
                    let is_dict = |n: &Node| matches!(n.obj, Obj::Dict(_));
                    let top_is_dict =
                        self.stack.len() > self.floor() && is_dict(self.stack.last().unwrap());
                    if top_is_dict && is_dict(&state) {
                        // A dict's state (OrderedDict's `_metadata`) joins its entries.
                        let Obj::Dict(entries) = &state.obj else {
                            unreachable!()
                        };
                        let flat = entries
                            .iter()
                            .flat_map(|(k, v)| [k.clone(), v.clone()])
                            .collect();
                        self.extend_dict(flat)?
                    } else {
                        let obj = self.pop()?;
                        self.push(Obj::Build(obj, state))?
                    }
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {at}"
                    ))
                }
            }
        }
    }
}

fn check_depth(depth: u32) -> Step<()> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "objects nested more than {MAX_DEPTH} deep: not a state dict"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A torch.save-shaped zip around `pickle` (storages: name -> bytes).
    pub(crate) fn archive(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
        use std::io::Write;
        let mut buf = std::io::Cursor::new(Vec::new());
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(pickle).unwrap();
        z.start_file("archive/byteorder", opts).unwrap();
        z.write_all(b"little").unwrap();
        for (name, bytes) in storages {
            z.start_file(format!("archive/data/{name}"), opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
        buf.into_inner()
    }

    fn run(pickle: &[u8]) -> Step<Node> {
        Machine::default().run(pickle)
    }

    #[test]
    fn reads_the_fixture_checkpoints() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let f = PthFile::open(&dir.join("adaclip_tiny.pth"), None).unwrap();
        assert!(f.names().len() > 20);
        let t = f
            .load("clip_model.visual_prompter.static_prompts.0")
            .unwrap();
        assert_eq!(
            t.dims(),
            f.shape("clip_model.visual_prompter.static_prompts.0")
                .unwrap()
        );
        let a = PthFile::open(&dir.join("anomalyclip_tiny.pth"), Some("prompt_learner")).unwrap();
        assert!(a.names().iter().any(|n| n == "ctx_pos"));
        assert_eq!(a.load_all().unwrap().len(), a.names().len());
    }

    #[test]
    fn a_million_nested_lists_are_refused_not_a_stack_overflow() {
        let mut p = vec![0x80, 2];
        for _ in 0..1_000_000 {
            p.push(b']');
        }
        for _ in 0..999_999 {
            p.push(b'a');
        }
        p.push(b'.');
        let e = run(&p).unwrap_err();
        assert!(e.contains("nested more than 100 deep"), "{e}");
        let e = read_bytes(&archive(&p, &[]), None, "deep.pth")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("weights deep.pth: archive/data.pkl: objects nested"),
            "{e}"
        );
    }

    #[test]
    fn memo_doubling_does_not_blow_up() {
        // l = []; repeat: l = [l, l] through the memo (2^60 leaves if cloned deeply)
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..60 {
            p.extend_from_slice(&[b'0', b']', b'h', 0, b'a', b'h', 0, b'a', b'q', 0]);
        }
        p.push(b'.');
        // 60 levels of nesting: within the depth limit, and cheap because nodes are shared.
        let top = run(&p).unwrap();
        assert_eq!(top.depth, 61);
    }

    #[test]
    fn lengths_beyond_the_data_are_refused_before_allocating() {
        let p = [0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'a'];
        assert!(run(&p).unwrap_err().contains("4294967295 bytes announced"));
        let p = [0x8d, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(run(&p).unwrap_err().contains("truncated"));
    }

    /// The pickle of `{"w": tensor}` with `size` and storage numel `numel`.
    fn one_tensor(size: &[u32], numel: u32) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'X', 1, 0, 0, 0, b'w'];
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        // persistent id ("storage", FloatStorage, "0", "cpu", numel)
        p.extend_from_slice(b"(X\x07\x00\x00\x00storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        p.extend_from_slice(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpu");
        p.push(b'J');
        p.extend_from_slice(&numel.to_le_bytes());
        p.extend_from_slice(b"tQ");
        p.extend_from_slice(&[b'K', 0, b'(']);
        for &d in size {
            p.push(b'J');
            p.extend_from_slice(&d.to_le_bytes());
        }
        p.extend_from_slice(b"t(");
        let mut stride = 1u32;
        let mut strides = Vec::new();
        for &d in size.iter().rev() {
            strides.push(stride);
            stride = stride.wrapping_mul(d);
        }
        for s in strides.iter().rev() {
            p.push(b'J');
            p.extend_from_slice(&s.to_le_bytes());
        }
        p.extend_from_slice(b"t\x89)tRs.");
        p
    }

    #[test]
    fn a_tensor_round_trips_and_crafted_sizes_are_named() {
        let data: Vec<u8> = [1f32, 2., 3., 4., 5., 6.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let got = read_bytes(
            &archive(&one_tensor(&[2, 3], 6), &[("0", &data)]),
            None,
            "t.pth",
        )
        .unwrap();
        assert_eq!(got[0].0, "w");
        assert_eq!(
            got[0].1.to_vec2::<f32>().unwrap(),
            vec![vec![1., 2., 3.], vec![4., 5., 6.]]
        );
        // A shape the storage does not hold, and one the archive does not.
        let e = read_bytes(
            &archive(&one_tensor(&[2, 4], 6), &[("0", &data)]),
            None,
            "t.pth",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tensor `w`: size [2, 4] at offset 0 needs 8 elements, its storage has 6"),
            "{e}"
        );
        let huge = 1u32 << 30;
        let e = read_bytes(
            &archive(&one_tensor(&[huge, huge], u32::MAX), &[("0", &data)]),
            None,
            "t.pth",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tensor `w`"), "{e}");
        let e = read_bytes(
            &archive(&one_tensor(&[1 << 28], 1 << 28), &[("0", &data)]),
            None,
            "t.pth",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "tensor `w`: needs bytes 0..1073741824 of storage archive/data/0, which holds 24"
            ),
            "{e}"
        );
    }
}
