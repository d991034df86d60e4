//! How deeply a policy or schema file nests, measured before its text reaches Cedar.
//!
//! Cedar parses, validates, evaluates and even drops a policy recursively, and it does not bound
//! how deep it goes: 144 nested brackets (114 in the test profile), or 1,185 `else if`s,
//! overflow a 2 MiB stack while Cedar converts the policy to its syntax tree, and a chain of
//! 32,575 `+ 1` (130 KB, well within
//! [`MAX_POLICY_FILE_BYTES`](crate::limits::MAX_POLICY_FILE_BYTES)) overflows it when the parsed
//! policy is dropped. A stack overflow aborts the whole process, so ICE measures the text first,
//! with a scanner that only knows Cedar's lexical structure, and refuses a file that goes deeper
//! than the limits in [`crate::limits`], naming the place where it crosses them.
//!
//! Two measures, each an upper bound on what Cedar will do with a text it accepts:
//!
//! - **Nesting** ([`MAX_POLICY_NESTING`]): open brackets `(`, `[`, `{` plus open `if`
//!   expressions (an `if` stays open until the end of its `else` branch). Cedar's conversion to
//!   its syntax tree recurses about ten functions deep for each such level.
//! - **Expression depth** ([`MAX_POLICY_EXPRESSION_DEPTH`]): the depth of the syntax tree Cedar
//!   builds, which its validator, evaluator and destructor recurse over. Every operator,
//!   attribute access (`.a`, `["a"]`), method call, `has`, `like`, `is`, `in`, bracket and `if`
//!   counts along the path it is on. `||` and `&&` chains are counted along their own path
//!   (`a.b == 1 || c.d == 2` is 4 deep: `||`, `==`, `.` and `a`); everything else within one
//!   operand of `&&` is summed, which can only overcount. Cedar also joins a policy's scope and
//!   conditions with `&&` (3 levels, plus one for each `when`/`unless`), and expands
//!   `e has a.b.c` into `e has a && e.a has b && e.a.b has c` (each `.` of such a path counts
//!   twice).
//!
//! Text inside string literals (with backslash escapes) and `//` comments is not code: brackets
//! there do not count. For a text Cedar rejects, the expression depth may be anything (Cedar
//! stops at the syntax error and builds no tree); nesting, which bounds what Cedar's parser
//! builds, only ever closes at a closing bracket.

use crate::limits::{MAX_POLICY_EXPRESSION_DEPTH, MAX_POLICY_NESTING, MAX_SCHEMA_NESTING};

/// A text nested deeper than a limit allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TooDeep {
    /// Byte offset of the token where the limit is crossed.
    pub(crate) offset: usize,
    /// What is wrong, naming the limit.
    pub(crate) message: String,
    /// How to fix it.
    pub(crate) help: String,
}

/// Check a policy file's text against [`MAX_POLICY_NESTING`] and
/// [`MAX_POLICY_EXPRESSION_DEPTH`].
pub(crate) fn check_policy_text(text: &str) -> Result<(), TooDeep> {
    let mut scan = Scan::new(MAX_POLICY_NESTING, Some(MAX_POLICY_EXPRESSION_DEPTH));
    for (tok, offset) in policy_tokens(text) {
        scan.token(tok, offset)?;
    }
    Ok(())
}

/// A policy's tokens. A keyword is an identifier after `.`, `has` or `::` and before `:` or `::`
/// (`context.then`, `e has if`, `{in: 1}`), as Cedar reads it.
fn policy_tokens(text: &str) -> impl Iterator<Item = (Tok, usize)> {
    let mut tokens = Lexer::new(text, false).peekable();
    let mut prev = Tok::Other;
    std::iter::from_fn(move || {
        let (mut tok, offset) = tokens.next()?;
        let keyword = matches!(
            tok,
            Tok::If | Tok::Then | Tok::Else | Tok::Has | Tok::OpWord
        );
        if keyword
            && (matches!(prev, Tok::Dot | Tok::Has | Tok::PathSep)
                || matches!(tokens.peek(), Some((Tok::Colon | Tok::PathSep, _))))
        {
            tok = Tok::Other;
        }
        prev = tok;
        Some((tok, offset))
    })
}

