//! The guest's way to packages: the door's `packages` op, carried to the gateway over a Unix
//! socket the gateway made for this kernel process (`--packages-socket`).
//!
//! The sandbox has no network and neither has this process; the gateway fetches, checks and
//! unpacks wheels, and installs them into the workspace's site folder, which the guest sees
//! read-only at [`GUEST_SITE`](super::GUEST_SITE). This side only relays: one JSON line per
//! request (`{"id": N, ...the guest's call}`), one JSON line per answer (`{"id": N, ...}`), so
//! the gateway trusts nothing the guest wrote beyond what it checks itself.
//!
//! Waiting is interruptible: an interrupt sends `{"cancel": N}` and waits a little longer for
//! the gateway's word (a fetch stops; an install that already began completes), so the guest
//! learns what really happened.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Longest answer line the gateway may send (a big project's file list).
const MAX_ANSWER: usize = 32 << 20;
/// How long an interrupted call waits for the gateway's last word.
const CANCEL_GRACE: Duration = Duration::from_secs(10);
/// How long one answer may take at most (a fetch has its own, shorter, limits in the gateway).
const MAX_WAIT: Duration = Duration::from_secs(30 * 60);

/// The link to the gateway, connected on first use.
#[derive(Debug)]
pub(crate) struct Link {
    socket: Option<PathBuf>,
    conn: Option<(UnixStream, BufReader<UnixStream>)>,
    next_id: u64,
}

/// How a call ended, for the door.
pub(crate) enum Waited {
    /// The gateway's answer (without its id).
    Answer(Value),
    /// The wait was interrupted and the gateway said nothing in time.
    Interrupted,
}

impl Link {
    pub(crate) fn new(socket: Option<PathBuf>) -> Self {
        Link {
            socket,
            conn: None,
            next_id: 1,
        }
    }

    fn connect(&mut self) -> Result<&mut (UnixStream, BufReader<UnixStream>), String> {
        if self.conn.is_none() {
            let Some(path) = &self.socket else {
                return Err(
                    "installing packages needs the Sandgate gateway, which fetches them: \
                            the sandbox has no network, and this kernel was started without the \
                            gateway (for instance by Jupyter directly)"
                        .into(),
                );
            };
            let stream = UnixStream::connect(path)
                .map_err(|e| format!("cannot reach the gateway's package service: {e}"))?;
            stream
                .set_read_timeout(Some(super::TICK))
                .map_err(|e| e.to_string())?;
            let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
            self.conn = Some((stream, reader));
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Sends `call` and waits for its answer; `interrupted` is asked every tick and says
    /// whether the user interrupted (it may also end the wait with an error, a hard stop).
    pub(crate) fn call<E>(
        &mut self,
        call: serde_json::Map<String, Value>,
        mut interrupted: impl FnMut() -> Result<bool, E>,
    ) -> Result<Result<Waited, String>, E> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = Value::Object(call);
        line["id"] = json!(id);
        let conn = match self.connect() {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let mut text = line.to_string();
        text.push('\n');
        if let Err(e) = conn.0.write_all(text.as_bytes()) {
            self.conn = None;
            return Ok(Err(format!("the gateway's package service went away: {e}")));
        }
        let started = Instant::now();
        let mut cancelled: Option<Instant> = None;
        let mut buf = Vec::new();
        loop {
            let (stream, reader) = self.conn.as_mut().expect("connected above");
            match read_line(reader, &mut buf) {
                Ok(true) => {
                    let parsed = serde_json::from_slice::<Value>(&buf);
                    buf.clear();
                    match parsed {
                        Ok(Value::Object(mut answer))
                            if answer.get("id").and_then(Value::as_u64) == Some(id) =>
                        {
                            answer.remove("id");
                            return Ok(Ok(Waited::Answer(Value::Object(answer))));
                        }
                        // An answer to an earlier call that was given up on.
                        Ok(_) => continue,
                        Err(e) => {
                            self.conn = None;
                            return Ok(Err(format!("the gateway sent a bad answer: {e}")));
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    self.conn = None;
                    return Ok(Err(e));
                }
            }
            match cancelled {
                Some(at) if at.elapsed() > CANCEL_GRACE => return Ok(Ok(Waited::Interrupted)),
                Some(_) => {}
                None => {
                    if interrupted()? {
                        let text = format!("{}\n", json!({ "cancel": id }));
                        if stream.write_all(text.as_bytes()).is_err() {
                            self.conn = None;
                            return Ok(Ok(Waited::Interrupted));
                        }
                        cancelled = Some(Instant::now());
                    } else if started.elapsed() > MAX_WAIT {
                        self.conn = None;
                        return Ok(Err("the gateway's package service did not answer".into()));
                    }
                }
            }
        }
    }
}

/// Reads into `buf` until a newline (true) or the socket's read timeout (false). `buf` keeps
/// what came before a timeout, so the next call carries on the same line.
fn read_line(reader: &mut BufReader<UnixStream>, buf: &mut Vec<u8>) -> Result<bool, String> {
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("the gateway's package service went away: {e}")),
        };
        if available.is_empty() {
            return Err("the gateway's package service closed the connection".into());
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(at) => {
                buf.extend_from_slice(&available[..at]);
                reader.consume(at + 1);
                return Ok(true);
            }
            None => {
                let n = available.len();
                buf.extend_from_slice(available);
                reader.consume(n);
                if buf.len() > MAX_ANSWER {
                    return Err("the gateway's answer is too long".into());
                }
            }
        }
    }
}
