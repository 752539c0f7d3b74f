//! A streaming `multipart/form-data` parser (RFC 7578 over RFC 2046) for uploads: bytes go in
//! as they arrive, parts and their data come out, and nothing is held but a part's headers and
//! the few bytes that could be the start of a boundary. The body is hostile: headers are
//! capped, a body that ends before its closing boundary is an error, and every malformation is
//! a [`MultipartError`], never a panic.

use bytes::Bytes;

/// Longest boundary (RFC 2046).
const MAX_BOUNDARY: usize = 70;
/// Most bytes of one part's headers.
const MAX_HEADERS: usize = 16 << 10;
/// Most bytes before the first boundary.
const MAX_PREAMBLE: usize = 64 << 10;

/// Why a multipart body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    /// The `Content-Type` has no usable boundary.
    #[error("the multipart Content-Type has no valid boundary")]
    Boundary,
    /// Too much before the first boundary.
    #[error("no multipart boundary in the first {MAX_PREAMBLE} bytes")]
    Preamble,
    /// A boundary is followed by neither a line end nor `--`.
    #[error("a multipart boundary is followed by something other than a line end")]
    AfterBoundary,
    /// A part's headers are too long.
    #[error("a multipart part's headers are longer than {MAX_HEADERS} bytes")]
    HeadersTooLong,
    /// A header line is not `Name: value`, or not UTF-8.
    #[error("a multipart part has a malformed header line")]
    Header,
    /// The body ended before the closing boundary.
    #[error("the multipart body ends before its closing boundary (truncated?)")]
    Truncated,
}

/// What a part says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartHeaders {
    /// The form field's name (`Content-Disposition: form-data; name=…`).
    pub name: Option<String>,
    /// The file name (`filename=…`): for envd's uploads, the file's full path.
    pub filename: Option<String>,
}

/// What the parser found next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A part begins.
    Part(PartHeaders),
    /// Some of the current part's data.
    Data(Bytes),
    /// The current part ended.
    PartEnd,
    /// The closing boundary: nothing more.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for the first boundary.
    Preamble,
    /// Just after a boundary: `--` or a line end follows.
    AfterBoundary,
    /// In a part's headers.
    Headers,
    /// In a part's data.
    Body,
    /// After the closing boundary.
    Done,
}

/// The parser.
#[derive(Debug)]
pub struct Multipart {
    /// `\r\n--boundary`.
    delimiter: Vec<u8>,
    buf: Vec<u8>,
    state: State,
}

/// The boundary of a `multipart/form-data` Content-Type, if it is one.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return Err(MultipartError::Boundary);
    }
    for param in parts {
        let Some((k, v)) = param.split_once('=') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case("boundary") {
            continue;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        let ok = !v.is_empty()
            && v.len() <= MAX_BOUNDARY
            && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            && !v.ends_with(' ');
        return if ok {
            Ok(v.to_owned())
        } else {
            Err(MultipartError::Boundary)
        };
    }
    Err(MultipartError::Boundary)
}

impl Multipart {
    /// A parser for parts separated by `boundary`.
    pub fn new(boundary: &str) -> Multipart {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        Multipart {
            delimiter,
            // As if a line end came first, so a boundary at the very start is found like any.
            buf: b"\r\n".to_vec(),
            state: State::Preamble,
        }
    }

