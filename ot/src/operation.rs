//! Operations on plain text: `retain n`, `insert "s"`, `delete n` in Unicode scalar values,
//! kept in canonical form (no empty components, neighbours of one kind merged, an insert before
//! a delete at the same place), with apply, compose, transform, invert and the wire form.

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest document (and the largest count in one component) an operation may span or
/// produce, in characters: lengths then fit every platform's `usize`, `wasm32`'s included,
/// with room to add two of them.
pub const MAX_LEN: usize = i32::MAX as usize;

/// One step of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Component {
    /// Keep the next `n` characters.
    Retain(usize),
    /// Insert this text here.
    Insert(String),
    /// Remove the next `n` characters.
    Delete(usize),
}

/// Why an operation cannot be applied, composed, transformed or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// `apply` or `invert` on a document whose length is not the operation's base length.
    #[error("the operation spans {expected} characters but the document has {actual}")]
    LengthMismatch { expected: usize, actual: usize },
    /// `transform` of operations over documents of different lengths.
    #[error("concurrent operations must span the same document: {left} and {right} characters")]
    TransformMismatch { left: usize, right: usize },
    /// `compose` where the second operation does not span the first one's result.
    #[error(
        "cannot compose: the first operation yields {first} characters, the second spans {second}"
    )]
    ComposeMismatch { first: usize, second: usize },
    /// Lengths beyond [`MAX_LEN`].
    #[error("the operation spans or produces more than {MAX_LEN} characters")]
    TooLong,
}

/// A plain-text operation. Build one with [`Operation::retain`], [`Operation::insert`] and
/// [`Operation::delete`] (which keep it canonical), or read it from its JSON wire form.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Operation {
    components: Vec<Component>,
    base_len: usize,
    target_len: usize,
}

/// A component borrowed, with the character count of an insert.
#[derive(Clone, Copy)]
enum Piece<'a> {
    Retain(usize),
    Insert(&'a str, usize),
    Delete(usize),
}

impl<'a> Piece<'a> {
    fn of(c: &'a Component) -> Piece<'a> {
        match c {
            Component::Retain(n) => Piece::Retain(*n),
            Component::Insert(s) => Piece::Insert(s, s.chars().count()),
            Component::Delete(n) => Piece::Delete(*n),
        }
    }
}

/// The byte offset of the character `n` characters after byte offset `from` of `s`, or `None`
/// when `s` has fewer characters left.
fn advance(s: &str, from: usize, n: usize) -> Option<usize> {
    let rest = s.get(from..)?;
    let mut count = 0;
    for (i, _) in rest.char_indices() {
        if count == n {
            return Some(from + i);
        }
        count += 1;
    }
    (count == n).then_some(s.len())
}

/// `s` split after its first `n` characters (`n` must not exceed its length).
fn split_chars(s: &str, n: usize) -> (&str, &str) {
    let at = advance(s, 0, n).unwrap_or(s.len());
    s.split_at(at)
}

impl Operation {
    /// The empty operation (spans the empty document).
    pub fn new() -> Operation {
        Operation::default()
    }

    /// The components, canonical.
    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// The length, in characters, of the document this operation applies to.
    pub fn base_len(&self) -> usize {
        self.base_len
    }

    /// The length, in characters, of the document it produces.
    pub fn target_len(&self) -> usize {
        self.target_len
    }

    /// Characters this operation inserts.
    pub fn inserted_len(&self) -> usize {
        self.components
            .iter()
            .map(|c| match c {
                Component::Insert(s) => s.chars().count(),
                _ => 0,
            })
            .sum()
    }

    /// Whether applying it changes nothing (only retains, or nothing).
    pub fn is_noop(&self) -> bool {
        self.components
            .iter()
            .all(|c| matches!(c, Component::Retain(_)))
    }

    /// Appends `retain n`.
    pub fn retain(&mut self, n: usize) -> &mut Operation {
        if n == 0 {
            return self;
        }
        self.base_len += n;
        self.target_len += n;
        if let Some(Component::Retain(last)) = self.components.last_mut() {
            *last += n;
        } else {
            self.components.push(Component::Retain(n));
        }
        self
    }

    /// Appends `insert s`. An insert right after a delete goes before it (same result, one
    /// canonical form).
    pub fn insert(&mut self, s: &str) -> &mut Operation {
        if s.is_empty() {
            return self;
        }
        self.target_len += s.chars().count();
        let len = self.components.len();
        match self.components.as_mut_slice() {
            [.., Component::Insert(last)] => last.push_str(s),
            [.., Component::Insert(before), Component::Delete(_)] => before.push_str(s),
            [.., Component::Delete(_)] => self
                .components
                .insert(len - 1, Component::Insert(s.to_owned())),
            _ => self.components.push(Component::Insert(s.to_owned())),
        }
        self
    }

