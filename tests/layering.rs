//! The layering of `src/`, checked against the code: `src/lib.rs`'s Layout
//! section lists every top-level module on a numbered floor, and a module
//! may use only modules on floors below its own. Floors are a total order,
//! so a layering that passes has no import cycle.
//!
//! What counts as a use: any `crate::<module>` path in code (a `use`, a
//! qualified call, a type), including the modules named inside
//! `use crate::{a, b::c}`. Comments and doc comments are not code: a doc
//! link may point anywhere. Within a module (`self::`, `super::`, its own
//! files) anything goes.
//!
//! The check also fails when the table and the tree disagree: a module in
//! `src/` with no floor, or a floor naming a module that does not exist.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The floor table from lib.rs: lines of the form
/// `//! | 3 | `upstream`, `gateway` | what they are |`.
fn floors(lib_rs: &str) -> BTreeMap<String, u32> {
    let mut floors = BTreeMap::new();
    for line in lib_rs.lines() {
        let Some(row) = line.trim().strip_prefix("//! |") else {
            continue;
        };
        let mut cells = row.split('|').map(str::trim);
        let (Some(floor), Some(modules)) = (cells.next(), cells.next()) else {
            continue;
        };
        let Ok(floor) = floor.parse::<u32>() else {
            continue; // the header row, or its `---` line
        };
        for module in modules.split(',') {
            let module = module.trim().trim_matches('`').trim_end_matches('/');
            let module = module.trim_end_matches(".rs");
            assert!(
                floors.insert(module.to_owned(), floor).is_none(),
                "src/lib.rs Layout: `{module}` is on two floors"
            );
        }
    }
    floors
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`src/config/http.rs`
/// and `src/config.rs` are both `config`), or `None` for lib.rs.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("under src/");
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    if first == "lib.rs" {
        return None;
    }
    Some(first.trim_end_matches(".rs").to_owned())
}

/// `source` without its comments (line, doc and block) and with string and
/// char literals blanked, so only code is searched.
fn code_only(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &source[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').map_or(source.len(), |n| i + n);
            i = end;
        } else if rest.starts_with("/*") {
            let mut depth = 0;
            let mut j = i;
            while j < bytes.len() {
                if source[j..].starts_with("/*") {
                    depth += 1;
                    j += 2;
                } else if source[j..].starts_with("*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            i = j;
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].chars().take_while(|&c| c == '#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = i + 2 + hashes;
            i = source[body..]
                .find(&close)
                .map_or(source.len(), |n| body + n + close.len());
            out.push_str("\"\"");
        } else if bytes[i] == b'"' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
            out.push_str("\"\"");
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// The top-level modules `code` uses through `crate::`.
fn crate_uses(code: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        // `happynet_actors::…` or `some_crate::…` is another crate.
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = code[at + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the first segment of each item
            // at the group's own level.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        used.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                used.insert(name);
            }
        }
    }
    used
}

#[test]
fn no_module_uses_one_on_a_higher_floor_and_the_layout_matches_the_tree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let lib_rs = fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let floors = floors(&lib_rs);
    assert!(
        floors.len() > 1,
        "src/lib.rs has no Layout table (`//! | floor | modules | … |` rows)"
    );

    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    let mut modules = BTreeSet::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        modules.insert(module.clone());
        let Some(&floor) = floors.get(&module) else {
            problems.push(format!(
                "src/{module}: not in src/lib.rs's Layout table; give it a floor"
            ));
            continue;
        };
        let source = fs::read_to_string(file).expect("read a source file");
        for used in crate_uses(&code_only(&source)) {
            if used == module || used == "self" || used == "super" {
                continue;
            }
            match floors.get(&used) {
                // A re-export from lib.rs (`crate::Config`): resolve it by
                // the module lib.rs takes it from.
                None => {
                    if let Some(origin) = reexport_origin(&lib_rs, &used) {
                        if origin != module && floors.get(&origin).is_some_and(|&f| f >= floor) {
                            problems.push(format!(
                                "{}: uses crate::{used} (from `{origin}`, floor {}) on floor {floor}",
                                file.strip_prefix(root).unwrap_or(file).display(),
                                floors[&origin]
                            ));
                        }
                    }
                }
                Some(&used_floor) if used_floor >= floor => problems.push(format!(
                    "{}: on floor {floor}, uses `{used}` on floor {used_floor}",
                    file.strip_prefix(root).unwrap_or(file).display()
                )),
                Some(_) => {}
            }
        }
    }
    for module in floors.keys() {
        if !modules.contains(module) {
            problems.push(format!(
                "src/lib.rs Layout names `{module}`, which is not a module in src/"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "the layering in src/lib.rs does not hold:\n  {}",
        problems.join("\n  ")
    );
}

/// The module that `src/lib.rs` re-exports `name` from (`pub use
/// network::Network;` → `network`), if it does.
fn reexport_origin(lib_rs: &str, name: &str) -> Option<String> {
    let code = code_only(lib_rs);
    for stmt in code.split(';') {
        let stmt = stmt.trim();
        let Some(path) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let origin: String = path
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let names = path
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .collect::<Vec<_>>();
        if names.iter().skip(1).any(|n| *n == name) {
            return Some(origin);
        }
    }
    None
}

#[test]
fn the_parser_finds_grouped_and_qualified_uses_and_skips_comments() {
    let code = code_only(
        r#"
        use crate::{config::Seconds, security, upstream::{a, b}};
        // use crate::network::Network;
        /// [`crate::network`] is only a doc link
        fn f() { crate::ops::snapshot(); let s = "crate::gateway"; }
        use happynet_actors::Broadcast;
        "#,
    );
    let used = crate_uses(&code);
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        ["config", "ops", "security", "upstream"]
    );
    let table = floors("//! | floor | modules | what |\n//! |---|---|---|\n//! | 1 | `config/` | settings |\n//! | 2 | `security`, `tls` | guards |\n");
    assert_eq!(table["config"], 1);
    assert_eq!(table["tls"], 2);
}