    /// More of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.state != State::Done {
            self.buf.extend_from_slice(chunk);
        }
    }

    /// The body has ended: an error unless the closing boundary came.
    pub fn finish(&self) -> Result<(), MultipartError> {
        if self.state == State::Done {
            Ok(())
        } else {
            Err(MultipartError::Truncated)
        }
    }

    /// The next event; `Ok(None)` when more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<Event>, MultipartError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Preamble => match find(&self.buf, &self.delimiter) {
                    Some(at) => {
                        self.buf.drain(..at + self.delimiter.len());
                        self.state = State::AfterBoundary;
                    }
                    None if self.buf.len() > MAX_PREAMBLE => {
                        return Err(MultipartError::Preamble);
                    }
                    None => return Ok(None),
                },
                State::AfterBoundary => {
                    // Transport padding (spaces, tabs) may follow a boundary.
                    let pad = self
                        .buf
                        .iter()
                        .take_while(|b| **b == b' ' || **b == b'\t')
                        .count();
                    let rest = &self.buf[pad..];
                    if rest.len() < 2 {
                        if pad > MAX_BOUNDARY {
                            return Err(MultipartError::AfterBoundary);
                        }
                        return Ok(None);
                    }
                    if rest.starts_with(b"--") {
                        self.state = State::Done;
                        self.buf = Vec::new();
                        return Ok(Some(Event::End));
                    }
                    if !rest.starts_with(b"\r\n") {
                        return Err(MultipartError::AfterBoundary);
                    }
                    self.buf.drain(..pad + 2);
                    self.state = State::Headers;
                }
                State::Headers => {
                    let end = if self.buf.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        find(&self.buf, b"\r\n\r\n").map(|at| (at, at + 4))
                    };
                    let Some((block_end, consumed)) = end else {
                        if self.buf.len() > MAX_HEADERS {
                            return Err(MultipartError::HeadersTooLong);
                        }
                        return Ok(None);
                    };
                    if block_end > MAX_HEADERS {
                        return Err(MultipartError::HeadersTooLong);
                    }
                    let headers = parse_headers(&self.buf[..block_end])?;
                    self.buf.drain(..consumed);
                    self.state = State::Body;
                    return Ok(Some(Event::Part(headers)));
                }
                State::Body => {
                    if let Some(at) = find(&self.buf, &self.delimiter) {
                        if at > 0 {
                            let data = Bytes::copy_from_slice(&self.buf[..at]);
                            self.buf.drain(..at);
                            return Ok(Some(Event::Data(data)));
                        }
                        self.buf.drain(..self.delimiter.len());
                        self.state = State::AfterBoundary;
                        return Ok(Some(Event::PartEnd));
                    }
                    // Everything but what could be the start of the delimiter is data.
                    let keep = self.delimiter.len() - 1;
                    if self.buf.len() <= keep {
                        return Ok(None);
                    }
                    let cut = self.buf.len() - keep;
                    let data = Bytes::copy_from_slice(&self.buf[..cut]);
                    self.buf.drain(..cut);
                    return Ok(Some(Event::Data(data)));
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// A part's header block: only `Content-Disposition` matters here.
fn parse_headers(block: &[u8]) -> Result<PartHeaders, MultipartError> {
    let text = std::str::from_utf8(block).map_err(|_| MultipartError::Header)?;
    let mut out = PartHeaders::default();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(MultipartError::Header)?;
        if name.is_empty() || name.contains(|c: char| c.is_whitespace()) {
            return Err(MultipartError::Header);
        }
        if name.eq_ignore_ascii_case("content-disposition") {
            let params = disposition_params(value.trim())?;
            for (k, v) in params {
                if k.eq_ignore_ascii_case("name") {
                    out.name = Some(v);
                } else if k.eq_ignore_ascii_case("filename") {
                    out.filename = Some(v);
                }
            }
        }
    }
    Ok(out)
}