    /// Appends `delete n`.
    pub fn delete(&mut self, n: usize) -> &mut Operation {
        if n == 0 {
            return self;
        }
        self.base_len += n;
        if let Some(Component::Delete(last)) = self.components.last_mut() {
            *last += n;
        } else {
            self.components.push(Component::Delete(n));
        }
        self
    }

    /// Applies the operation to `doc`, which must have exactly [`base_len`](Self::base_len)
    /// characters.
    pub fn apply(&self, doc: &str) -> Result<String, OpError> {
        let mismatch = || OpError::LengthMismatch {
            expected: self.base_len,
            actual: doc.chars().count(),
        };
        let mut out =
            String::with_capacity(doc.len() + self.target_len.saturating_sub(self.base_len));
        let mut at = 0;
        for c in &self.components {
            match c {
                Component::Retain(n) => {
                    let end = advance(doc, at, *n).ok_or_else(mismatch)?;
                    out.push_str(&doc[at..end]);
                    at = end;
                }
                Component::Insert(s) => out.push_str(s),
                Component::Delete(n) => at = advance(doc, at, *n).ok_or_else(mismatch)?,
            }
        }
        if at != doc.len() {
            return Err(mismatch());
        }
        Ok(out)
    }

    /// The operation that undoes this one, given the document it applies to:
    /// `self.invert(d)?.apply(&self.apply(d)?)? == d`.
    pub fn invert(&self, doc: &str) -> Result<Operation, OpError> {
        let mismatch = || OpError::LengthMismatch {
            expected: self.base_len,
            actual: doc.chars().count(),
        };
        let mut inverse = Operation::new();
        let mut at = 0;
        for c in &self.components {
            match c {
                Component::Retain(n) => {
                    inverse.retain(*n);
                    at = advance(doc, at, *n).ok_or_else(mismatch)?;
                }
                Component::Insert(s) => {
                    inverse.delete(s.chars().count());
                }
                Component::Delete(n) => {
                    let end = advance(doc, at, *n).ok_or_else(mismatch)?;
                    inverse.insert(&doc[at..end]);
                    at = end;
                }
            }
        }
        if at != doc.len() {
            return Err(mismatch());
        }
        Ok(inverse)
    }

    /// One operation with the effect of `self` then `next`:
    /// `compose(a, b).apply(d) == b.apply(a.apply(d))`.
    pub fn compose(&self, next: &Operation) -> Result<Operation, OpError> {
        if self.target_len != next.base_len {
            return Err(OpError::ComposeMismatch {
                first: self.target_len,
                second: next.base_len,
            });
        }
        let mismatch = || OpError::ComposeMismatch {
            first: self.target_len,
            second: next.base_len,
        };
        let mut out = Operation::new();
        let mut i1 = self.components.iter().map(Piece::of);
        let mut i2 = next.components.iter().map(Piece::of);
        let mut p1 = i1.next();
        let mut p2 = i2.next();
        loop {
            match (p1, p2) {
                (None, None) => break,
                (Some(Piece::Delete(n)), _) => {
                    out.delete(n);
                    p1 = i1.next();
                }
                (_, Some(Piece::Insert(s, _))) => {
                    out.insert(s);
                    p2 = i2.next();
                }
                (None, _) | (_, None) => return Err(mismatch()),
                (Some(Piece::Retain(a)), Some(Piece::Retain(b))) => {
                    let m = a.min(b);
                    out.retain(m);
                    p1 = if a > m {
                        Some(Piece::Retain(a - m))
                    } else {
                        i1.next()
                    };
                    p2 = if b > m {
                        Some(Piece::Retain(b - m))
                    } else {
                        i2.next()
                    };
                }
                (Some(Piece::Insert(s, k)), Some(Piece::Delete(n))) => {
                    let m = k.min(n);
                    p1 = if k > m {
                        let (_, rest) = split_chars(s, m);
                        Some(Piece::Insert(rest, k - m))
                    } else {
                        i1.next()
                    };
                    p2 = if n > m {
                        Some(Piece::Delete(n - m))
                    } else {
                        i2.next()
                    };
                }
                (Some(Piece::Insert(s, k)), Some(Piece::Retain(n))) => {
                    let m = k.min(n);
                    let (head, rest) = split_chars(s, m);
                    out.insert(head);
                    p1 = if k > m {
                        Some(Piece::Insert(rest, k - m))
                    } else {
                        i1.next()
                    };
                    p2 = if n > m {
                        Some(Piece::Retain(n - m))
                    } else {
                        i2.next()
                    };
                }
                (Some(Piece::Retain(a)), Some(Piece::Delete(b))) => {
                    let m = a.min(b);
                    out.delete(m);
                    p1 = if a > m {
                        Some(Piece::Retain(a - m))
                    } else {
                        i1.next()
                    };
                    p2 = if b > m {
                        Some(Piece::Delete(b - m))
                    } else {
                        i2.next()
                    };
                }
            }
        }
        Ok(out)
    }

