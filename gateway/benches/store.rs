//! Throughput of the encrypted workspace store next to plain file I/O, in the same run.
//!
//! Both sides do the same durable work per file, so the difference is what encryption and the
//! index cost: the plain side writes a temporary file, fsyncs it and renames it into place (as
//! any editor that does not lose files on a crash does), and reads files back whole; the store
//! seals each file with AES-256-GCM into a new object (same steps), then commits its index.
//!
//! Run: `cargo bench -p sandgate --bench store -- [--files N] [--size BYTES] [--json OUT]`.
//! Target: the store at least half as fast as plain I/O for 1 MB files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use sandgate::workspace::keys::{Keyring, MasterSource, Secret};
use sandgate::workspace::path::WsPath;
use sandgate::workspace::store::{Quota, Store};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn plain_write(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let files: usize = arg(&args, "--files")
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let size: usize = arg(&args, "--size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);
    let base: PathBuf =
        std::env::temp_dir().join(format!("sandgate-store-bench-{}", std::process::id()));
    let plain = base.join("plain");
    std::fs::create_dir_all(&plain).expect("temp folder");
    let ring = Keyring::open_or_create(
        &base.join("keys.json"),
        &MasterSource::Key(Secret::random()),
    )
    .expect("keys");
    let quota = Quota {
        max_bytes: u64::MAX,
        max_files: usize::MAX,
    };
    let store = Store::open(
        &base.join("store"),
        "bench",
        Arc::new(RwLock::new(ring)),
        quota,
    )
    .expect("store");
    let data: Vec<Vec<u8>> = (0..files)
        .map(|i| (0..size).map(|j| (i * 31 + j * 7) as u8).collect())
        .collect();
    let total = files * size;

    // Alternate the two sides file by file, so both see the same disk and page-cache weather.
    let (mut t_plain_w, mut t_store_w) = (0.0, 0.0);
    for (i, d) in data.iter().enumerate() {
        let t = Instant::now();
        plain_write(&plain, &format!("f{i}"), d).expect("plain write");
        t_plain_w += t.elapsed().as_secs_f64();
        let t = Instant::now();
        store
            .write(&WsPath::parse(&format!("f{i}")).expect("path"), d, false)
            .expect("store write");
        t_store_w += t.elapsed().as_secs_f64();
    }
    let (mut t_plain_r, mut t_store_r) = (0.0, 0.0);
    for i in 0..files {
        let t = Instant::now();
        let a = std::fs::read(plain.join(format!("f{i}"))).expect("plain read");
        t_plain_r += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (_, b) = store
            .read(&WsPath::parse(&format!("f{i}")).expect("path"))
            .expect("store read");
        t_store_r += t.elapsed().as_secs_f64();
        assert_eq!(a, b, "the store returned different bytes");
    }
    let rows = [
        (
            "write",
            mb_per_s(total, t_store_w),
            mb_per_s(total, t_plain_w),
        ),
        (
            "read",
            mb_per_s(total, t_store_r),
            mb_per_s(total, t_plain_r),
        ),
    ];
    println!("{files} files of {size} bytes; plain = temp file + fsync + rename, read whole\n");
    println!("| operation | encrypted store (MB/s) | plain file I/O (MB/s) | store / plain |");
    println!("|---|---:|---:|---:|");
    for (op, s, p) in rows {
        println!("| {op} | {s:.0} | {p:.0} | {:.2} |", s / p);
    }
    if let Some(out) = arg(&args, "--json") {
        let json = format!(
            "{{\"files\": {files}, \"size\": {size}, \"write_store_mb_s\": {:.1}, \"write_plain_mb_s\": {:.1}, \"read_store_mb_s\": {:.1}, \"read_plain_mb_s\": {:.1}}}\n",
            rows[0].1, rows[0].2, rows[1].1, rows[1].2
        );
        std::fs::write(out, json).expect("write the JSON results");
    }
    let _ = std::fs::remove_dir_all(&base);
}
