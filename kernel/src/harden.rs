//! The second wall around the sandbox: what the kernel *process* may do, applied on Linux
//! before any thread starts (so every later thread inherits it). Each step that the host does
//! not allow is skipped with a logged warning, never silently.
//!
//! 1. Resource limits: no core dumps (a dump would hold the guest's data and the HMAC key), a
//!    cap on open files, a bound on address space (wasmtime reserves large guard regions, so
//!    the bound is generous; the guest's memory is capped by the sandbox itself).
//! 2. `no_new_privs`: nothing the process runs can gain privileges.
//! 3. A network namespace of its own when the gateway talks to it over Unix sockets: the
//!    process has no network interface at all (not even a usable loopback).
//! 4. seccomp: an allow-list of the system calls a kernel needs (memory, threads, files, its own
//!    sockets); anything else fails with `EPERM`. Sockets are allowed for `AF_UNIX` only (and
//!    `AF_INET`/`AF_INET6` when the kernel speaks TCP to its client). New processes are out
//!    (`clone` only with `CLONE_THREAD`; `clone3` answers `ENOSYS`, so the C library falls
//!    back to `clone`), and a second filter kills the process outright on calls that only an
//!    attack would make (`execve`, `ptrace`, `mount`, `bpf`, module loading, ...).

/// How the kernel talks to its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Unix sockets only: the process gets an empty network namespace.
    UnixOnly,
    /// TCP on loopback (a kernel started by jupyter_client): IP sockets stay allowed.
    Tcp,
}

/// What was applied, and what was skipped with why.
#[derive(Debug, Default)]
pub struct Report {
    /// Steps in force.
    pub applied: Vec<&'static str>,
    /// Steps the host refused.
    pub skipped: Vec<(&'static str, String)>,
}

/// Most files the kernel process may hold open.
pub const MAX_OPEN_FILES: u64 = 4096;
/// The address-space bound, bytes (64 GiB: above what wasmtime reserves for one guest).
pub const MAX_ADDRESS_SPACE: u64 = 64 << 30;

/// Applies every step it can. Call it while the process has one thread.
pub fn apply(network: Network) -> Report {
    let mut report = Report::default();
    imp::limits(&mut report);
    imp::no_new_privs(&mut report);
    if network == Network::UnixOnly {
        imp::own_network(&mut report);
    }
    imp::seccomp(network, &mut report);
    for (step, why) in &report.skipped {
        tracing::warn!(step, reason = %why, "a hardening step is not available here");
    }
    tracing::info!(applied = ?report.applied, "kernel process hardened");
    report
}

#[cfg(target_os = "linux")]
mod imp {
    use std::collections::BTreeMap;

    use rustix::process::{Resource, Rlimit, setrlimit};
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    use super::{MAX_ADDRESS_SPACE, MAX_OPEN_FILES, Network, Report};

    pub(super) fn limits(report: &mut Report) {
        let limits = [
            (Resource::Core, 0, "no core dumps"),
            (Resource::Nofile, MAX_OPEN_FILES, "open-file cap"),
            (Resource::As, MAX_ADDRESS_SPACE, "address-space bound"),
        ];
        for (resource, value, name) in limits {
            let limit = Rlimit {
                current: Some(value),
                maximum: Some(value),
            };
            match setrlimit(resource, limit) {
                Ok(()) => report.applied.push(name),
                Err(e) => report.skipped.push((name, e.to_string())),
            }
        }
    }

    pub(super) fn no_new_privs(report: &mut Report) {
        match rustix::thread::set_no_new_privs(true) {
            Ok(()) => report.applied.push("no_new_privs"),
            Err(e) => report.skipped.push(("no_new_privs", e.to_string())),
        }
    }

    pub(super) fn own_network(report: &mut Report) {
        use rustix::thread::{UnshareFlags, unshare_unsafe};
        // A user namespace comes first where the process lacks CAP_SYS_ADMIN (unprivileged
        // user namespaces); as root the network namespace alone is enough.
        let attempts = [
            UnshareFlags::NEWNET,
            UnshareFlags::NEWUSER | UnshareFlags::NEWNET,
        ];
        let mut last = String::new();
        for flags in attempts {
            // SAFETY: `unshare` is unsafe because it changes what the whole (single-threaded,
            // at this point) process shares; with NEWNET/NEWUSER it only detaches the process
            // from the host's network (and user mapping), which is the point. No memory is
            // touched.
            #[allow(unsafe_code)]
            let result = unsafe { unshare_unsafe(flags) };
            match result {
                Ok(()) => {
                    report.applied.push("own network namespace");
                    return;
                }
                Err(e) => last = e.to_string(),
            }
        }
        report.skipped.push(("own network namespace", last));
    }

