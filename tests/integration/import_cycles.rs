//! No import cycles between the modules of any crate of the workspace.
//!
//! A module is a file under a crate's `src` (`foo.rs` and `foo/mod.rs` are module
//! `foo`, `foo/bar.rs` is `foo::bar`). Module `a` imports from module `b`
//! when `a`'s file names `b` in a path: `use crate::b::…`, `use super::…`,
//! `use self::…`, a path to a child module (`use bar::…` in `foo/mod.rs`),
//! or such a path written inline (`crate::b::f(…)`). A path resolves to the
//! deepest module it names, so `crate::winclip::engine::WinClip` is an
//! import from `winclip::engine` and `crate::winclip::WinClip` one from
//! `winclip` (whose `mod.rs` re-exports it, and so imports from
//! `winclip::engine` in turn).
//!
//! Left out: comments (doc links are not imports), `#[cfg(test)]` items and
//! modules (tests may reach anywhere), and the crate root `lib.rs`, which
//! declares every module and holds the shared [`Error`] that lists the
//! modules' errors by design.
//!
//! The strongly connected components of the graph with more than one module
//! are its cycles; the test fails listing each, with the imports that close
//! it and where they are written.
//!
//! [`Error`]: flawscope_core::Error

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Cycles tolerated for now, each as the sorted modules of one strongly
/// connected component. A cycle must match an entry exactly: one that grows
/// fails, and an entry that no longer matches fails too (delete it).
const ALLOWED_CYCLES_BEING_REMOVED: &[&[&str]] = &[
    // CLIP: `clip/mod.rs` holds `ClipModel` and re-exports the towers, while
    // `text.rs` and `vision.rs` add its encode methods (`impl ClipModel`)
    // next to their tower, as candle-transformers lays out its checkpoints.
    &["clip", "clip::text", "clip::vision"],
];

/// A module's path below the crate root, e.g. `["winclip", "engine"]`.
type Module = Vec<String>;

/// Where an import is written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Site {
    file: String,
    line: usize,
}

/// Module → the modules it imports from → where it first does.
type Graph = BTreeMap<String, BTreeMap<String, Site>>;

/// Each crate's source folder, with the least number of imports its parse
/// must find (so a parser that silently finds nothing fails).
const CRATES: &[(&str, usize)] = &[
    ("core/src", 50),
    ("server/src", 15),
    ("results/src", 2),
    ("tui/src", 2),
    ("models/src", 3),
    ("prompts/src", 0),
    ("src", 5),
];

#[test]
fn no_crate_has_import_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut report = String::new();
    let mut allowed_seen = BTreeSet::new();
    for (dir, least) in CRATES {
        let src = root.join(dir);
        let mut files = Vec::new();
        collect_rs_files(&src, &mut files);
        assert!(!files.is_empty(), "found no files under {}", src.display());
        let sources: Vec<SourceFile> = files
            .iter()
            .map(|path| {
                let rel = path.strip_prefix(&src).expect("under src");
                SourceFile {
                    module: module_of(rel),
                    name: format!("{dir}/{}", rel.display()),
                    text: std::fs::read_to_string(path)
                        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display())),
                }
            })
            .collect();
        let graph = import_graph(&sources);
        assert!(
            graph.values().map(BTreeMap::len).sum::<usize>() >= *least,
            "suspiciously few imports found under {dir}: {graph:?}"
        );
        for cycle in cycles(&graph) {
            let names: Vec<&str> = cycle.iter().map(String::as_str).collect();
            if let Some(entry) = ALLOWED_CYCLES_BEING_REMOVED.iter().find(|a| **a == names) {
                allowed_seen.insert(entry.join(" ↔ "));
                continue;
            }
            report.push_str(&format!("in {dir}: "));
            report.push_str(&describe(&graph, &cycle));
        }
    }
    let stale: Vec<String> = ALLOWED_CYCLES_BEING_REMOVED
        .iter()
        .map(|a| a.join(" ↔ "))
        .filter(|a| !allowed_seen.contains(a))
        .collect();
    assert!(
        report.is_empty(),
        "import cycles between modules (module = file under a crate's src):\n{report}"
    );
    assert!(
        stale.is_empty(),
        "these allowed cycles are gone: delete them from ALLOWED_CYCLES_BEING_REMOVED: {stale:?}"
    );
}

