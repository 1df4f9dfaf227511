//! Everything that touches the kernel: privileges, tracefs, BTF, the eBPF program and its
//! maps (aya), the ring buffer, sock_diag (netlink) and /proc. The only layer that does; it
//! hands the model plain values ([`crate::model::event`]).
pub mod btf;
pub mod decode;
pub(crate) mod privileges;
pub mod probe;
pub mod procfs;
pub mod ring;
pub mod sockdiag;
pub mod tracefs;
