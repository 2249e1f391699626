//! The allow-lists: one per thread role, as seccompiler rules.
//!
//! Every system call not listed traps (SIGSYS, see `sigsys.rs`). A vCPU thread runs under
//! both filters (the VMM one it inherits, then its own), so its effective list is the
//! intersection; every vCPU entry is also a VMM entry.

#[cfg(test)]
use std::collections::BTreeMap;

use seccompiler::{sock_filter, BpfProgram};
#[cfg(test)]
use seccompiler::{
    SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SeccompError;

/// Which threads a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every thread of the process once the machine runs: the main thread (agent client,
    /// `--save`), the agent bridge, the guest watch, the stdio pumps, signal forwarding.
    Vmm,
    /// A vCPU thread: `KVM_RUN` and the device emulation done on exits.
    Vcpu,
    /// Every thread of a run with the user-mode network (`--net`): the VMM list plus
    /// [`NET`].
    VmmNet,
}

impl Allow {
    /// The system call's name.
    pub fn name(&self) -> &'static str {
        self.sys_name.trim_start_matches("SYS_")
    }
}

/// How an allowed system call's arguments are checked.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Args {
    /// Any arguments.
    Any,
    /// `ioctl` on KVM descriptors only (request type byte 0xAE).
    KvmIoctl,
    /// `ioctl`: KVM, and reading and setting the caller's terminal (`TCGETS`, `TCSETS`,
    /// `TIOCGWINSZ`); not `TIOCSTI` (typing into the terminal) or anything else.
    KvmOrTerminalIoctl,
    /// `mmap`/`mprotect` without `PROT_EXEC`: no new executable memory.
    NoExec,
    /// `clone` creating a thread (`CLONE_THREAD`), not a process.
    Thread,
    /// `prctl` naming threads (`PR_SET_NAME`, `PR_GET_NAME`; the SIGSYS report reads it).
    ThreadName,
    /// `prctl` as [`Args::ThreadName`], plus `PR_SET_NO_NEW_PRIVS` (only ever restricts),
    /// which a new vCPU thread sets before adding its own filter.
    ThreadNameOrNoNewPrivs,
    /// `seccomp(SECCOMP_SET_MODE_FILTER)`: adding a filter, which can only take away.
    AddFilter,
    /// `tgkill` to a thread of this process (vCPU kicks, the SIGSYS re-raise).
    OwnProcess,
    /// `socket(AF_INET, ...)` only: IPv4 sockets of the user-mode network.
    Inet,
}

/// One allowed system call: number, name, argument check, and why it is there.
pub(crate) struct Allow {
    pub nr: i64,
    /// `SYS_` and the name, as libc spells the constant.
    pub sys_name: &'static str,
    pub args: Args,
    pub why: &'static str,
}