    /// Transforms two concurrent operations over the same document into `(a', b')` such that
    /// `b'.apply(a.apply(d)) == a'.apply(b.apply(d))` (TP1). When both insert at the same
    /// place, `a`'s text comes first.
    pub fn transform(a: &Operation, b: &Operation) -> Result<(Operation, Operation), OpError> {
        if a.base_len != b.base_len {
            return Err(OpError::TransformMismatch {
                left: a.base_len,
                right: b.base_len,
            });
        }
        let mismatch = || OpError::TransformMismatch {
            left: a.base_len,
            right: b.base_len,
        };
        let mut a2 = Operation::new();
        let mut b2 = Operation::new();
        let mut i1 = a.components.iter().map(Piece::of);
        let mut i2 = b.components.iter().map(Piece::of);
        let mut p1 = i1.next();
        let mut p2 = i2.next();
        loop {
            match (p1, p2) {
                (None, None) => break,
                (Some(Piece::Insert(s, k)), _) => {
                    a2.insert(s);
                    b2.retain(k);
                    p1 = i1.next();
                }
                (_, Some(Piece::Insert(s, k))) => {
                    a2.retain(k);
                    b2.insert(s);
                    p2 = i2.next();
                }
                (None, _) | (_, None) => return Err(mismatch()),
                (Some(x), Some(y)) => {
                    let (n1, n2) = (piece_len(x), piece_len(y));
                    let m = n1.min(n2);
                    match (x, y) {
                        (Piece::Retain(_), Piece::Retain(_)) => {
                            a2.retain(m);
                            b2.retain(m);
                        }
                        (Piece::Delete(_), Piece::Retain(_)) => {
                            a2.delete(m);
                        }
                        (Piece::Retain(_), Piece::Delete(_)) => {
                            b2.delete(m);
                        }
                        // Both deleted the same characters: nothing left to do for either.
                        _ => {}
                    }
                    p1 = if n1 > m {
                        Some(shorten(x, n1 - m))
                    } else {
                        i1.next()
                    };
                    p2 = if n2 > m {
                        Some(shorten(y, n2 - m))
                    } else {
                        i2.next()
                    };
                }
            }
        }
        Ok((a2, b2))
    }

    /// Where a position (a character index into the document this operation applies to, such
    /// as a cursor) ends up after it. A position where text is inserted moves after the text.
    pub fn transform_index(&self, index: usize) -> usize {
        let mut remaining = index;
        let mut new_index = index;
        for c in &self.components {
            match c {
                Component::Retain(n) => {
                    if *n > remaining {
                        break;
                    }
                    remaining -= n;
                }
                Component::Insert(s) => new_index += s.chars().count(),
                Component::Delete(n) => {
                    let m = (*n).min(remaining);
                    new_index -= m;
                    if *n > remaining {
                        break;
                    }
                    remaining -= n;
                }
            }
        }
        new_index
    }
}

fn piece_len(p: Piece<'_>) -> usize {
    match p {
        Piece::Retain(n) | Piece::Delete(n) | Piece::Insert(_, n) => n,
    }
}

/// A retain or delete piece with `n` characters left.
fn shorten(p: Piece<'_>, n: usize) -> Piece<'_> {
    match p {
        Piece::Retain(_) => Piece::Retain(n),
        Piece::Delete(_) => Piece::Delete(n),
        Piece::Insert(..) => unreachable!("inserts are consumed whole by transform"),
    }
}

impl Serialize for Operation {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.components.len()))?;
        for c in &self.components {
            match c {
                Component::Retain(n) => seq.serialize_element(&(*n as u64))?,
                Component::Insert(s) => seq.serialize_element(s)?,
                Component::Delete(n) => seq.serialize_element(&-(*n as i64))?,
            }
        }
        seq.end()
    }
}

/// One wire component: a non-zero integer or a non-empty string.
enum Wire {
    Retain(usize),
    Insert(String),
    Delete(usize),
}

