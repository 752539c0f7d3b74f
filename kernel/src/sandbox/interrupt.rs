//! Interrupting the guest without losing its state.
//!
//! CPython raises `KeyboardInterrupt` when three things are set: the tripped flag of SIGINT's
//! handler, the runtime's `is_tripped` flag and the "signals pending" bit of the main thread's eval
//! breaker. `_thread.interrupt_main()` sets exactly those, and all three live in static data of the
//! image (`_PyRuntime`), so their addresses are the same in every instance of one image.
//! [`probe_interrupt`](super::probe_interrupt) finds them once per image: the guest calls a host
//! function, then `interrupt_main`, then the host function again, all from C (through `map`), so
//! the interpreter's eval breaker cannot run in between; the host diffs memory between the two
//! calls and keeps the words whose bits went from 0 to 1. A control run that calls a harmless C
//! function instead of `interrupt_main` removes the noise (reference counts, the list being built),
//! and the run is repeated so only stable words remain.
//!
//! To interrupt, the epoch callback (which runs on the guest's own thread, between wasm
//! instructions) ORs those bits back in and lets the guest continue; CPython notices at its
//! next loop back-edge or call, and the SIGINT handler raises `KeyboardInterrupt`. A host call
//! that blocks (`time.sleep`, `input()`) does the same and returns `EINTR`, which CPython's sleep
//! answers by checking for signals.

use serde::{Deserialize, Serialize};

/// One word of guest memory and the bits that raise an interrupt when set in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagWord {
    /// Byte offset in the guest's linear memory, 4-byte aligned.
    pub addr: u32,
    /// Bits to OR into the little-endian `u32` at `addr`.
    pub bits: u32,
}

/// The words that, set together, make the interpreter raise `KeyboardInterrupt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptFlags {
    /// The flag words, at most [`MAX_WORDS`].
    pub words: Vec<FlagWord>,
}

/// More words than this means the probe did not isolate the flags.
pub const MAX_WORDS: usize = 8;

impl InterruptFlags {
    /// Whether any flag bit is still set: Python has not yet taken the interrupt.
    pub fn pending(&self, memory: &[u8]) -> bool {
        self.words.iter().any(|w| {
            let at = w.addr as usize;
            memory
                .get(at..at + 4)
                .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & w.bits != 0)
        })
    }

    /// Clears the flag bits: an interrupt Python did not take is withdrawn.
    pub fn clear(&self, memory: &mut [u8]) {
        for w in &self.words {
            let at = w.addr as usize;
            if let Some(b) = memory.get_mut(at..at + 4) {
                let value = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & !w.bits;
                b.copy_from_slice(&value.to_le_bytes());
            }
        }
    }

    /// Sets the flags in `memory`. Returns false (and writes nothing) if a word lies outside it.
    pub fn raise(&self, memory: &mut [u8]) -> bool {
        if self
            .words
            .iter()
            .any(|w| w.addr as usize + 4 > memory.len())
        {
            return false;
        }
        for w in &self.words {
            let at = w.addr as usize;
            let mut word = [0u8; 4];
            word.copy_from_slice(&memory[at..at + 4]);
            let value = u32::from_le_bytes(word) | w.bits;
            memory[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        true
    }
}

/// The 4-byte words whose bits went from 0 to 1 between `before` and `after`, with those bits.
pub fn words_set(before: &[u8], after: &[u8]) -> Vec<FlagWord> {
    let n = before.len().min(after.len()) / 4 * 4;
    let mut out = Vec::new();
    for at in (0..n).step_by(4) {
        let b = u32::from_le_bytes([before[at], before[at + 1], before[at + 2], before[at + 3]]);
        let a = u32::from_le_bytes([after[at], after[at + 1], after[at + 2], after[at + 3]]);
        let set = a & !b;
        if set != 0 {
            out.push(FlagWord {
                addr: at as u32,
                bits: set,
            });
        }
    }
    out
}

/// Words present (same address and bits) in every run of `runs`, in no run of `controls`, and
/// at or above `stack_top` (below it is the C stack).
pub fn stable_words(
    runs: &[Vec<FlagWord>],
    controls: &[Vec<FlagWord>],
    stack_top: u32,
) -> Vec<FlagWord> {
    let Some((first, rest)) = runs.split_first() else {
        return Vec::new();
    };
    first
        .iter()
        .filter(|w| w.addr >= stack_top)
        .filter(|w| rest.iter().all(|r| r.contains(w)))
        .filter(|w| controls.iter().all(|c| !c.iter().any(|x| x.addr == w.addr)))
        .copied()
        .collect()
}

/// The initial value of the module's first mutable `i32` global: with wasm-ld's layout that is
/// `__stack_pointer`, the top of the C stack, which grows down from there. Words below it are
/// stack, which differs from moment to moment; flags never live there.
pub fn stack_top(wasm: &[u8]) -> Option<u32> {
    fn leb(d: &[u8], i: &mut usize) -> Option<u64> {
        let (mut n, mut shift) = (0u64, 0u32);
        loop {
            let b = *d.get(*i)?;
            *i += 1;
            n |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(n);
            }
            shift += 7;
            if shift > 63 {
                return None;
            }
        }
    }
    fn sleb32(d: &[u8], i: &mut usize) -> Option<i64> {
        let (mut n, mut shift) = (0i64, 0u32);
        loop {
            let b = *d.get(*i)?;
            *i += 1;
            n |= i64::from(b & 0x7f) << shift;
            shift += 7;
            if b < 0x80 {
                if shift < 64 && b & 0x40 != 0 {
                    n |= -1i64 << shift;
                }
                return Some(n);
            }
            if shift > 35 {
                return None;
            }
        }
    }
    if wasm.get(..4)? != b"\0asm" {
        return None;
    }
    let mut i = 8;
    while i < wasm.len() {
        let id = wasm[i];
        i += 1;
        let len = usize::try_from(leb(wasm, &mut i)?).ok()?;
        let end = i.checked_add(len)?;
        if id == 6 {
            let section = wasm.get(i..end)?;
            let mut j = 0;
            // The first global must be a mutable i32 with a constant initialiser,
            // `i32.const N end`; anything else is not a layout we know.
            if leb(section, &mut j)? == 0 {
                return None;
            }
            let (ty, mutable) = (*section.get(j)?, *section.get(j + 1)?);
            j += 2;
            if ty == 0x7f && mutable == 1 && *section.get(j)? == 0x41 {
                j += 1;
                return u32::try_from(sleb32(section, &mut j)?).ok();
            }
            return None;
        }
        i = end;
    }
    None
}