/// `allow![SYS_name Args: "why", ...]`; a call only some architectures have (the legacy
/// x86_64 ones that aarch64 replaced by their `*at` forms) carries a `#[cfg(..)]`.
macro_rules! allow {
    ($($(#[$m:meta])* $name:ident $args:ident: $why:literal,)*) => {
        &[$($(#[$m])* Allow { nr: libc::$name, sys_name: stringify!($name), args: Args::$args, why: $why },)*]
    };
}

/// What the VMM threads may call after the vCPUs start.
pub(crate) const VMM: &[Allow] = allow![
    // Memory (allocator, thread stacks, memory reads on --save).
    SYS_brk Any: "the allocator grows the heap",
    SYS_mmap NoExec: "allocations, thread stacks; never executable",
    SYS_mprotect NoExec: "thread stack guards and allocator arenas; never executable",
    SYS_munmap Any: "freeing allocations and thread stacks",
    SYS_mremap Any: "the allocator grows large blocks",
    SYS_madvise Any: "the allocator and thread exit return memory",
    // Descriptors already open (sockets, KVM, the machine file, stdio) and --save's files.
    SYS_read Any: "stdin, the agent socket, eventfds",
    SYS_write Any: "stdout/stderr, the agent socket, eventfds, --save",
    SYS_readv Any: "buffered stdio reads",
    SYS_writev Any: "buffered stdio writes and panic messages",
    SYS_pread64 Any: "the machine file and the disk overlay (--save merges the disk)",
    SYS_pwrite64 Any: "--save: the output file",
    SYS_lseek Any: "--save: sizing and positioning files",
    SYS_close Any: "closing descriptors",
    SYS_fcntl Any: "duplicating descriptors (File::try_clone) and reading their flags",
    SYS_fstat Any: "file sizes",
    SYS_newfstatat Any: "file metadata (the verified stamp)",
    SYS_statx Any: "file metadata",
    SYS_openat Any: "--save: the temporary output file, the directory fsync, the verified stamp",
    #[cfg(target_arch = "x86_64")]
    SYS_mkdir Any: "the cache directory for the verified stamp",
    SYS_mkdirat Any: "the same, newer libc",
    #[cfg(target_arch = "x86_64")]
    SYS_rename Any: "--save: the atomic rename into place",
    SYS_renameat Any: "the same, newer libc",
    SYS_renameat2 Any: "the same, newer libc",
    #[cfg(target_arch = "x86_64")]
    SYS_unlink Any: "--save: removing the temporary file after a failure",
    SYS_unlinkat Any: "the same, newer libc",
    SYS_flock Any: "--save: writers lock their temporary file while they write it",
    SYS_getdents64 Any: "--save: listing the output directory for a killed writer's leftovers",
    SYS_ftruncate Any: "--save: sizing the output file",
    SYS_fsync Any: "--save: durable output",
    SYS_fdatasync Any: "the disk flush, when a vCPU is not the caller",
    SYS_ioctl KvmOrTerminalIoctl: "KVM state for --save and pauses; terminal raw mode and size",
    // The agent's socket pair.
    SYS_recvfrom Any: "reading the agent socket",
    SYS_sendto Any: "writing the agent socket",
    SYS_recvmsg Any: "reading the agent socket",
    SYS_sendmsg Any: "writing the agent socket",
    SYS_shutdown Any: "the guest watch ends the agent connection when the guest stops; published ports half-close and cut off host connections",
    SYS_accept4 Any: "published ports: accepting host connections on listeners bound before the filters",
    // Threads and synchronisation.
    SYS_clone Thread: "stdio pump threads (threads only, never processes)",
    SYS_clone3 Any: "stdio pump threads (flags are in memory, out of reach of a filter)",
    SYS_futex Any: "locks, condition variables, joins",
    SYS_set_robust_list Any: "thread start",
    SYS_rseq Any: "thread start",
    SYS_sched_getaffinity Any: "thread start",
    SYS_sched_yield Any: "spin loops in locks",
    SYS_gettid Any: "thread ids (kicks, the SIGSYS report)",
    SYS_getpid Any: "the process id (kicks, the SIGSYS report)",
    SYS_tgkill OwnProcess: "kicking vCPU threads out of KVM_RUN, the SIGSYS re-raise",
    SYS_prctl ThreadNameOrNoNewPrivs: "naming new threads; a vCPU thread adding its filter",
    SYS_seccomp AddFilter: "a vCPU thread adds its own, tighter filter when it starts",
    SYS_exit Any: "a thread ends",
    SYS_exit_group Any: "the process ends",
    // Signals: forwarding to the guest, window size, the kick, the SIGSYS report.
    SYS_rt_sigaction Any: "signal forwarding and SIGWINCH handlers",
    SYS_rt_sigprocmask Any: "thread start and signal masks",
    SYS_rt_sigreturn Any: "returning from any signal handler",
    SYS_sigaltstack Any: "thread start and exit",
    SYS_restart_syscall Any: "a sleep interrupted by a signal resumes",
    // Time and entropy.
    SYS_clock_gettime Any: "timeouts (when the vDSO falls back to the system call)",
    SYS_clock_getres Any: "timers",
    SYS_gettimeofday Any: "the wall clock for the agent (vDSO fallback)",
    SYS_clock_nanosleep Any: "polling loops sleep",
    SYS_nanosleep Any: "polling loops sleep",
    SYS_getrandom Any: "fresh entropy for the resumed guest, temporary file names",
    // The share server (virtio-fs), run on vCPU threads; every open is an openat2 confined
    // beneath a share (or the reopen of its own O_PATH descriptor).
    SYS_openat2 Any: "virtio-fs: confined opens beneath a share's root",
    SYS_fstatfs Any: "virtio-fs: statfs of a share",
    SYS_readlinkat Any: "virtio-fs: reading a symlink in a share",
    SYS_symlinkat Any: "virtio-fs: creating a symlink in a share",
    SYS_mknodat Any: "virtio-fs: FIFOs and sockets in a share (device nodes are refused first)",
    SYS_linkat Any: "virtio-fs: hard links inside one share",
    #[cfg(target_arch = "x86_64")]
    SYS_chmod Any: "virtio-fs: chmod through the verified O_PATH descriptor",
    SYS_fchmodat Any: "virtio-fs: the same, newer libc",
    SYS_truncate Any: "virtio-fs: truncate through the verified O_PATH descriptor",
    SYS_utimensat Any: "virtio-fs: setting times",
    SYS_fallocate Any: "virtio-fs: fallocate on an open share file",
];

/// What the VMM threads may call on top of [`VMM`] when the run has the user-mode network
/// (`--net`): its thread opens host TCP and UDP sockets and connects them.
pub(crate) const NET: &[Allow] = allow![
    SYS_socket Inet: "the user-mode network: IPv4 TCP and UDP sockets for guest connections",
    SYS_connect Any: "the user-mode network: connecting them (non-blocking)",
    SYS_getsockopt Any: "the user-mode network: the result of a non-blocking connect (SO_ERROR)",
    #[cfg(target_arch = "x86_64")]
    SYS_poll Any: "the user-mode network waits on the guest's eventfd and its host sockets",
    SYS_ppoll Any: "the same, newer libc",
];

/// What a vCPU thread may call in addition to being under the VMM filter.
pub(crate) const VCPU: &[Allow] = allow![
    SYS_ioctl KvmIoctl: "KVM_RUN, and KVM state on errors; only KVM descriptors",
    SYS_read Any: "eventfds",
    SYS_write Any: "irqfd triggers, the console (test guest stdout, SMOLVM_CONSOLE), logs",
    SYS_writev Any: "buffered stderr and panic messages",
    SYS_sendto Any: "the agent console writes to its socket",
    SYS_pread64 Any: "virtio-blk reads: the machine file's disk runs and the overlay",
    SYS_pwrite64 Any: "virtio-blk writes to the private overlay",
    SYS_fsync Any: "virtio-blk flush",
    SYS_fdatasync Any: "virtio-blk flush",
    SYS_getrandom Any: "virtio-rng",
    SYS_futex Any: "locks shared with the VMM threads, parking on pause",
    SYS_brk Any: "the allocator",
    SYS_mmap NoExec: "the allocator; never executable",
    SYS_mprotect NoExec: "the allocator; never executable",
    SYS_munmap Any: "the allocator",
    SYS_mremap Any: "the allocator",
    SYS_madvise Any: "the allocator, thread exit",
    SYS_rt_sigprocmask Any: "signal masks (the kick signal)",
    SYS_rt_sigreturn Any: "returning from the kick handler",
    SYS_sigaltstack Any: "thread exit",
    SYS_restart_syscall Any: "a system call interrupted by the kick resumes",
    SYS_sched_yield Any: "spin loops in locks",
    SYS_gettid Any: "the SIGSYS re-raise",
    SYS_getpid Any: "the SIGSYS re-raise",
    SYS_tgkill OwnProcess: "the SIGSYS re-raise",
    SYS_prctl ThreadName: "the SIGSYS report reads the thread name",
    SYS_clock_gettime Any: "time (vDSO fallback)",
    SYS_gettimeofday Any: "time (vDSO fallback)",
    SYS_nanosleep Any: "short waits",
    SYS_clock_nanosleep Any: "short waits",
    SYS_exit Any: "the vCPU thread ends",
    SYS_exit_group Any: "the process ends",
    // The share server (virtio-fs) answers guest requests on the notifying vCPU.
    SYS_openat2 Any: "virtio-fs: confined opens beneath a share's root",
    SYS_close Any: "virtio-fs: closing share descriptors",
    SYS_fstat Any: "virtio-fs: attributes",
    SYS_newfstatat Any: "virtio-fs: attributes (libc's fstat)",
    SYS_statx Any: "virtio-fs: attributes (libc's fstat)",
    SYS_fstatfs Any: "virtio-fs: statfs of a share",
    SYS_lseek Any: "virtio-fs: directory offsets, SEEK_DATA/HOLE",
    SYS_getdents64 Any: "virtio-fs: directory listings",
    SYS_readlinkat Any: "virtio-fs: reading a symlink in a share",
    SYS_symlinkat Any: "virtio-fs: creating a symlink in a share",
    SYS_mknodat Any: "virtio-fs: FIFOs and sockets in a share (device nodes are refused first)",
    SYS_mkdirat Any: "virtio-fs: directories in a share",
    SYS_unlinkat Any: "virtio-fs: removing entries of a share",
    SYS_renameat2 Any: "virtio-fs: renames inside one share",
    SYS_linkat Any: "virtio-fs: hard links inside one share",
    #[cfg(target_arch = "x86_64")]
    SYS_chmod Any: "virtio-fs: chmod through the verified O_PATH descriptor",
    SYS_fchmodat Any: "virtio-fs: the same, newer libc",
    SYS_truncate Any: "virtio-fs: truncate through the verified O_PATH descriptor",
    SYS_ftruncate Any: "virtio-fs: truncate of an open share file",
    SYS_utimensat Any: "virtio-fs: setting times",
    SYS_fallocate Any: "virtio-fs: fallocate on an open share file",
];

/// The allow-list of `role`.
pub(crate) fn allowed(role: Role) -> Vec<&'static Allow> {
    match role {
        Role::Vmm => VMM.iter().collect(),
        Role::Vcpu => VCPU.iter().collect(),
        Role::VmmNet => VMM.iter().chain(NET).collect(),
    }
}

#[cfg(test)]
fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, Len::Dword, op, value).map_err(SeccompError::compile)
}

#[cfg(test)]
fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conds).map_err(SeccompError::compile)
}

