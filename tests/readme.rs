//! The README is the user's manual: its tables must match what the code accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// First-column entries of the table under `heading` (the text between the first backticks).
fn table_keys(text: &str, heading: &str) -> BTreeSet<String> {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    text[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .filter_map(|l| l.split('`').nth(1).map(str::to_string))
        .collect()
}

#[test]
fn annotation_table_matches_the_parser_both_ways() {
    use cloudlb::annotations::catalog;
    let text = readme();
    let start = text
        .find("### Annotations")
        .expect("README has ### Annotations");
    let documented: BTreeMap<String, String> = text[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            let key = cells[0]
                .trim_start_matches("| ")
                .trim_matches('`')
                .to_string();
            (key, cells.get(1).unwrap_or(&"").trim().to_string())
        })
        .collect();
    let code: BTreeMap<String, String> = catalog::ENTRIES
        .iter()
        .map(|e| (e.key.to_string(), catalog::status_text(e)))
        .collect();
    assert_eq!(
        documented, code,
        "README annotation table (name → status) and annotations::catalog disagree"
    );
    // And the other way: every key the parser reads is in the catalog, so in the README.
    for k in cloudlb::annotations::keys_read() {
        assert!(
            code.contains_key(&k),
            "the parser reads {k}, which the README annotation table does not list"
        );
    }
}

/// Long flags of `cloudlb <sub> --help` (clap's help is generated from the real parser).
fn flags_of(sub: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_cloudlb"))
        .args([sub, "--help"])
        .output()
        .expect("run cloudlb");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-')))
        .filter(|w| !w.is_empty() && *w != "help" && *w != "version")
        .map(|w| format!("--{w}"))
        .collect()
}

#[test]
fn every_flag_is_documented() {
    let text = readme();
    let documented = table_keys(&text, "### Flags");
    let documented_all: BTreeSet<String> = documented
        .iter()
        .flat_map(|k| k.split(" / ").map(str::to_string).collect::<Vec<_>>())
        .chain(
            text.lines()
                .filter(|l| l.starts_with("| `--"))
                .flat_map(|l| {
                    l.split('`')
                        .filter(|p| p.starts_with("--"))
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                }),
        )
        .collect();
    for flag in flags_of("controller") {
        assert!(
            documented_all.contains(&flag),
            "controller flag {flag} is not in the README"
        );
    }
}