impl<'de> Deserialize<'de> for Wire {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Wire, D::Error> {
        struct WireVisitor;
        impl Visitor<'_> for WireVisitor {
            type Value = Wire;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a component: a positive integer (retain), a string (insert) or a negative integer (delete)",
                )
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Wire, E> {
                match v {
                    0 => Err(E::custom(
                        "a component of 0 is neither a retain nor a delete",
                    )),
                    v if v > MAX_LEN as u64 => Err(E::custom(format!(
                        "a count of {v} exceeds {MAX_LEN} characters"
                    ))),
                    v => Ok(Wire::Retain(v as usize)),
                }
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Wire, E> {
                if v >= 0 {
                    return self.visit_u64(v as u64);
                }
                let n = v.unsigned_abs();
                if n > MAX_LEN as u64 {
                    return Err(E::custom(format!(
                        "a count of {v} exceeds {MAX_LEN} characters"
                    )));
                }
                Ok(Wire::Delete(n as usize))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Wire, E> {
                if v.is_empty() {
                    return Err(E::custom("an insert must not be empty"));
                }
                Ok(Wire::Insert(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Wire, E> {
                if v.is_empty() {
                    return Err(E::custom("an insert must not be empty"));
                }
                Ok(Wire::Insert(v))
            }
        }
        deserializer.deserialize_any(WireVisitor)
    }
}

impl<'de> Deserialize<'de> for Operation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Operation, D::Error> {
        struct OpVisitor;
        impl<'de> Visitor<'de> for OpVisitor {
            type Value = Operation;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an operation: an array of retains (n > 0), inserts (\"text\") and deletes (-n)")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Operation, A::Error> {
                let mut op = Operation::new();
                while let Some(wire) = seq.next_element::<Wire>()? {
                    let (base, target) = match &wire {
                        Wire::Retain(n) => (*n, *n),
                        Wire::Insert(s) => (0, s.chars().count()),
                        Wire::Delete(n) => (*n, 0),
                    };
                    if op.base_len + base > MAX_LEN || op.target_len + target > MAX_LEN {
                        return Err(de::Error::custom(OpError::TooLong));
                    }
                    match wire {
                        Wire::Retain(n) => op.retain(n),
                        Wire::Insert(s) => op.insert(&s),
                        Wire::Delete(n) => op.delete(n),
                    };
                }
                Ok(op)
            }
        }
        deserializer.deserialize_seq(OpVisitor)
    }
}

impl fmt::Display for Operation {
    /// The wire form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(self) {
            Ok(text) => f.write_str(&text),
            Err(_) => Err(fmt::Error),
        }
    }
}

impl FromIterator<Component> for Operation {
    fn from_iter<I: IntoIterator<Item = Component>>(iter: I) -> Operation {
        let mut op = Operation::new();
        for c in iter {
            match c {
                Component::Retain(n) => op.retain(n),
                Component::Insert(s) => op.insert(&s),
                Component::Delete(n) => op.delete(n),
            };
        }
        op
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(json: &str) -> Operation {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn builder_keeps_canonical_form() {
        let mut o = Operation::new();
        o.retain(2)
            .retain(1)
            .delete(1)
            .insert("a")
            .insert("b")
            .delete(2)
            .insert("c");
        assert_eq!(o.to_string(), r#"[3,"abc",-3]"#);
        assert_eq!((o.base_len(), o.target_len()), (6, 6));
    }

    #[test]
    fn counts_unicode_scalar_values() {
        // 'e' + combining acute is two scalar values; the emoji is one (two UTF-16 units).
        let doc = "e\u{301}🙂中";
        let o = op(r#"[2, "x", -1, 1]"#);
        assert_eq!(o.apply(doc).unwrap(), "e\u{301}x中");
        assert_eq!(
            op("[3]").apply(doc),
            Err(OpError::LengthMismatch {
                expected: 3,
                actual: 4
            })
        );
    }

    #[test]
    fn wire_form_refuses_malformed_components() {
        for bad in [
            "[0]",
            r#"[""]"#,
            "[1.5]",
            "[true]",
            "[null]",
            "{}",
            "[[1]]",
            "[4294967296]",
            "[-4294967296]",
            "[2147483647, 1]",
        ] {
            assert!(serde_json::from_str::<Operation>(bad).is_err(), "{bad}");
        }
        assert_eq!(op(r#"[1, 2, -1, "a"]"#).to_string(), r#"[3,"a",-1]"#);
    }

    #[test]
    fn transform_index_moves_with_edits() {
        let o = op(r#"[2, "abc", -2, 3]"#);
        assert_eq!(o.transform_index(0), 0);
        assert_eq!(o.transform_index(2), 5);
        assert_eq!(o.transform_index(3), 5);
        assert_eq!(o.transform_index(4), 5);
        assert_eq!(o.transform_index(5), 6);
        assert_eq!(o.transform_index(7), 8);
    }
}