/// The guest code of one probe run. `trigger` is the C callable run between the two host
/// calls: `_thread.interrupt_main` for a real run, `int` for a control.
pub fn probe_code(trigger: &str) -> String {
    format!(
        "import _thread, _host, operator, functools, signal\n\
         signal.signal(signal.SIGINT, signal.default_int_handler)\n\
         try:\n\
         \x20   list(map(operator.call, [functools.partial(_host.call, b'{{\"op\":\"probe\",\"phase\":\"before\"}}'), {trigger}, functools.partial(_host.call, b'{{\"op\":\"probe\",\"phase\":\"after\"}}')]))\n\
         \x20   for _ in range(3): pass\n\
         except KeyboardInterrupt:\n\
         \x20   pass\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_bits_that_went_up() {
        let before = [0u8, 0, 0, 0, 1, 0, 0, 0, 0xff, 0, 0, 0];
        let after = [1u8, 0, 0, 0, 3, 0, 0, 0, 0x00, 0, 0, 0];
        let w = words_set(&before, &after);
        assert_eq!(
            w,
            vec![FlagWord { addr: 0, bits: 1 }, FlagWord { addr: 4, bits: 2 }]
        );
    }

    #[test]
    fn stable_drops_noise_and_controls() {
        let stack = FlagWord { addr: 4, bits: 1 };
        let a = FlagWord { addr: 8, bits: 1 };
        let noise = FlagWord { addr: 16, bits: 4 };
        let ctl = FlagWord { addr: 24, bits: 1 };
        let runs = vec![vec![stack, a, noise, ctl], vec![stack, a, ctl]];
        let controls = vec![vec![ctl]];
        assert_eq!(stable_words(&runs, &controls, 8), vec![a]);
    }

    #[test]
    fn stack_top_reads_the_first_mutable_global() {
        // (module (global (mut i32) (i32.const 16777216)) (global i32 (i32.const 0)))
        let wasm = [
            0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x06, 0x0e, 0x02, 0x7f, 0x01, 0x41,
            0x80, 0x80, 0x80, 0x08, 0x0b, 0x7f, 0x00, 0x41, 0x00, 0x0b,
        ];
        assert_eq!(stack_top(&wasm), Some(16 << 20));
        assert_eq!(stack_top(b"nope"), None);
        assert_eq!(stack_top(&wasm[..12]), None);
    }

    #[test]
    fn raise_refuses_out_of_bounds() {
        let flags = InterruptFlags {
            words: vec![FlagWord { addr: 8, bits: 1 }],
        };
        let mut small = [0u8; 8];
        assert!(!flags.raise(&mut small));
        let mut mem = [0u8; 12];
        assert!(flags.raise(&mut mem));
        assert_eq!(mem[8], 1);
    }
}
