//! Struct member offsets from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Rust eBPF cannot emit CO-RE relocations, so offsets the program needs inside kernel structs
//! (the network namespace of a socket: `sock.__sk_common.skc_net.net->ns.inum`) are read here at
//! start and passed as globals. Only what that needs is parsed: the header, the type section's
//! layout, and struct/union members (through anonymous members and typedefs). aya parses BTF
//! too but keeps its accessors private, and the one BTF crate on crates.io is LGPL.
use std::path::Path;

use thiserror::Error;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("cannot read {0}")]
    Read(String),
    #[error("not BTF data: {0}")]
    Format(&'static str),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

struct Type {
    name_off: u32,
    kind: u32,
    kflag: bool,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// (name_off, type, bit offset) for struct and union members.
    members: Vec<(u32, u32, u32)>,
}

/// Parsed BTF: types by id (id 0 is void) and the string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes(s.try_into().expect("4 bytes")))
        .ok_or(BtfError::Format("truncated"))
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data =
            std::fs::read(path).map_err(|e| BtfError::Read(format!("{}: {e}", path.display())))?;
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let magic = data
            .get(0..2)
            .map(|m| u16::from_ne_bytes([m[0], m[1]]))
            .ok_or(BtfError::Format("truncated"))?;
        if magic != 0xeb9f {
            return Err(BtfError::Format("bad magic (or other endianness)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types_bytes = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Format("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Format("string section out of bounds"))?
            .to_vec();

        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kflag: false,
            size_or_type: 0,
            members: vec![],
        }];
        let mut at = 0;
        while at < types_bytes.len() {
            let name_off = u32_at(types_bytes, at)?;
            let info = u32_at(types_bytes, at + 4)?;
            let size_or_type = u32_at(types_bytes, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let mut members = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => at += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        members.push((
                            u32_at(types_bytes, at)?,
                            u32_at(types_bytes, at + 4)?,
                            u32_at(types_bytes, at + 8)?,
                        ));
                        at += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => at += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => at += 12 * vlen,
                0..=19 => {}
                _ => return Err(BtfError::Format("unknown type kind")),
            }
            types.push(Type {
                name_off,
                kind,
                kflag: info >> 31 == 1,
                size_or_type,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.types
            .iter()
            .position(|t| {
                t.kind == KIND_STRUCT && self.name(t.name_off) == name && !t.members.is_empty()
            })
            .map(|i| i as u32)
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset and type of `member` in struct/union `id`, searching anonymous members too
    /// (at most `MAX_ANON_DEPTH` deep: a malformed blob may make a struct contain itself).
    fn member(&self, id: u32, member: &str) -> Option<(u32, u32)> {
        let mut budget = MAX_MEMBERS_VISITED;
        self.member_within(id, member, MAX_ANON_DEPTH, &mut budget)
    }

    fn member_within(
        &self,
        id: u32,
        member: &str,
        depth: u32,
        budget: &mut u32,
    ) -> Option<(u32, u32)> {
        let t = self.types.get(self.resolve(id) as usize)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for &(name_off, ty, off) in &t.members {
            *budget = budget.checked_sub(1)?;
            let bits = if t.kflag { off & 0x00ff_ffff } else { off };
            let name = self.name(name_off);
            if name == member {
                return Some((bits / 8, ty));
            }
            if name.is_empty()
                && depth > 0
                && let Some((inner, ty)) = self.member_within(ty, member, depth - 1, budget)
            {
                return Some(((bits / 8).checked_add(inner)?, ty));
            }
        }
        None
    }

    /// Byte offset of a member path, e.g. `("sock", &["__sk_common", "skc_net"])`.
    pub fn offset(&self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut id = self.struct_id(strukt)?;
        let mut total = 0;
        let mut within = strukt.to_string();
        for m in path {
            let (off, ty) = self.member(id, m).ok_or_else(|| BtfError::NoMember {
                strukt: within.clone(),
                member: m.to_string(),
            })?;
            total = off
                .checked_add(total)
                .ok_or(BtfError::Format("member offsets overflow"))?;
            id = ty;
            within = m.to_string();
        }
        Ok(total)
    }
}

/// Anonymous structs and unions nested in one another: the kernel's run two or three deep.
const MAX_ANON_DEPTH: u32 = 16;
/// Members one search may look at: `struct sock` with its anonymous members has a few hundred,
/// while a malformed blob whose anonymous members point back at their struct would make the
/// search exponential (found by the btf fuzz target).
const MAX_MEMBERS_VISITED: u32 = 1 << 16;

/// Where the network namespace inode of a socket is: `*(sock + net) + inum`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsOffsets {
    /// Offset of the `struct net *` in `struct sock`.
    pub(crate) net: u16,
    /// Offset of `ns.inum` in `struct net`.
    pub(crate) inum: u16,
}

/// Reads the offsets from the kernel's BTF.
pub fn netns_offsets(btf: &Btf) -> Result<NetnsOffsets, BtfError> {
    // possible_net_t is `struct { struct net *net; }` (empty without CONFIG_NET_NS).
    let net = btf.offset("sock", &["__sk_common", "skc_net", "net"])?;
    let inum = btf.offset("net", &["ns", "inum"])?;
    let fit = |v: u32| u16::try_from(v).map_err(|_| BtfError::Format("offset beyond 64 KiB"));
    Ok(NetnsOffsets {
        net: fit(net)?,
        inum: fit(inum)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: `struct inner { int a; int inum; }`,
    /// `struct outer { int x; union { int y; struct inner in; }; }` (anonymous union at 8).
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0a\0inum\0inner\0x\0y\0in\0outer\0".to_vec();
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            (strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap()
                + 1) as u32
        };
        let mut types: Vec<u32> = Vec::new();
        // 1: int (size 4), +4 encoding
        types.extend([s("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner { a @0, inum @32 bits }
        types.extend([s("inner"), KIND_STRUCT << 24 | 2, 8]);
        types.extend([s("a"), 1, 0, s("inum"), 1, 32]);
        // 3: anonymous union { y, in }
        types.extend([0, KIND_UNION << 24 | 2, 8]);
        types.extend([s("y"), 1, 0, s("in"), 2, 0]);
        // 4: struct outer { x @0, <anon> @64 bits }
        types.extend([s("outer"), KIND_STRUCT << 24 | 2, 16]);
        types.extend([s("x"), 1, 0, 0, 3, 64]);
        assemble(&types, &strings)
    }

    /// A BTF blob of these type words and strings: header, types, strings.
    fn assemble(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = Vec::new();
        out.extend(0xeb9fu16.to_ne_bytes());
        out.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(v.to_ne_bytes());
        }
        out.extend(type_bytes);
        out.extend(strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset("outer", &["x"]), Ok(0));
        assert_eq!(btf.offset("outer", &["y"]), Ok(8));
        assert_eq!(btf.offset("outer", &["in", "inum"]), Ok(12));
        assert_eq!(
            btf.offset("outer", &["nope"]),
            Err(BtfError::NoMember {
                strukt: "outer".into(),
                member: "nope".into()
            })
        );
        assert_eq!(
            btf.offset("missing", &["x"]),
            Err(BtfError::NoStruct("missing".into()))
        );
    }

    /// Found by the fuzz target: an anonymous member whose type is its own struct overflowed
    /// the stack.
    #[test]
    fn a_struct_that_contains_itself_is_no_member_not_a_crash() {
        let mut b = blob();
        // struct outer's anonymous member (type 3, the union) now points at outer (type 4).
        let types_at = 24;
        let words: Vec<u32> = b[types_at..]
            .chunks(4)
            .take_while(|c| c.len() == 4)
            .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        let at = words.iter().rposition(|&w| w == 3).unwrap();
        b[types_at + at * 4..types_at + at * 4 + 4].copy_from_slice(&4u32.to_ne_bytes());
        let btf = Btf::parse(&b).unwrap();
        assert!(matches!(
            btf.offset("outer", &["nope"]),
            Err(BtfError::NoMember { .. })
        ));
    }

    /// Also found by the fuzz target: many anonymous members pointing back at their struct
    /// made the bounded-depth search exponential.
    #[test]
    fn a_struct_of_many_anonymous_self_references_is_searched_quickly() {
        // 1: struct outer, 64 members, every one anonymous and of type outer itself.
        let mut types: Vec<u32> = vec![1, KIND_STRUCT << 24 | 64, 8];
        for _ in 0..64 {
            types.extend([0, 1, 0]);
        }
        let b = assemble(&types, b"\0outer\0");
        let btf = Btf::parse(&b).unwrap();
        let started = std::time::Instant::now();
        assert!(btf.offset("outer", &["nope"]).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    /// The BTF fuzz target starts from this blob (`UPDATE_SEEDS=1` rewrites it).
    #[test]
    fn the_fuzz_seed_is_this_blob() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/btf/tiny.btf");
        if std::env::var_os("UPDATE_SEEDS").is_some() {
            std::fs::write(path, blob()).unwrap();
        }
        assert_eq!(
            std::fs::read(path).unwrap(),
            blob(),
            "{path}: UPDATE_SEEDS=1"
        );
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(b"not btf at all, really not").is_err());
        assert!(Btf::parse(&[]).is_err());
        let mut b = blob();
        b.truncate(30);
        assert!(Btf::parse(&b).is_err());
    }

    #[test]
    fn reads_the_running_kernels_socket_namespace_offsets() {
        let btf = Btf::from_file(Path::new(VMLINUX)).expect("this kernel has BTF");
        let off = netns_offsets(&btf).unwrap();
        eprintln!("netns offsets on this kernel: {off:?}");
        // struct sock starts with struct sock_common, whose skc_net comes after the addresses,
        // hash, ports, family/state and bound device: well past 16 and inside the struct.
        assert!(off.net >= 16 && off.net < 256, "{off:?}");
        assert!(off.inum < 4096, "{off:?}");
        assert_eq!(off.net % 8, 0, "a pointer is aligned");
        assert_eq!(off.inum % 4, 0, "an unsigned int is aligned");
    }
}