/// The cycle finder finds every cycle of a small hand-made graph, and only
/// those.
#[test]
fn cycle_finder_reports_every_cycle_of_a_hand_made_graph() {
    let site = Site {
        file: "x.rs".into(),
        line: 1,
    };
    let mut graph = Graph::new();
    for (from, to) in [
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
        ("c", "d"),
        ("d", "e"),
        ("e", "d"),
        ("e", "f"),
        ("g", "a"),
    ] {
        graph
            .entry(from.into())
            .or_default()
            .insert(to.into(), site.clone());
    }
    let found = cycles(&graph);
    let expected: Vec<Vec<String>> = vec![
        vec!["a".into(), "b".into(), "c".into()],
        vec!["d".into(), "e".into()],
    ];
    assert_eq!(found, expected);
    let text = describe(&graph, &found[0]);
    assert!(text.contains("a -> b") && text.contains("c -> a"), "{text}");

    graph.get_mut("c").expect("c").remove("a");
    assert_eq!(cycles(&graph), vec![vec!["d".to_owned(), "e".to_owned()]]);
}

/// From source text to cycles: `super::`, groups, `self`, child modules,
/// inline paths, comments and test modules are read as described above.
#[test]
fn import_graph_of_hand_made_sources() {
    let file = |module: &[&str], text: &str| SourceFile {
        module: module.iter().map(|s| s.to_string()).collect(),
        name: format!("{}.rs", module.join("/")),
        text: text.to_owned(),
    };
    let sources = [
        file(&[], "pub mod a; pub mod b; pub mod w; pub enum Error {}"),
        file(
            &["a"],
            "use crate::Error;\n\
             use crate::{b::{self, B}, w::engine::Engine as E};\n\
             /// [`crate::c`] is a doc link, // crate::c in a comment\n\
             fn f() -> &'static str { let _ = 'c'; \"crate::c::X\" }\n\
             #[cfg(test)]\nmod tests { use crate::c::C; }",
        ),
        file(&["b"], "fn g() { crate::c::run(); }"),
        file(&["c"], "/* crate::a */ pub fn run() {}"),
        file(
            &["w"],
            "pub mod engine; pub mod scoring;\n#[cfg(test)]\nmod tests;\npub use engine::Engine;",
        ),
        file(
            &["w", "engine"],
            "use super::scoring::unit; pub struct Engine;",
        ),
        file(&["w", "scoring"], "use super::Engine; pub fn unit() {}"),
        file(&["w", "tests"], "use crate::a::f;"),
    ];
    let graph = import_graph(&sources);
    let edges = |m: &str| -> Vec<String> {
        graph
            .get(m)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(edges("a"), ["b", "w::engine"]);
    assert_eq!(edges("b"), ["c"]);
    assert!(edges("c").is_empty());
    assert_eq!(edges("w"), ["w::engine"]);
    assert_eq!(edges("w::engine"), ["w::scoring"]);
    assert_eq!(edges("w::scoring"), ["w"]);
    assert!(
        !graph.contains_key("w::tests"),
        "test module read: {graph:?}"
    );
    assert_eq!(graph["a"]["w::engine"].line, 2);
    assert_eq!(
        cycles(&graph),
        vec![vec![
            "w".to_owned(),
            "w::engine".to_owned(),
            "w::scoring".to_owned()
        ]]
    );
}

// ---------------------------------------------------------------------------
// Files and modules

struct SourceFile {
    module: Module,
    /// For messages: `core/src/…`.
    name: String,
    text: String,
}

fn collect_rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `lib.rs` → the root `[]`, `foo.rs` and `foo/mod.rs` → `foo`,
/// `foo/bar.rs` → `foo::bar`.
fn module_of(rel: &Path) -> Module {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.strip_suffix(".rs").expect("a .rs file");
    if !(stem == "mod" || (parts.is_empty() && (stem == "lib" || stem == "main"))) {
        parts.push(stem.to_owned());
    }
    parts
}

fn import_graph(sources: &[SourceFile]) -> Graph {
    let modules: BTreeSet<Module> = sources.iter().map(|s| s.module.clone()).collect();
    let scans: Vec<Scan> = sources
        .iter()
        .map(|s| scan(&tokens(&s.text), &s.module))
        .collect();
    // Files of modules declared `#[cfg(test)] mod x;`, and below them.
    let test_modules: Vec<&Module> = scans.iter().flat_map(|s| &s.test_modules).collect();
    let is_test = |m: &Module| test_modules.iter().any(|t| m.starts_with(t));

    let mut graph = Graph::new();
    for (source, scan) in sources.iter().zip(&scans) {
        if source.module.is_empty() || is_test(&source.module) {
            continue;
        }
        let from = source.module.join("::");
        let entry = graph.entry(from.clone()).or_default();
        for reference in &scan.references {
            let Some(to) = resolve(&reference.scope, &reference.path, &modules) else {
                continue;
            };
            if to.is_empty() || to == source.module || is_test(&to) {
                continue;
            }
            entry.entry(to.join("::")).or_insert_with(|| Site {
                file: source.name.clone(),
                line: reference.line,
            });
        }
    }
    graph
}

/// The module a path names, written in `scope` (a file's module plus any
/// inline modules around the path): the deepest module among `modules` it
/// starts with; `None` for paths outside the crate.
fn resolve(scope: &[String], path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    let first = path.first()?;
    let (base, rest): (Vec<String>, &[String]) = match first.as_str() {
        "crate" => (Vec::new(), &path[1..]),
        "self" => (scope.to_vec(), &path[1..]),
        "super" => {
            let mut base = scope.to_vec();
            let supers = path.iter().take_while(|s| *s == "super").count();
            for _ in 0..supers {
                base.pop()?;
            }
            (base, &path[supers..])
        }
        // `::name`: another crate.
        "" => return None,
        name => {
            // A child module of the current one, else another crate or a
            // local name.
            let mut child = scope.to_vec();
            child.push(name.to_owned());
            if !modules.contains(&child) {
                return None;
            }
            (scope.to_vec(), path)
        }
    };
    let full: Vec<String> = base.into_iter().chain(rest.iter().cloned()).collect();
    (0..=full.len())
        .rev()
        .map(|n| full[..n].to_vec())
        .find(|m| m.is_empty() || modules.contains(m))
}

// ---------------------------------------------------------------------------
// Cycles

/// Strongly connected components of more than one module (Tarjan), each
/// sorted, in sorted order.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        components: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            let graph = self.graph;
            for w in graph.get(v).into_iter().flat_map(|t| t.keys()) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.components.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for v in graph.keys() {
        if !tarjan.index.contains_key(v.as_str()) {
            tarjan.visit(v);
        }
    }
    tarjan.components.sort();
    tarjan.components
}