/// `form-data; name="file"; filename="/home/user/a.txt"` → its parameters. Values are tokens
/// or quoted strings (a backslash escapes the next character, as Go's `mime` reads them).
fn disposition_params(value: &str) -> Result<Vec<(String, String)>, MultipartError> {
    let mut rest = match value.split_once(';') {
        Some((_, r)) => r,
        None => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        if rest.is_empty() {
            return Ok(out);
        }
        let (key, after) = rest.split_once('=').ok_or(MultipartError::Header)?;
        let key = key.trim().to_owned();
        let after = after.trim_start();
        let (val, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut val = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, e)) => val.push(e),
                        None => return Err(MultipartError::Header),
                    },
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => val.push(c),
                }
            }
            let end = end.ok_or(MultipartError::Header)?;
            (val, &quoted[end..])
        } else {
            let stop = after.find(';').unwrap_or(after.len());
            (after[..stop].trim().to_owned(), &after[stop..])
        };
        out.push((key, val));
        rest = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in chunks of `step` bytes; returns the parts (headers, data).
    fn parse(body: &[u8], step: usize) -> Result<Vec<(PartHeaders, Vec<u8>)>, MultipartError> {
        let mut m = Multipart::new("XyZ");
        let mut parts: Vec<(PartHeaders, Vec<u8>)> = Vec::new();
        let mut ended = false;
        for chunk in body.chunks(step.max(1)) {
            m.feed(chunk);
            while let Some(ev) = m.next_event()? {
                match ev {
                    Event::Part(h) => parts.push((h, Vec::new())),
                    Event::Data(d) => parts.last_mut().unwrap().1.extend_from_slice(&d),
                    Event::PartEnd => {}
                    Event::End => ended = true,
                }
            }
        }
        m.finish()?;
        assert!(ended);
        Ok(parts)
    }

    fn body(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        for (filename, data) in parts {
            b.extend_from_slice(b"--XyZ\r\n");
            b.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            );
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    }

    #[test]
    fn parts_come_out_whole_whatever_the_chunking() {
        // Data that holds near-boundaries and line ends.
        let tricky = b"a\r\n--XyQ\r\n--Xy\r\n\r\n--X".to_vec();
        let b = body(&[
            ("/home/user/a.txt", b"hello"),
            ("b.bin", &tricky),
            ("e", b""),
        ]);
        for step in [1, 2, 3, 7, 64, b.len()] {
            let parts = parse(&b, step).unwrap();
            assert_eq!(parts.len(), 3, "step {step}");
            assert_eq!(parts[0].0.name.as_deref(), Some("file"));
            assert_eq!(parts[0].0.filename.as_deref(), Some("/home/user/a.txt"));
            assert_eq!(parts[0].1, b"hello");
            assert_eq!(parts[1].1, tricky, "step {step}");
            assert_eq!(parts[2].1, b"");
        }
    }

    #[test]
    fn boundaries_and_parameters_are_read_as_clients_write_them() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc123").unwrap(),
            "abc123"
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=x; boundary=\"a b\"").unwrap(),
            "a b"
        );
        for bad in [
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/mixed; boundary=a",
            "application/json",
        ] {
            assert!(boundary(bad).is_err(), "{bad}");
        }
        assert!(boundary(&format!("multipart/form-data; boundary={}", "b".repeat(71))).is_err());
        let p = disposition_params(r#"form-data; name="file"; filename="a\"b;c.txt""#).unwrap();
        assert_eq!(p[1], ("filename".into(), "a\"b;c.txt".into()));
        let p = disposition_params("form-data; name=file").unwrap();
        assert_eq!(p[0], ("name".into(), "file".into()));
        // A preamble before the first boundary is skipped.
        let mut b = b"ignored preamble\r\n".to_vec();
        b.extend_from_slice(&body(&[("x", b"1")]));
        assert_eq!(parse(&b, 5).unwrap()[0].1, b"1");
    }

    #[test]
    fn malformed_bodies_are_errors_never_panics() {
        // Truncated: no closing boundary.
        let b = body(&[("x", b"data")]);
        let cut = &b[..b.len() - 9];
        assert_eq!(parse(cut, 4), Err(MultipartError::Truncated));
        assert_eq!(parse(b"", 4), Err(MultipartError::Truncated));
        // No boundary at all.
        assert_eq!(
            parse(&vec![b'x'; MAX_PREAMBLE + 10], 4096),
            Err(MultipartError::Preamble)
        );
        // Garbage after a boundary.
        assert_eq!(
            parse(b"--XyZ garbage\r\n", 3),
            Err(MultipartError::AfterBoundary)
        );
        // Endless headers.
        let mut b = b"--XyZ\r\n".to_vec();
        b.extend(std::iter::repeat_n(b'h', MAX_HEADERS + 10));
        assert_eq!(parse(&b, 1000), Err(MultipartError::HeadersTooLong));
        // A header line without a colon, an unterminated quote, bytes that are not UTF-8.
        for headers in [
            &b"no colon here\r\n\r\n"[..],
            b"Content-Disposition: form-data; filename=\"open\r\n\r\n",
            b"Content-Disposition: form-data; filename=\"\xff\xfe\"\r\n\r\n",
        ] {
            let mut b = b"--XyZ\r\n".to_vec();
            b.extend_from_slice(headers);
            b.extend_from_slice(b"x\r\n--XyZ--");
            assert_eq!(parse(&b, 3), Err(MultipartError::Header), "{headers:?}");
        }
        // Random bytes in many shapes never panic.
        let mut seed = 7u64;
        for len in 0..400 {
            let mut b = b"--XyZ\r\n".to_vec();
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                b.push(b"-\r\nXyZ:=\"; a"[(seed >> 33) as usize % 12]);
            }
            let _ = parse(&b, 1 + len % 5);
        }
    }
}