    /// The system calls a kernel makes, by name (x86_64 and aarch64 numbers from libc).
    fn allowed() -> Vec<i64> {
        let mut v = vec![
            // memory
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_mincore,
            libc::SYS_memfd_create,
            libc::SYS_membarrier,
            // threads, time, signals
            libc::SYS_futex,
            libc::SYS_set_robust_list,
            libc::SYS_get_robust_list,
            libc::SYS_rseq,
            libc::SYS_set_tid_address,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getppid,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_clock_gettime,
            libc::SYS_clock_getres,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_gettimeofday,
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_tgkill,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_prctl,
            libc::SYS_prlimit64,
            libc::SYS_getrandom,
            libc::SYS_uname,
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_getgid,
            libc::SYS_getegid,
            libc::SYS_sysinfo,
            // files (the guest's preopened folders, the image, the cache)
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_close,
            libc::SYS_close_range,
            libc::SYS_lseek,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_fstatfs,
            libc::SYS_statfs,
            libc::SYS_getdents64,
            libc::SYS_mkdirat,
            libc::SYS_unlinkat,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_linkat,
            libc::SYS_symlinkat,
            libc::SYS_readlinkat,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_fchmod,
            libc::SYS_fchmodat,
            libc::SYS_utimensat,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_ftruncate,
            libc::SYS_fallocate,
            libc::SYS_fadvise64,
            libc::SYS_fcntl,
            libc::SYS_dup,
            libc::SYS_dup3,
            libc::SYS_pipe2,
            libc::SYS_getcwd,
            libc::SYS_flock,
            // its own sockets and the event loop
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_shutdown,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_pwait,
            libc::SYS_eventfd2,
            libc::SYS_ppoll,
        ];
        #[cfg(target_arch = "x86_64")]
        v.extend([
            libc::SYS_arch_prctl,
            libc::SYS_access,
            libc::SYS_mkdir,
            libc::SYS_unlink,
            libc::SYS_rename,
            libc::SYS_readlink,
            libc::SYS_stat,
            libc::SYS_lstat,
            libc::SYS_open,
            libc::SYS_chmod,
            libc::SYS_epoll_wait,
            libc::SYS_poll,
            libc::SYS_dup2,
            libc::SYS_pipe,
            libc::SYS_getdents,
            libc::SYS_time,
        ]);
        v
    }

    /// Calls that only an attack would make: the process is killed on the spot.
    fn fatal() -> Vec<i64> {
        let mut v = vec![
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_kexec_load,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_userfaultfd,
            libc::SYS_open_by_handle_at,
        ];
        #[cfg(target_arch = "x86_64")]
        v.extend([
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_iopl,
            libc::SYS_ioperm,
        ]);
        v
    }

    fn arch() -> Result<TargetArch, String> {
        TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("{e:?}"))
    }

    fn rule(arg: u8, value: u64) -> Result<SeccompRule, String> {
        let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
            .map_err(|e| e.to_string())?;
        SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
    }

    /// Three filters, installed in this order: the attack-only calls (kill), `clone3`
    /// (`ENOSYS`), and the allow-list (anything else: `EPERM`; it allows `clone3`, so the
    /// second filter's `ENOSYS` is the answer, an error outranking an allow). The allow-list
    /// goes last because it does not allow `seccomp` itself: no filter can follow it.
    fn programs(network: Network) -> Result<Vec<BpfProgram>, String> {
        let arch = arch()?;
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            allowed().into_iter().map(|s| (s, Vec::new())).collect();
        let mut families = vec![libc::AF_UNIX as u64];
        if network == Network::Tcp {
            families.extend([libc::AF_INET as u64, libc::AF_INET6 as u64]);
        }
        rules.insert(
            libc::SYS_socket,
            families
                .iter()
                .map(|f| rule(0, *f))
                .collect::<Result<_, _>>()?,
        );
        rules.insert(libc::SYS_socketpair, vec![rule(0, libc::AF_UNIX as u64)?]);
        rules.insert(libc::SYS_clone3, Vec::new());
        // ioctl only for what the runtime does with its own descriptors: non-blocking mode,
        // close-on-exec, bytes ready, and `isatty`'s TCGETS (never TIOCSTI, which would type
        // into a terminal the process inherited).
        rules.insert(
            libc::SYS_ioctl,
            [
                libc::FIONBIO,
                libc::FIOCLEX,
                libc::FIONCLEX,
                libc::FIONREAD,
                libc::TCGETS,
            ]
            .iter()
            .map(|r| rule(1, *r))
            .collect::<Result<_, _>>()?,
        );
        // New threads only: the flags must include CLONE_THREAD.
        let thread = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )
        .map_err(|e| e.to_string())?;
        rules.insert(
            libc::SYS_clone,
            vec![SeccompRule::new(vec![thread]).map_err(|e| e.to_string())?],
        );
        let allow = SeccompFilter::new(
            rules,
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
            arch,
        )
        .map_err(|e| e.to_string())?;
        let fatal = SeccompFilter::new(
            fatal().into_iter().map(|s| (s, Vec::new())).collect(),
            SeccompAction::Allow,
            SeccompAction::KillProcess,
            arch,
        )
        .map_err(|e| e.to_string())?;
        let clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(|e| e.to_string())?;
        [fatal, clone3, allow]
            .into_iter()
            .map(|f| BpfProgram::try_from(f).map_err(|e| e.to_string()))
            .collect()
    }

    pub(super) fn seccomp(network: Network, report: &mut Report) {
        let result = programs(network).and_then(|filters| {
            filters
                .iter()
                .try_for_each(|f| seccompiler::apply_filter(f).map_err(|e| e.to_string()))
        });
        match result {
            Ok(()) => report.applied.push("seccomp allow-list"),
            Err(e) => report.skipped.push(("seccomp allow-list", e)),
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::{Network, Report};

    pub(super) fn limits(report: &mut Report) {
        report.skipped.push(("resource limits", "not Linux".into()));
    }
    pub(super) fn no_new_privs(report: &mut Report) {
        report.skipped.push(("no_new_privs", "not Linux".into()));
    }
    pub(super) fn own_network(report: &mut Report) {
        report
            .skipped
            .push(("own network namespace", "not Linux".into()));
    }
    pub(super) fn seccomp(_: Network, report: &mut Report) {
        report
            .skipped
            .push(("seccomp allow-list", "not Linux".into()));
    }
}