/// One cycle: its modules and every import between them.
fn describe(graph: &Graph, cycle: &[String]) -> String {
    let mut text = format!("cycle: {}\n", cycle.join(", "));
    for from in cycle {
        for (to, site) in graph.get(from).into_iter().flatten() {
            if cycle.contains(to) {
                text.push_str(&format!(
                    "  {from} -> {to}  ({}:{})\n",
                    site.file, site.line
                ));
            }
        }
    }
    text
}

// ---------------------------------------------------------------------------
// Reading Rust source, as much as paths need

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

/// Identifiers, `::` and punctuation, without comments, string and
/// character literals, lifetimes and numbers.
fn tokens(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let is_ident_start = |ch: char| ch.is_alphabetic() || ch == '_';
    let is_ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    // `r"`, `r#"`, `br##"`…: the index of the `r` and the number of `#`.
    let raw_string_at = |i: usize| -> Option<(usize, usize)> {
        let r = match (at(i), at(i + 1)) {
            ('r', _) => i,
            ('b', 'r') => i + 1,
            _ => return None,
        };
        let hashes = (r + 1..).take_while(|&j| at(j) == '#').count();
        (at(r + 1 + hashes) == '"').then_some((r, hashes))
    };
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    // Skips a quoted literal whose opening quote is at `i`; returns the
    // index after the closing one.
    let quoted = |mut i: usize, line: &mut usize, quote: char| -> usize {
        i += 1;
        while i < c.len() && c[i] != quote {
            if c[i] == '\\' {
                i += 1;
            }
            if at(i) == '\n' {
                *line += 1;
            }
            i += 1;
        }
        i + 1
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = quoted(i, &mut line, '"');
        } else if ch == 'b' && (at(i + 1) == '"' || at(i + 1) == '\'') {
            i = quoted(i + 1, &mut line, at(i + 1));
        } else if let Some((r, hashes)) = raw_string_at(i) {
            // Raw string: up to `"` followed by as many `#`.
            i = r + 2 + hashes;
            while i < c.len() && !(c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#')) {
                if c[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 1 + hashes;
        } else if ch == 'r' && at(i + 1) == '#' && is_ident_start(at(i + 2)) {
            // Raw identifier.
            let start = i + 2;
            i = start;
            while is_ident(at(i)) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(c[start..i].iter().collect()),
                line,
            });
        } else if ch == '\'' {
            if at(i + 1) == '\\' {
                i = quoted(i, &mut line, '\'');
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime or label.
                i += 1;
                while is_ident(at(i)) {
                    i += 1;
                }
            }
        } else if is_ident_start(ch) {
            let start = i;
            while is_ident(at(i)) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(c[start..i].iter().collect()),
                line,
            });
        } else if ch.is_ascii_digit() {
            while is_ident(at(i)) || (at(i) == '.' && at(i + 1).is_ascii_digit()) {
                i += 1;
            }
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(ch),
                line,
            });
            i += 1;
        }
    }
    out
}