/// Check a schema file's text (Cedar's schema syntax) against [`MAX_SCHEMA_NESTING`]: brackets
/// `(`, `[`, `{` and the `<` of `Set<...>`.
pub(crate) fn check_schema_text(text: &str) -> Result<(), TooDeep> {
    let mut scan = Scan::new(MAX_SCHEMA_NESTING, None);
    for (tok, offset) in Lexer::new(text, true) {
        let tok = match tok {
            // `if`, `then`, `else`, `;` and operators mean nothing to the nesting of a schema.
            Tok::Open | Tok::Close => tok,
            _ => Tok::Other,
        };
        scan.token(tok, offset)?;
    }
    Ok(())
}

/// A token, as far as depth is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// `(`, `[`, `{` (and `<` in a schema).
    Open,
    /// `[`: opens a bracket and, as an index or a set, adds a level to its operand.
    OpenSquare,
    /// `)`, `]`, `}` (and `>` in a schema).
    Close,
    /// `,`: the end of one element of a list or argument list.
    Comma,
    /// `:`: the end of a record key.
    Colon,
    /// `::`, in a name.
    PathSep,
    /// `;`: the end of a policy.
    Semicolon,
    /// `||`.
    Or,
    /// `&&`.
    And,
    /// `.`.
    Dot,
    /// `has`.
    Has,
    /// Any other operator that makes a node of the tree: `==`, `!=`, `<`, `<=`, `>`, `>=`, `+`,
    /// `-`, `*`, `/`, `%`, `!`.
    Op,
    /// A keyword that makes a node of the tree: `in`, `like`, `is`, `when`, `unless`.
    OpWord,
    /// `if`.
    If,
    /// `then`.
    Then,
    /// `else`.
    Else,
    /// An identifier, literal, `::`, `@` or anything else that adds no level.
    Other,
}

/// Cedar's tokens, without their text: whitespace, `// comments` and the insides of string
/// literals are skipped.
struct Lexer<'a> {
    bytes: &'a [u8],
    at: usize,
    schema: bool,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str, schema: bool) -> Lexer<'a> {
        Lexer {
            bytes: text.as_bytes(),
            at: 0,
            schema,
        }
    }
}

impl Iterator for Lexer<'_> {
    type Item = (Tok, usize);

    fn next(&mut self) -> Option<(Tok, usize)> {
        let b = self.bytes;
        loop {
            let start = self.at;
            let c = *b.get(start)?;
            let next = b.get(start + 1).copied();
            self.at += 1;
            let tok = match c {
                b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => continue,
                b'/' if next == Some(b'/') => {
                    // A comment runs to the end of its line.
                    while self.at < b.len() && b[self.at] != b'\n' && b[self.at] != b'\r' {
                        self.at += 1;
                    }
                    continue;
                }
                b'"' => {
                    // A string literal: a backslash escapes the byte after it (Cedar's escapes
                    // are all ASCII); an unterminated string runs to the end (Cedar rejects it).
                    while self.at < b.len() {
                        match b[self.at] {
                            b'\\' => self.at += 2,
                            b'"' => {
                                self.at += 1;
                                break;
                            }
                            _ => self.at += 1,
                        }
                    }
                    self.at = self.at.min(b.len());
                    Tok::Other
                }
                b'_' | b'a'..=b'z' | b'A'..=b'Z' => {
                    while self.at < b.len()
                        && (b[self.at] == b'_' || b[self.at].is_ascii_alphanumeric())
                    {
                        self.at += 1;
                    }
                    match &b[start..self.at] {
                        b"if" => Tok::If,
                        b"then" => Tok::Then,
                        b"else" => Tok::Else,
                        b"has" => Tok::Has,
                        b"in" | b"like" | b"is" | b"when" | b"unless" => Tok::OpWord,
                        _ => Tok::Other,
                    }
                }
                b'(' | b'{' => Tok::Open,
                b'[' if self.schema => Tok::Open,
                b'[' => Tok::OpenSquare,
                b')' | b']' | b'}' => Tok::Close,
                b'<' if self.schema => Tok::Open,
                b'>' if self.schema => Tok::Close,
                b',' => Tok::Comma,
                b':' if next == Some(b':') => {
                    self.at += 1;
                    Tok::PathSep
                }
                b':' => Tok::Colon,
                b';' => Tok::Semicolon,
                b'|' if next == Some(b'|') => {
                    self.at += 1;
                    Tok::Or
                }
                b'&' if next == Some(b'&') => {
                    self.at += 1;
                    Tok::And
                }
                b'=' | b'!' | b'<' | b'>' if next == Some(b'=') => {
                    self.at += 1;
                    Tok::Op
                }
                b'!' | b'<' | b'>' | b'+' | b'-' | b'*' | b'/' | b'%' => Tok::Op,
                b'.' => Tok::Dot,
                // Digits, `@`, `?`, a lone `=`, `&` or `|`, and bytes Cedar does not accept.
                _ => Tok::Other,
            };
            return Some((tok, start));
        }
    }
}

