//! `sandgate-kernel`: a Jupyter kernel whose Python runs inside a wasmtime sandbox.
//!
//! # Layout
//!
//! The wire format (framing and HMAC signatures) lives in the `sandgate-wire` crate
//! (`kernel/wire/`), which the gateway shares without linking wasmtime.
//!
//! - [`server`]: the five ZeroMQ channels, the request handlers, status and history.
//! - [`sandbox`]: the interpreter in wasmtime, its limits, its door to the kernel and the
//!   guest-side driver (`sandbox/driver.py`). The only module that imports wasmtime.
//! - [`image`]: the sandbox image: fetching, SHA-256 pins, the compiled-module cache.
//! - [`kernelspec`]: `sandgate-kernel install`, the kernelspec Jupyter finds.
//! - [`harden`]: the second wall: rlimits, no_new_privs, an empty network namespace, seccomp.
//! - [`workspace`]: which host folder the standalone kernel hands the guest as `/workspace`.
//!
//! The binary (`main.rs`) reads the command line and environment, builds a
//! [`server::KernelConfig`] and calls [`server::run`].

pub mod harden;
pub mod image;
pub mod kernelspec;
pub mod sandbox;
pub mod server;
pub mod workspace;
