//! Allocator tuning for training loops.
//!
//! A training step allocates and frees tens of large activation buffers. With
//! glibc's defaults every buffer above the mmap threshold is a fresh `mmap`:
//! the kernel zeroes its pages on first touch and every `munmap` flushes the
//! TLBs of all cores — measured at about a fifth of a SimCLR step on 2 cores.
//! [`keep_freed_memory`] raises the thresholds so freed buffers are reused,
//! and keeps every thread on the main heap: the thresholds govern it, while a
//! thread's own arena (glibc gives each new thread one) maps blocks above its
//! 64 MiB heap size afresh and returns shrunk heaps to the kernel. Training
//! steps run on rayon's workers ([`crate::cpu::on_pool`]), so their buffers
//! would come from such arenas.

/// Tells glibc's malloc to serve large blocks from the heap and not to return
/// freed memory to the kernel eagerly. Call once at program start (the
/// binaries and benches do, through [`crate::cpu::prepare_process`]). A
/// no-op on other platforms.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // 1 GiB: larger single buffers still use mmap.
        const THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator parameters; both options and values are valid.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD);
            // One arena: the workers' allocations follow the thresholds above.
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