/// The depth of the expression parts read so far in one element of a frame: `||`-separated
/// parts of `&&`-separated parts of operands and operators.
#[derive(Debug, Clone, Copy, Default)]
struct Part {
    /// `||` so far.
    ors: usize,
    /// The deepest finished `||` operand.
    or_max: usize,
    /// `&&` so far in the current `||` operand.
    ands: usize,
    /// The deepest finished `&&` operand in the current `||` operand.
    and_max: usize,
    /// Operators, accesses and keywords counted so far in the current `&&` operand.
    ops: usize,
    /// The deepest closed bracket or `if` in the current `&&` operand.
    child: usize,
}

impl Part {
    /// The depth of the current `&&` operand, if a bracket still open in it is `inner` deep (0
    /// when none is): its counted tokens above its deepest bracket, or above a leaf.
    fn operand(&self, inner: usize) -> usize {
        self.ops + self.child.max(inner).max(1)
    }

    /// The depth of the current `||` operand: one `&&` per operand over the deepest operand.
    fn or_operand(&self, inner: usize) -> usize {
        self.ands + self.and_max.max(self.operand(inner))
    }

    /// The depth of the whole part: one `||` per operand over the deepest operand.
    fn depth_with(&self, inner: usize) -> usize {
        self.ors + self.or_max.max(self.or_operand(inner))
    }

    fn depth(&self) -> usize {
        self.depth_with(0)
    }

    fn and(&mut self) {
        self.and_max = self.and_max.max(self.operand(0));
        self.ops = 0;
        self.child = 0;
        self.ands += 1;
    }