/// A path written in a file.
struct Reference {
    /// The file's module plus the inline modules around the path.
    scope: Module,
    path: Vec<String>,
    line: usize,
}

struct Scan {
    references: Vec<Reference>,
    /// Modules declared `#[cfg(test)] mod name;`.
    test_modules: Vec<Module>,
}

fn ident(t: Option<&Token>) -> Option<&str> {
    match t.map(|t| &t.tok) {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

fn is(t: Option<&Token>, want: &Tok) -> bool {
    t.is_some_and(|t| t.tok == *want)
}

/// The paths of one file: `use` trees expanded, inline paths that start at
/// `crate`, `self`, `super` or a name followed by `::`; `#[cfg(test)]`
/// items skipped.
fn scan(toks: &[Token], module: &[String]) -> Scan {
    let mut references = Vec::new();
    let mut test_modules = Vec::new();
    // Inline modules open around the current token, with the brace depth
    // inside each.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let scope = |inline: &[(String, usize)]| -> Module {
        module
            .iter()
            .cloned()
            .chain(inline.iter().map(|(name, _)| name.clone()))
            .collect()
    };
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let t = &toks[i];
        match &t.tok {
            Tok::Punct('#') if is_cfg_test(toks, i) => {
                i += 7;
                // Further attributes of the same item.
                while is(toks.get(i), &Tok::Punct('#')) && is(toks.get(i + 1), &Tok::Punct('[')) {
                    i = skip_group(toks, i + 1);
                }
                let mut j = i;
                if ident(toks.get(j)) == Some("pub") {
                    j += 1;
                    if is(toks.get(j), &Tok::Punct('(')) {
                        j = skip_group(toks, j);
                    }
                }
                if ident(toks.get(j)) == Some("mod")
                    && let Some(name) = ident(toks.get(j + 1))
                    && is(toks.get(j + 2), &Tok::Punct(';'))
                {
                    let mut m = scope(&inline);
                    m.push(name.to_owned());
                    test_modules.push(m);
                    i = j + 3;
                } else {
                    i = skip_item(toks, i);
                }
            }
            Tok::Punct('{') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d > depth) {
                    inline.pop();
                }
                i += 1;
            }
            Tok::Ident(kw)
                if kw == "mod"
                    && ident(toks.get(i + 1)).is_some()
                    && is(toks.get(i + 2), &Tok::Punct('{')) =>
            {
                depth += 1;
                inline.push((ident(toks.get(i + 1)).unwrap_or_default().to_owned(), depth));
                i += 3;
            }
            Tok::Ident(kw) if kw == "use" => {
                let mut paths = Vec::new();
                i = use_tree(toks, i + 1, Vec::new(), &mut paths);
                let here = scope(&inline);
                references.extend(paths.into_iter().map(|path| Reference {
                    scope: here.clone(),
                    path,
                    line: t.line,
                }));
            }
            Tok::Ident(first)
                if is(toks.get(i + 1), &Tok::PathSep)
                    && !(i > 0
                        && (is(toks.get(i - 1), &Tok::PathSep)
                            || is(toks.get(i - 1), &Tok::Punct('$')))) =>
            {
                let mut path = vec![first.clone()];
                let mut j = i + 1;
                while is(toks.get(j), &Tok::PathSep)
                    && let Some(next) = ident(toks.get(j + 1))
                {
                    path.push(next.to_owned());
                    j += 2;
                }
                references.push(Reference {
                    scope: scope(&inline),
                    path,
                    line: t.line,
                });
                i = j;
            }
            _ => i += 1,
        }
    }
    Scan {
        references,
        test_modules,
    }
}

