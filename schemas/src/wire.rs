//! The compact binary encoding of capability calls over NATS.
//!
//! Key-value and messaging requests and replies travel as a version byte followed by their
//! fields, with no field names and no text encoding of binary data:
//!
//! | item | encoding |
//! |---|---|
//! | `u8` | one byte |
//! | `u64`, `u32`, lengths, counts | unsigned LEB128 (1 to 10 bytes) |
//! | `bool` | one byte, `0` or `1` |
//! | string | length, then that many bytes of UTF-8 |
//! | bytes | length, then the raw bytes (a value is carried as it is, never base64) |
//! | `Option<T>` | `0`, or `1` then `T` |
//! | list of `T` | count, then each `T` |
//!
//! Decoding never trusts a length or a count: each is checked against the bytes that remain
//! before anything is allocated, so a hostile message cannot make the decoder reserve memory it
//! does not carry. Byte fields are slices of the received buffer (no copy).

use bytes::{BufMut as _, Bytes, BytesMut};

/// The first byte of every encoded message: the version of this layout.
pub(crate) const VERSION: u8 = 1;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed binary message at byte {offset}: {problem}")]
pub struct WireError {
    /// Where decoding stopped.
    pub offset: usize,
    /// What was wrong there.
    pub problem: String,
}

/// Builds one message.
#[derive(Debug)]
pub(crate) struct Writer {
    buf: BytesMut,
}

impl Writer {
    /// A message of this layout's version, with room for `capacity` bytes.
    pub(crate) fn new(capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(capacity + 1);
        buf.put_u8(VERSION);
        Self { buf }
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.put_u8(v);
        self
    }

    pub(crate) fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    pub(crate) fn u64(&mut self, mut v: u64) -> &mut Self {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.put_u8(byte);
                return self;
            }
            self.buf.put_u8(byte | 0x80);
        }
    }

    pub(crate) fn len(&mut self, n: usize) -> &mut Self {
        self.u64(n as u64)
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.len(v.len());
        self.buf.put_slice(v);
        self
    }

    pub(crate) fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    pub(crate) fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v);
                self
            }
        }
    }

    pub(crate) fn list<T>(
        &mut self,
        items: impl ExactSizeIterator<Item = T>,
        mut f: impl FnMut(&mut Self, T),
    ) -> &mut Self {
        self.len(items.len());
        for item in items {
            f(self, item);
        }
        self
    }

    pub(crate) fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

/// Reads one message.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    /// Checks the version byte and positions after it.
    pub(crate) fn new(buf: Bytes) -> Result<Self, WireError> {
        let mut reader = Self { buf, pos: 0 };
        let version = reader.u8()?;
        if version != VERSION {
            return Err(reader.error(format!(
                "layout version {version}; this build reads version {VERSION}"
            )));
        }
        Ok(reader)
    }

    fn error(&self, problem: impl Into<String>) -> WireError {
        WireError {
            offset: self.pos,
            problem: problem.into(),
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        let Some(&b) = self.buf.get(self.pos) else {
            return Err(self.error("the message ends early"));
        };
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.error(format!("{other} is not a boolean"))),
        }
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(self.error("integer overflows 64 bits"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error("integer longer than 10 bytes"))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        let v = self.u64()?;
        u32::try_from(v).map_err(|_| self.error(format!("{v} does not fit 32 bits")))
    }

    /// A length or count, at most what remains (every item takes at least one byte).
    pub(crate) fn len(&mut self) -> Result<usize, WireError> {
        let n = self.u64()?;
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err(self.error(format!(
                "length {n} exceeds the {} bytes left",
                self.remaining()
            ))),
        }
    }

    pub(crate) fn bytes(&mut self) -> Result<Bytes, WireError> {
        let n = self.len()?;
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn string(&mut self) -> Result<String, WireError> {
        let start = self.pos;
        let raw = self.bytes()?;
        String::from_utf8(raw.to_vec()).map_err(|_| WireError {
            offset: start,
            problem: "string is not UTF-8".to_owned(),
        })
    }

    pub(crate) fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<Option<T>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            other => Err(self.error(format!("{other} is not an option tag"))),
        }
    }

    pub(crate) fn list<T>(
        &mut self,
        mut f: impl FnMut(&mut Self) -> Result<T, WireError>,
    ) -> Result<Vec<T>, WireError> {
        let n = self.len()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(f(self)?);
        }
        Ok(out)
    }

    /// Fails unless every byte was read.
    pub(crate) fn end(self) -> Result<(), WireError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(self.error(format!("{} bytes left over", self.remaining())))
        }
    }

    /// An error for an unknown tag.
    pub(crate) fn unknown(&self, what: &str, tag: u8) -> WireError {
        WireError {
            offset: self.pos.saturating_sub(1),
            problem: format!("unknown {what} {tag}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn integers_round_trip(v in any::<u64>()) {
            let mut w = Writer::new(10);
            w.u64(v);
            let mut r = Reader::new(w.finish()).expect("version");
            prop_assert_eq!(r.u64().expect("decodes"), v);
            r.end().expect("nothing left");
        }

        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(mut r) = Reader::new(Bytes::from(raw)) {
                let _ = r.list(|r| r.opt(Reader::string));
            }
        }
    }

    #[test]
    fn lengths_beyond_the_message_are_refused_before_allocating() {
        let mut w = Writer::new(16);
        w.u64(u64::MAX);
        let mut r = Reader::new(w.finish()).expect("version");
        let e = r.list(Reader::u8).expect_err("count too large");
        assert!(e.problem.contains("exceeds"), "{e}");
    }

    #[test]
    fn other_versions_are_refused() {
        let e = Reader::new(Bytes::from_static(&[2, 0])).expect_err("version 2");
        assert!(e.problem.contains("version 2"), "{e}");
        assert!(Reader::new(Bytes::new()).is_err());
    }

    #[test]
    fn overlong_integers_are_refused() {
        let mut raw = vec![VERSION];
        raw.extend([0xff; 10]);
        raw.push(0x01);
        let mut r = Reader::new(Bytes::from(raw)).expect("version");
        assert!(r.u64().is_err());
    }
}