    fn or(&mut self) {
        self.or_max = self.or_max.max(self.or_operand(0));
        self.ands = 0;
        self.and_max = 0;
        self.ops = 0;
        self.child = 0;
        self.ors += 1;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameKind {
    /// The policy being read (never closed by a bracket).
    Statement,
    /// An open bracket.
    Bracket,
    /// An open `if`, reading its condition (0), its `then` branch (1) or its `else` branch (2).
    If(u8),
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: FrameKind,
    /// The levels the frame adds itself.
    base: usize,
    /// The deepest finished element (between `,`, `:`, `then`, `else`).
    element_max: usize,
    /// The element being read.
    part: Part,
}

impl Frame {
    fn new(kind: FrameKind) -> Frame {
        Frame {
            kind,
            // Cedar's tree for a policy joins its principal, action and resource constraints and
            // its conditions with three `&&`; a bracket or an `if` is one node (a `( )` is none).
            base: if kind == FrameKind::Statement { 3 } else { 1 },
            element_max: 0,
            part: Part::default(),
        }
    }

    fn depth_with(&self, inner: usize) -> usize {
        self.base + self.element_max.max(self.part.depth_with(inner))
    }

    fn next_element(&mut self) {
        self.element_max = self.element_max.max(self.part.depth());
        self.part = Part::default();
    }
}

/// The scanner's state: the open frames, innermost last (the statement is always the first).
struct Scan {
    frames: Vec<Frame>,
    /// Open brackets and `if`s.
    nesting: usize,
    max_nesting: usize,
    /// The expression depth limit; `None` for a schema, which has no expressions.
    max_depth: Option<usize>,
    /// The last token was `has` or continues its attribute path (`has a.b`).
    in_has_path: bool,
}

impl Scan {
    fn new(max_nesting: usize, max_depth: Option<usize>) -> Scan {
        Scan {
            frames: vec![Frame::new(FrameKind::Statement)],
            nesting: 0,
            max_nesting,
            max_depth,
            in_has_path: false,
        }
    }

    fn top(&mut self) -> &mut Frame {
        // The statement frame is never popped.
        let last = self.frames.len() - 1;
        &mut self.frames[last]
    }

    fn open(&mut self, kind: FrameKind, offset: usize) -> Result<(), TooDeep> {
        self.nesting += 1;
        if self.nesting > self.max_nesting {
            let (what, file, help) = if self.max_depth.is_some() {
                (
                    "brackets and if-expressions",
                    "policy",
                    "Cedar parses nested expressions recursively; write the condition flatter, \
                     or split it into several policies",
                )
            } else {
                (
                    "brackets",
                    "schema",
                    "Cedar parses nested types recursively; name a nested record type with \
                     `type` and refer to it",
                )
            };
            return Err(TooDeep {
                offset,
                message: format!(
                    "{what} nest more than {} deep here (the limit for a {file} file)",
                    self.max_nesting
                ),
                help: help.to_string(),
            });
        }
        self.frames.push(Frame::new(kind));
        Ok(())
    }

    /// Close the innermost frame, which is not the statement; its depth becomes an operand of
    /// the frame around it.
    fn close_top(&mut self) {
        if self.frames.len() < 2 {
            return;
        }
        let Some(frame) = self.frames.pop() else {
            return;
        };
        self.nesting -= 1;
        let depth = frame.depth_with(0);
        let part = &mut self.top().part;
        part.child = part.child.max(depth);
    }

    /// Close every `if` that ends here (at a `,`, `:`, `;` or closing bracket).
    fn close_ifs(&mut self) {
        while matches!(self.top().kind, FrameKind::If(_)) {
            self.close_top();
        }
    }

    fn token(&mut self, tok: Tok, offset: usize) -> Result<(), TooDeep> {
        let in_has_path = std::mem::replace(&mut self.in_has_path, false);
        match tok {
            Tok::Open => self.open(FrameKind::Bracket, offset)?,
            Tok::OpenSquare => {
                // An index `x["a"]` is an access on `x`; a set literal `[...]` is counted once
                // more than it needs.
                self.top().part.ops += 1;
                self.open(FrameKind::Bracket, offset)?;
            }
            Tok::Close => {
                self.close_ifs();
                self.close_top();
            }
            Tok::Comma | Tok::Colon => {
                self.close_ifs();
                self.top().next_element();
            }
            Tok::Semicolon => {
                // A policy ends here; the next one is measured afresh. A `;` inside brackets is
                // a syntax error, so Cedar builds no tree for the file at all: the brackets
                // still count as nesting, but one unclosed bracket must not make every later
                // policy look deep (Cedar reports the real error).
                self.close_ifs();
                for frame in &mut self.frames {
                    frame.element_max = 0;
                    frame.part = Part::default();
                }
            }
            Tok::Or => self.top().part.or(),
            Tok::And => self.top().part.and(),
            Tok::Dot => {
                self.top().part.ops += if in_has_path { 2 } else { 1 };
                self.in_has_path = in_has_path;
            }
            Tok::Has => {
                self.top().part.ops += 1;
                self.in_has_path = true;
            }
            Tok::Op | Tok::OpWord => self.top().part.ops += 1,
            Tok::If => self.open(FrameKind::If(0), offset)?,
            Tok::Then | Tok::Else => self.branch(tok),
            Tok::Other | Tok::PathSep => self.in_has_path = in_has_path,
        }
        if let Some(max) = self.max_depth {
            let depth = self
                .frames
                .iter()
                .rev()
                .fold(0, |inner, frame| frame.depth_with(inner));
            if depth > max {
                return Err(TooDeep {
                    offset,
                    message: format!(
                        "this expression is more than {max} levels deep here (the limit for a \
                         policy; every operator, attribute access, bracket and if-expression \
                         counts along its deepest path, `&&` and `||` once per operand)"
                    ),
                    help: "split the condition into several policies, or test membership with \
                           a set (`[\"a\", \"b\"].contains(x)`) instead of a long chain of `||`"
                        .to_string(),
                });
            }
        }
        Ok(())
    }

    /// `then` or `else`: the next branch of the innermost `if` still open, closing any `if` whose
    /// `else` branch it ends.
    fn branch(&mut self, tok: Tok) {
        loop {
            let frame = self.top();
            match (frame.kind, tok) {
                (FrameKind::If(0), Tok::Then) | (FrameKind::If(0 | 1), Tok::Else) => {
                    frame.kind = FrameKind::If(if tok == Tok::Then { 1 } else { 2 });
                    frame.next_element();
                    return;
                }
                // The `else` branch of this `if` ends here: the token belongs to an outer one.
                (FrameKind::If(2), _) => self.close_top(),
                // A stray `then` or `else` (Cedar rejects it).
                _ => {
                    frame.next_element();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nesting(text: &str) -> usize {
        let mut scan = Scan::new(usize::MAX, None);
        let mut max = 0;
        for (tok, offset) in policy_tokens(text) {
            scan.token(tok, offset).expect("no limit");
            max = max.max(scan.nesting);
        }
        max
    }

    fn depth(expr: &str) -> usize {
        let mut scan = Scan::new(usize::MAX, Some(usize::MAX));
        for (tok, offset) in policy_tokens(expr) {
            scan.token(tok, offset).expect("no limit");
        }
        scan.close_ifs();
        // Without the statement frame's three levels.
        scan.frames[0].depth_with(0) - 3
    }

    #[test]
    fn strings_and_comments_hide_brackets() {
        assert_eq!(nesting(r#"( "(((" )"#), 1);
        assert_eq!(nesting(r#"( "\"(((" [ )"#), 2);
        assert_eq!(nesting(r#"( "\\" [ )"#), 2);
        assert_eq!(nesting("( // (((\n [ )"), 2);
        assert_eq!(nesting("( // (((\r[ )"), 2);
        assert_eq!(nesting(r#"( "unterminated ((("#), 1);
        assert_eq!(nesting("a / b ((( c"), 3);
    }

    #[test]
    fn an_if_is_open_until_its_else_branch_ends() {
        assert_eq!(nesting("if a then b else c"), 1);
        assert_eq!(nesting("if a then b else if c then d else e"), 2);
        assert_eq!(nesting("[if a then b else c, if d then e else f]"), 2);
        assert_eq!(nesting("if if a then b else c then d else e"), 2);
        assert_eq!(nesting("(if a then b else c) && (if a then b else c)"), 2);
        assert_eq!(nesting("{if: 1}.if"), 1);
        assert_eq!(nesting("x.if has if && {then: 1, else: 2}.then == 1"), 1);
    }

    #[test]
    fn chains_count_along_their_path() {
        assert_eq!(depth("a"), 1);
        assert_eq!(depth("a.b.c"), 3);
        assert_eq!(depth("a == 1 || b == 2 || c == 3"), 4);
        assert_eq!(depth("a.b == 1 && c.d.e == 2"), 5);
        assert_eq!(depth("1 + 1 + 1 + 1"), 4);
        assert_eq!(depth("(1 + 1) + (1 + 1)"), 4);
        assert_eq!(depth("e has a.b.c"), 6);
        assert_eq!(depth("[[1], [2, 3]]"), 5);
        assert_eq!(depth("if a then b.c.d else e"), 4);
        assert_eq!(depth("x[\"a\"][\"b\"]"), 4);
        // Keywords as attribute names and record keys are names.
        assert_eq!(depth("x.then.else.if + {in: 1}.in"), 7);
    }

    #[test]
    fn each_policy_is_measured_afresh() {
        let policy = "permit(principal, action, resource) when { 1 + 1 + 1 > 0 };\n";
        assert!(check_policy_text(&policy.repeat(1_000)).is_ok());
        // An unclosed bracket is a syntax error for Cedar to report, not depth.
        let broken = "permit(principal, action, resource when { true };\n";
        assert!(check_policy_text(&format!("{broken}{}", policy.repeat(1_000))).is_ok());
    }

    #[test]
    fn schemas_count_angle_brackets() {
        let deep = format!(
            "entity A = {{ a: {}String{} }};",
            "Set<".repeat(40),
            ">".repeat(40)
        );
        let err = check_schema_text(&deep).expect_err("too deep");
        // `{` is the first level, so the 32nd `<` is the 33rd.
        assert_eq!(err.offset, deep.find("Set<").unwrap() + 3 + 4 * 31);
        assert!(check_schema_text("entity A = { a: Set<String>, b: { c: Long } };").is_ok());
    }
}