/// The ioctl request's type byte (`_IOC_TYPE`), where KVM's is 0xAE.
const IOC_TYPE_MASK: u64 = 0xff00;
const KVMIO: u64 = 0xAE00;

#[cfg(test)]
fn rules_for(args: Args, pid: u32) -> Result<Vec<SeccompRule>, SeccompError> {
    let kvm = || rule(vec![cond(1, Op::MaskedEq(IOC_TYPE_MASK), KVMIO)?]);
    let eq = |arg, v: u64| rule(vec![cond(arg, Op::Eq, v)?]);
    Ok(match args {
        Args::Any => vec![],
        Args::KvmIoctl => vec![kvm()?],
        Args::KvmOrTerminalIoctl => vec![
            kvm()?,
            eq(1, libc::TCGETS)?,
            eq(1, libc::TCSETS)?,
            eq(1, libc::TIOCGWINSZ)?,
        ],
        Args::NoExec => vec![rule(vec![cond(
            2,
            Op::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?],
        Args::Thread => vec![rule(vec![cond(
            0,
            Op::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
        Args::ThreadName => vec![
            eq(0, libc::PR_SET_NAME as u64)?,
            eq(0, libc::PR_GET_NAME as u64)?,
        ],
        Args::ThreadNameOrNoNewPrivs => vec![
            eq(0, libc::PR_SET_NAME as u64)?,
            eq(0, libc::PR_GET_NAME as u64)?,
            eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)?,
        ],
        Args::AddFilter => vec![eq(0, libc::SECCOMP_SET_MODE_FILTER as u64)?],
        Args::OwnProcess => vec![eq(0, pid as u64)?],
        Args::Inet => vec![eq(0, libc::AF_INET as u64)?],
    })
}

/// `seccompiler`'s program for `role`: a linear chain, one comparison per listed call.
/// Kept as the reference the tree of [`compile`] is checked against.
#[cfg(test)]
pub(crate) fn compile_linear(role: Role, pid: u32) -> Result<BpfProgram, SeccompError> {
    let mut rules = BTreeMap::new();
    for a in allowed(role) {
        rules.insert(a.nr, rules_for(a.args, pid)?);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SeccompError::compile)?;
    filter.try_into().map_err(SeccompError::compile)
}

// Classic BPF encoding (linux/bpf_common.h, linux/seccomp.h).
/// BPF_LD | BPF_W | BPF_ABS (class and size are 0).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_ALU_AND_K: u16 = 0x04 | 0x50;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const SECCOMP_DATA_ARGS: u32 = 16;
/// `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// `EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
const AUDIT_ARCH_AARCH64: u32 = 183 | 0x8000_0000 | 0x4000_0000;
/// The audit architecture of this build's system calls.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = AUDIT_ARCH_X86_64;
/// The audit architecture of this build's system calls.
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = AUDIT_ARCH_AARCH64;
/// At most this many calls are compared one after the other in a leaf of the tree.
const LEAF: usize = 3;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn short(n: usize) -> Result<u8, SeccompError> {
    u8::try_from(n).map_err(|_| SeccompError::Compile(format!("a jump of {n} instructions")))
}

/// The code run for one listed call, the call number already checked: allow when one rule
/// matches (all its conditions hold on the argument's low 32 bits, as seccompiler's
/// `Dword` conditions), trap otherwise.
fn leaf_body(rules: &[SeccompRuleSpec]) -> Result<Vec<sock_filter>, SeccompError> {
    let allow = stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW);
    if rules.is_empty() {
        return Ok(vec![allow]);
    }
    let mut out = Vec::new();
    for rule in rules {
        // Per condition: load, optional mask, compare; a failed compare skips the rest of
        // this rule (its remaining conditions and its RET ALLOW).
        let lens: Vec<usize> = rule
            .iter()
            .map(|c| if c.mask.is_some() { 3 } else { 2 })
            .collect();
        for (i, c) in rule.iter().enumerate() {
            out.push(stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARGS + 8 * c.arg as u32));
            if let Some(m) = c.mask {
                out.push(stmt(BPF_ALU_AND_K, m));
            }
            let rest: usize = lens[i + 1..].iter().sum::<usize>() + 1;
            out.push(jump(BPF_JMP_JEQ_K, c.value, 0, short(rest)?));
        }
        out.push(allow.clone());
    }
    out.push(stmt(BPF_RET_K, libc::SECCOMP_RET_TRAP));
    Ok(out)
}

/// A binary search over the sorted call numbers (the accumulator holds the number): each
/// call costs about log2(n) comparisons instead of up to n, both when the kernel runs the
/// filter and when it precomputes, per call number, which calls the filter always allows
/// (its action cache emulates the filter once per number when it is installed).
fn tree(calls: &[(u32, Vec<sock_filter>)]) -> Result<Vec<sock_filter>, SeccompError> {
    if calls.len() <= LEAF {
        let mut out = Vec::new();
        for (nr, body) in calls {
            out.push(jump(BPF_JMP_JEQ_K, *nr, 0, short(body.len())?));
            out.extend_from_slice(body);
        }
        out.push(stmt(BPF_RET_K, libc::SECCOMP_RET_TRAP));
        return Ok(out);
    }
    let (low, high) = calls.split_at(calls.len() / 2);
    let (low, high) = (tree(low)?, tree(high)?);
    let mut out = Vec::with_capacity(low.len() + high.len() + 2);
    match u8::try_from(low.len()) {
        Ok(jt) => out.push(jump(BPF_JMP_JGE_K, calls[calls.len() / 2].0, jt, 0)),
        Err(_) => {
            // Conditional jumps reach 255 instructions: a long one goes through JA.
            let over = u32::try_from(low.len())
                .map_err(|_| SeccompError::Compile("filter too long".into()))?;
            out.push(jump(BPF_JMP_JGE_K, calls[calls.len() / 2].0, 0, 1));
            out.push(stmt(BPF_JMP_JA, over));
        }
    }
    out.extend(low);
    out.extend(high);
    Ok(out)
}

/// One argument condition: `(arg & mask) == value` on the low 32 bits.
struct CondSpec {
    arg: u8,
    mask: Option<u32>,
    value: u32,
}

/// All conditions of a rule must hold.
type SeccompRuleSpec = Vec<CondSpec>;

fn rule_specs(args: Args, pid: u32) -> Vec<SeccompRuleSpec> {
    let eq = |arg, value: u64| {
        vec![CondSpec {
            arg,
            mask: None,
            value: value as u32,
        }]
    };
    let masked = |arg, mask: u64, value: u64| {
        vec![CondSpec {
            arg,
            mask: Some(mask as u32),
            value: value as u32,
        }]
    };
    match args {
        Args::Any => vec![],
        Args::KvmIoctl => vec![masked(1, IOC_TYPE_MASK, KVMIO)],
        Args::KvmOrTerminalIoctl => vec![
            masked(1, IOC_TYPE_MASK, KVMIO),
            eq(1, libc::TCGETS),
            eq(1, libc::TCSETS),
            eq(1, libc::TIOCGWINSZ),
        ],
        Args::NoExec => vec![masked(2, libc::PROT_EXEC as u64, 0)],
        Args::Thread => vec![masked(
            0,
            libc::CLONE_THREAD as u64,
            libc::CLONE_THREAD as u64,
        )],
        Args::ThreadName => vec![
            eq(0, libc::PR_SET_NAME as u64),
            eq(0, libc::PR_GET_NAME as u64),
        ],
        Args::ThreadNameOrNoNewPrivs => vec![
            eq(0, libc::PR_SET_NAME as u64),
            eq(0, libc::PR_GET_NAME as u64),
            eq(0, libc::PR_SET_NO_NEW_PRIVS as u64),
        ],
        Args::AddFilter => vec![eq(0, libc::SECCOMP_SET_MODE_FILTER as u64)],
        Args::OwnProcess => vec![eq(0, pid as u64)],
        Args::Inet => vec![eq(0, libc::AF_INET as u64)],
    }
}

/// The BPF program of `role` for process `pid`: the listed calls allowed, anything else
/// trapping, another architecture's calls killing the process. The calls are found by
/// binary search (see [`tree`]); the decisions are those of seccompiler's linear program
/// for the same lists (checked by the tests).
pub(crate) fn compile(role: Role, pid: u32) -> Result<BpfProgram, SeccompError> {
    let mut calls = Vec::new();
    for a in allowed(role) {
        let nr = u32::try_from(a.nr)
            .map_err(|_| SeccompError::Compile(format!("call number {}", a.nr)))?;
        calls.push((nr, leaf_body(&rule_specs(a.args, pid))?));
    }
    calls.sort_by_key(|c| c.0);
    let mut prog = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
    ];
    prog.extend(tree(&calls)?);
    Ok(prog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_compile() {
        for role in [Role::Vmm, Role::Vcpu, Role::VmmNet] {
            let prog = compile(role, std::process::id()).unwrap();
            // The kernel's limit is 4096 instructions per filter.
            assert!(
                !prog.is_empty() && prog.len() < 4096,
                "{role:?}: {}",
                prog.len()
            );
        }
    }

    /// Runs a classic BPF program of the instructions the two compilers emit on one
    /// `seccomp_data` (call number, x86_64, arguments); returns the action.
    fn run(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let word = |off: u32| -> u32 {
            match off {
                0 => nr,
                4 => arch,
                o if (16..64).contains(&o) => {
                    let a = args[((o - 16) / 8) as usize];
                    if (o - 16) % 8 == 0 {
                        a as u32
                    } else {
                        (a >> 32) as u32
                    }
                }
                o => panic!("load of offset {o}"),
            }
        };
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => acc = word(i.k),
                BPF_ALU_AND_K => acc &= i.k,
                BPF_JMP_JA => pc += i.k as usize,
                BPF_JMP_JEQ_K => pc += if acc == i.k { i.jt } else { i.jf } as usize,
                BPF_JMP_JGE_K => pc += if acc >= i.k { i.jt } else { i.jf } as usize,
                0x25 => pc += if acc > i.k { i.jt } else { i.jf } as usize, // JGT
                BPF_RET_K => return i.k,
                c => panic!("instruction {c:#x} at {}", pc - 1),
            }
        }
    }

    #[test]
    fn the_tree_decides_as_the_linear_program() {
        let pid = 4242u32;
        let mut values: Vec<u64> = vec![
            0,
            1,
            u64::MAX,
            pid as u64,
            pid as u64 + 1,
            (1 << 32) | pid as u64,
            KVMIO,
            KVMIO | 0x01,
            0xAE80,
            0x1200,
            libc::TCGETS,
            libc::TCSETS,
            libc::TIOCGWINSZ,
            libc::TIOCSTI,
            libc::PROT_READ as u64,
            (libc::PROT_READ | libc::PROT_EXEC) as u64,
            libc::CLONE_THREAD as u64,
            (libc::CLONE_VM | libc::CLONE_THREAD) as u64,
            libc::CLONE_VM as u64,
            libc::PR_SET_NAME as u64,
            libc::PR_GET_NAME as u64,
            libc::PR_SET_NO_NEW_PRIVS as u64,
            libc::PR_SET_DUMPABLE as u64,
            libc::SECCOMP_SET_MODE_FILTER as u64,
            libc::SECCOMP_SET_MODE_STRICT as u64,
        ];
        values.dedup();
        for role in [Role::Vmm, Role::Vcpu, Role::VmmNet] {
            let tree = compile(role, pid).unwrap();
            let linear = compile_linear(role, pid).unwrap();
            assert!(tree.len() < 4096);
            for arch in [AUDIT_ARCH_X86_64, 0x4000_0003] {
                for nr in (0..600u32).chain([0x4000_0000, 0x4000_0001, u32::MAX]) {
                    for (i, &v) in values.iter().enumerate() {
                        // The value under test in each argument slot, others varying.
                        for slot in 0..3 {
                            let mut args = [values[(i + 1) % values.len()]; 6];
                            args[slot] = v;
                            assert_eq!(
                                run(&tree, arch, nr, args),
                                run(&linear, arch, nr, args),
                                "{role:?}: arch {arch:#x}, call {nr}, args {args:x?}"
                            );
                        }
                    }
                }
            }
            // Sanity: the lists mean what they say.
            let allow = libc::SECCOMP_RET_ALLOW;
            let read = libc::SYS_read as u32;
            assert_eq!(run(&tree, AUDIT_ARCH_X86_64, read, [0; 6]), allow);
            let execve = libc::SYS_execve as u32;
            assert_eq!(
                run(&tree, AUDIT_ARCH_X86_64, execve, [0; 6]),
                libc::SECCOMP_RET_TRAP
            );
        }
    }

    #[test]
    fn vcpu_calls_are_also_vmm_calls() {
        // Stacked filters must both allow a call: a vCPU entry missing from the VMM list
        // would trap all the same.
        for a in VCPU {
            assert!(
                VMM.iter().any(|v| v.nr == a.nr),
                "{} is on the vCPU list but not the VMM list",
                a.name()
            );
        }
    }

    #[test]
    fn lists_have_no_duplicates_and_no_dangerous_calls() {
        for list in [VMM, VCPU] {
            let mut nrs: Vec<i64> = list.iter().map(|a| a.nr).collect();
            nrs.sort();
            nrs.dedup();
            assert_eq!(nrs.len(), list.len());
            for bad in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_kill,
                libc::SYS_process_vm_writev,
                libc::SYS_mount,
                libc::SYS_bpf,
            ] {
                assert!(!nrs.contains(&bad), "{bad} must not be allowed");
            }
        }
        for a in VCPU {
            assert!(
                ![
                    libc::SYS_openat,
                    libc::SYS_clone,
                    libc::SYS_clone3,
                    libc::SYS_rename,
                    libc::SYS_accept4
                ]
                .contains(&a.nr),
                "{} is for VMM threads only",
                a.name()
            );
        }
    }
}