/// `#[cfg(test)]` at `i`.
fn is_cfg_test(toks: &[Token], i: usize) -> bool {
    let want = [
        Tok::Punct('#'),
        Tok::Punct('['),
        Tok::Ident("cfg".into()),
        Tok::Punct('('),
        Tok::Ident("test".into()),
        Tok::Punct(')'),
        Tok::Punct(']'),
    ];
    toks.len() >= i + want.len() && toks[i..i + want.len()].iter().map(|t| &t.tok).eq(&want)
}

/// The index after the bracketed group that opens at `i`.
fn skip_group(toks: &[Token], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < toks.len() {
        match toks[i].tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The index after the item that starts at `i`: after its `;`, or after its
/// outermost `{…}` block.
fn skip_item(toks: &[Token], mut i: usize) -> usize {
    while i < toks.len() {
        match toks[i].tok {
            Tok::Punct(';') => return i + 1,
            Tok::Punct('{') => return skip_group(toks, i),
            Tok::Punct('(' | '[') => i = skip_group(toks, i),
            _ => i += 1,
        }
    }
    i
}

/// Expands the use tree at `i` (after `use`, or inside a group) into full
/// paths below `prefix`; returns the index after it. `a::{self, B}` gives
/// `a` and `a::B`; a glob `a::*` gives `a`; a leading `::` gives a path that
/// starts with an empty segment.
fn use_tree(
    toks: &[Token],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let mut path = prefix;
    if path.is_empty() && is(toks.get(i), &Tok::PathSep) {
        path.push(String::new());
        i += 1;
    }
    loop {
        match toks.get(i).map(|t| &t.tok) {
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                i += 1;
                if is(toks.get(i), &Tok::PathSep) {
                    i += 1;
                } else {
                    break;
                }
            }
            Some(Tok::Punct('{')) => {
                i += 1;
                while i < toks.len() && !is(toks.get(i), &Tok::Punct('}')) {
                    let before = i;
                    i = use_tree(toks, i, path.clone(), out);
                    if is(toks.get(i), &Tok::Punct(',')) {
                        i += 1;
                    }
                    if i == before {
                        i += 1;
                    }
                }
                return i + 1;
            }
            Some(Tok::Punct('*')) => {
                out.push(path);
                return i + 1;
            }
            _ => break,
        }
    }
    if ident(toks.get(i)) == Some("as") {
        i += 2;
    }
    if path.last().is_some_and(|s| s == "self") {
        path.pop();
    }
    if !path.is_empty() {
        out.push(path);
    }
    i
}
